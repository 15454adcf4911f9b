"""Recipes: every shipped recipe validates; bad recipes fail before any model loads, naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedkit.errors import ConfigError
from embedkit.train.cli import train_command
from embedkit.train.config import apply_overrides, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"minilm-scifact.yaml", "minilm-medquad.yaml", "bge-small-lora.yaml", "smollm2-qlora.yaml",
            "qwen3-0.6b-qlora-zero3.yaml", "mistral-7b-qlora-zero3.yaml", "qwen3-0.6b-encoder.yaml",
            "mistral-7b-encoder-zero3.yaml"} <= names


LLM_RECIPES = sorted((REPO / "recipes" / "llm").glob("*.yaml"))


def _mode(recipe: Path) -> str:
    return next(mode for mode in ("sft", "dpo", "joint") if mode in recipe.stem)


@pytest.mark.parametrize("recipe", RECIPES + LLM_RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_passes_check(recipe, monkeypatch, shared_data):
    """`--check` through the real CLI: what a user runs first. GPU recipes check here too (the device is resolved
    when training starts, not when validating)."""
    from typer.testing import CliRunner

    from embedkit.cli import app

    monkeypatch.chdir(REPO)  # recipes name data relative to the project root
    argv = ["train", str(recipe), "--check"] if recipe.parent.name == "recipes" else \
        ["llm", _mode(recipe), str(recipe), "--check"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert ": ok (" in result.output


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}"}) + "\n" for i in range(4)))
    return path


def _good(pairs_file, tmp_path) -> str:
    return (f"model:\n  name: minilm\ndata:\n  train: {pairs_file}\n"
            f"training:\n  output_dir: {tmp_path / 'out'}\n  batch_size: 2\n")


def test_good_recipe_and_overrides(pairs_file, tmp_path):
    path = _write(tmp_path, _good(pairs_file, tmp_path))
    recipe = load_recipe(path, ["training.lr=1e-4", "loss.matryoshka_dims=[384, 128]", "model.prompts=e5",
                                "training.grad_cache=null"])
    assert recipe.training.lr == 1e-4 and recipe.loss.matryoshka_dims == [384, 128]
    assert recipe.model.prompts == "e5" and recipe.training.grad_cache is None
    assert recipe.training.batch_size == 2 and recipe.loss.temperature == 0.05


def _fails(path, overrides=(), **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, list(overrides), **kw)
    message = str(info.value)
    assert "\n" not in message
    return info.value


def test_unknown_key_is_named_with_its_line(pairs_file, tmp_path):
    path = _write(tmp_path, _good(pairs_file, tmp_path) + "  batch_sz: 4\n")
    err = _fails(path)
    assert err.field == "training.batch_sz" and err.line == 8 and "unknown key" in str(err)
    assert str(path) in str(err)


def test_wrong_type_is_named_by_field_path(pairs_file, tmp_path):
    err = _fails(_write(tmp_path, _good(pairs_file, tmp_path) + "  lr: fast\n"))
    assert err.field == "training.lr" and "fast" in str(err) and err.line == 8
    err = _fails(_write(tmp_path, _good(pairs_file, tmp_path)), ["loss.temperature=-1"])
    assert err.field == "loss.temperature"
    err = _fails(_write(tmp_path, _good(pairs_file, tmp_path)), ["adapter.type=dora"])
    assert err.field == "adapter.type"
    err = _fails(_write(tmp_path, _good(pairs_file, tmp_path)), ["training.nope=1"])
    assert err.field == "training.nope"


def test_missing_section_and_bad_yaml(pairs_file, tmp_path):
    err = _fails(_write(tmp_path, "model:\n  name: minilm\n"))
    assert err.field == "data" and "missing" in str(err)
    err = _fails(_write(tmp_path, "model: [unclosed\n"))
    assert "invalid YAML" in str(err) and err.line is not None


def test_missing_data_file_and_unknown_model(pairs_file, tmp_path):
    err = _fails(_write(tmp_path, _good(tmp_path / "nope.jsonl", tmp_path)))
    assert err.field == "data.train" and "nope.jsonl" in str(err)
    err = _fails(_write(tmp_path, _good(pairs_file, tmp_path)), [f"data.train=beir:{tmp_path}:train"])
    assert err.field == "data.train" and "BEIR" in str(err)
    err = _fails(_write(tmp_path, _good(pairs_file, tmp_path)), ["data.dev=beir:/no/such/dir:test"])
    assert err.field == "data.dev"
    err = _fails(_write(tmp_path, _good(pairs_file, tmp_path)), ["model.name=./no-such-model"])
    assert err.field == "model.name"
    err = _fails(_write(tmp_path, _good(pairs_file, tmp_path)), ["training.eval_every=5"])
    assert err.field == "training.eval_every"


def test_deepspeed_absent_is_an_environment_error(pairs_file, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    path = _write(tmp_path, _good(pairs_file, tmp_path) + "deepspeed:\n  stage: zero3\n")
    assert _fails(path).field == "deepspeed.stage"
    load_recipe(path, check_environment=False)


def test_override_syntax_errors(pairs_file, tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["training.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"training": {"lr": 1}}, ["training.lr.x=2"])


def test_tune_edits_recipes_through_the_set_path_and_an_unknown_key_raises_as_with_set(pairs_file, tmp_path):
    """Bug: tune edited raw dicts with its own `_set`/`_get`, a second override path that silently replaced a
    value that was not a section (where `--set` raised) and read a misspelt key as None. Tune's edits are now
    `--set` overrides applied to the typed recipe (`with_overrides`, on `apply_overrides`): a key no recipe has is
    the error `--set` gives, naming the key; the values come back as themselves (4e-05 stays a float, "3:50" a
    text); the keys the user did not write stay unwritten; the recipe edited is not changed."""
    from embedkit.tune.search import as_overrides

    path = _write(tmp_path, _good(pairs_file, tmp_path))
    via_set = _fails(path, ["training.lrr=4e-05"])
    recipe = load_recipe(path)
    with pytest.raises(ConfigError) as info:
        recipe.with_overrides(as_overrides({"training.lrr": 4e-05}), source=path)
    assert (info.value.field, info.value.message, info.value.path) == (via_set.field, via_set.message, via_set.path)
    assert via_set.field == "training.lrr" and "unknown key" in via_set.message
    with pytest.raises(ConfigError, match="not a section"):  # _set replaced batch_size: 2 with {"x": 1}
        recipe.with_overrides(as_overrides({"training.batch_size.x": 1}))
    edited = recipe.with_overrides(as_overrides({"training.lr": 4e-05, "mining.range": "3:50", "loss.temperature":
                                                 0.02, "training.report_to": [], "data.max_examples": None}))
    assert edited.training.lr == 4e-05 and edited.mining.range == "3:50" and edited.loss.temperature == 0.02
    assert edited.training.report_to == [] and edited.data.max_examples is None
    assert edited.training.batch_size == 2 and recipe.training.lr == 2e-5  # the rest kept, the original untouched
    assert "adapter" not in edited.model_fields_set and "adapter" not in edited.model_dump(exclude_unset=True)
    assert type(edited) is type(recipe)


def test_every_recipe_kind_shares_the_engines_sections():
    """Bug: embedkit/llm/config.py re-declared the section base and an adapter section that nearly duplicated this
    one (an option added to one kind's adapter, DoRA / rsLoRA, had to be added to the other by hand, and nothing
    told when it was not). Every recipe the engine trains derives from BaseRecipe, and its adapter section from
    the one AdapterSection, re-declaring none of its fields but the LLM default (lora)."""
    from embedkit.llm.config import LLMRecipe
    from embedkit.train.config import AdapterSection, BaseRecipe, Recipe, Section

    for kind in (Recipe, LLMRecipe):
        assert issubclass(kind, BaseRecipe)
        for name in ("model", "adapter", "data", "loss", "training", "deepspeed", "fsdp"):
            declared = kind.model_fields[name].annotation
            assert issubclass(declared, BaseRecipe.model_fields[name].annotation), (kind.__name__, name)
    encoder_adapter = Recipe.model_fields["adapter"].annotation
    llm_adapter = LLMRecipe.model_fields["adapter"].annotation
    assert AdapterSection in encoder_adapter.__mro__ and AdapterSection in llm_adapter.__mro__
    assert {k for k in vars(llm_adapter).get("__annotations__", {})} == {"type"}  # no field re-declared but type
    for name, field in AdapterSection.model_fields.items():  # the same LoRA options, same bounds, in both
        for kind in (encoder_adapter, llm_adapter):
            if name != "type":
                assert repr(kind.model_fields[name]) == repr(field), (kind.__name__, name)
    assert llm_adapter().type == "lora" and encoder_adapter().type == "none"
    assert set(encoder_adapter.model_fields) - set(AdapterSection.model_fields) == {"save"}
    assert Section in LLMRecipe.model_fields["dpo"].annotation.__mro__  # one section base: extra keys refused


def test_bad_recipe_fails_in_the_cli_before_any_model_loads(pairs_file, tmp_path, monkeypatch):
    import embedkit.models.encoder as encoder_module

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the recipe was validated")

    monkeypatch.setattr(encoder_module.Encoder, "from_pretrained", classmethod(no_model))
    path = _write(tmp_path, _good(pairs_file, tmp_path) + "  epochz: 2\n")
    kwargs = dict(set_=[], resume=False, deepspeed=None, output=None, nproc=1, check=False, estimate_memory=False,
                  json_output=False)
    with pytest.raises(ConfigError, match="epochz"):
        train_command(None, path, **kwargs)
    path = _write(tmp_path, _good(tmp_path / "missing.jsonl", tmp_path))
    with pytest.raises(ConfigError, match="missing.jsonl"):
        train_command(None, path, **kwargs)
    with pytest.raises(ConfigError, match="deepspeed.stage"):
        train_command(None, _write(tmp_path, _good(pairs_file, tmp_path)), **{**kwargs, "deepspeed": "zero9"})


def test_cli_check_validates_without_training(pairs_file, tmp_path, capsys, monkeypatch):
    import embedkit.models.encoder as encoder_module

    monkeypatch.setattr(encoder_module.Encoder, "from_pretrained",
                        classmethod(lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded"))))
    path = _write(tmp_path, _good(pairs_file, tmp_path))
    kwargs = dict(set_=["training.lr=3e-5"], resume=False, deepspeed=None, output=tmp_path / "o2", nproc=1,
                  check=True, estimate_memory=False, json_output=False)
    train_command(None, path, **kwargs)
    assert "ok" in capsys.readouterr().out
    # --check validates the recipe, not this machine: a GPU recipe checks here; running it is a one-line error.
    train_command(None, path, **{**kwargs, "set_": ["model.device=cuda"]})
    assert "on cuda" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train_command(None, path, **{**kwargs, "check": False, "set_": ["model.device=cuda"]})
