"""docs/extending.md's worked examples, run as the page shows them: a pooling, a loss, a training backend and a
serving backend registered, then used where the page says they can be.

Catches the page drifting from the code: a registry or hook renamed, a stage that stops reading its registry (a
recipe refusing a registered pooling, `build_loss` ignoring a registered loss, the engine not running the selected
backend, `--backend` not offering a registered one). Every code block whose first line names a file
(`# embedkit/...`) is run here, in a copy of that module's namespace (or as that new module); the registries are
restored after each test.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from embedkit.errors import ConfigError, ModelError
from embedkit.models.pooling import POOLINGS
from embedkit.serve.backends import SERVE_BACKENDS
from embedkit.train.backends import TRAINING_BACKENDS
from embedkit.train.losses import BASE_LOSSES

DOC = REPO / "docs" / "extending.md"
RUN_BLOCKS = {"embedkit/models/pooling.py", "embedkit/train/losses/gte.py", "embedkit/train/config.py",
              "embedkit/train/backends.py", "embedkit/serve/backends.py"}


def doc_blocks() -> dict[str, str]:
    """{file: code} of the page's python blocks whose first line is `# <file>` (one block per file)."""
    blocks: dict[str, str] = {}
    for code in re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), re.S | re.M):
        first = code.splitlines()[0]
        if first.startswith("# embedkit/"):
            name = first[2:].strip()
            assert name not in blocks, f"two blocks for {name}: one per file"
            blocks[name] = code
    return blocks


def run_in(module_name: str, code: str) -> dict:
    """Run `code` as if written at the end of `module_name` (in a copy of its namespace); the namespace after."""
    module = sys.modules[module_name] if module_name in sys.modules else __import__(module_name, fromlist=["x"])
    namespace = dict(vars(module))
    exec(compile(code, f"{DOC}:{module_name}", "exec"), namespace)
    return namespace


def run_as_new_module(module_name: str, code: str) -> types.ModuleType:
    module = types.ModuleType(module_name)
    module.__file__ = f"{DOC}:{module_name}"
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    exec(compile(code, module.__file__, "exec"), vars(module))
    return module


@pytest.fixture(autouse=True)
def restored_registries():
    saved = [(registry, dict(registry)) for registry in (POOLINGS, BASE_LOSSES, TRAINING_BACKENDS, SERVE_BACKENDS)]
    yield
    for registry, content in saved:
        registry.clear()
        registry.update(content)
    sys.modules.pop("embedkit.train.losses.gte", None)


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    texts = [("what is diabetes", "diabetes is a disease of high blood sugar"),
             ("what does insulin do", "insulin lowers the level of glucose in the blood"),
             ("who is playing a guitar", "a man is playing a guitar on the stage"),
             ("what did the court rule", "the court ruled that the contract was void"),
             ("flu symptoms", "symptoms of flu include fever, aches and fatigue"),
             ("asthma in children", "how is asthma treated in children")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"query": q, "positive": p, "negatives": [texts[(i + 1) % len(texts)][1]]})
                            + "\n" for i, (q, p) in enumerate(texts)))
    return path


def tiny_recipe(model_dir: Path, pairs_file: Path, out: Path, **sections) -> dict:
    raw = {"model": {"name": str(model_dir), "max_length": 32},
           "data": {"train": str(pairs_file)},
           "training": {"output_dir": str(out), "batch_size": 3, "lr": 1e-3, "max_steps": 2, "seed": 7,
                        "progress": False, "threads": 1, "report_to": []}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def test_every_code_block_that_names_a_file_is_run_here():
    """A worked example added to the page without a test here would not be kept working."""
    assert set(doc_blocks()) == RUN_BLOCKS


def test_a_registered_pooling_is_a_recipe_value_and_pools_alike_on_both_padding_sides(tiny_llama_dir, pairs_file,
                                                                                        tmp_path):
    from embedkit.export.hf import vllm_command
    from embedkit.llm.config import LLMModelSection
    from embedkit.models import load_model
    from embedkit.train.config import parse_recipe

    raw = tiny_recipe(tiny_llama_dir, pairs_file, tmp_path / "out", model={"pooling": "weightedmean"})
    with pytest.raises(ConfigError, match="unknown pooling 'weightedmean'; choose one of cls, mean"):
        parse_recipe(raw)
    run_in("embedkit.models.pooling", doc_blocks()["embedkit/models/pooling.py"])

    assert parse_recipe(raw).model.pooling == "weightedmean"
    assert LLMModelSection(name="x", pooling="weightedmean").pooling == "weightedmean"  # for_causal_lm
    texts = ["one two three four five", "one", "one two"]
    left = load_model(tiny_llama_dir, pooling="weightedmean", padding_side="left").encode(texts)
    right = load_model(tiny_llama_dir, pooling="weightedmean", padding_side="right").encode(texts)
    np.testing.assert_allclose(left, right, atol=1e-5)
    mean = load_model(tiny_llama_dir, pooling="mean").encode(texts)
    assert not np.allclose(left, mean, atol=1e-3)  # it is its own pooling, not a built-in under a new name

    load_model(tiny_llama_dir, pooling="weightedmean").save(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "1_Pooling" / "config.json").read_text())
    assert [key for key, on in config.items() if on is True and key.startswith("pooling_mode")] == [
        "pooling_mode_weightedmean_tokens"]
    reloaded = load_model(tmp_path / "saved")
    assert reloaded.pooling == "weightedmean"
    np.testing.assert_allclose(reloaded.encode(texts), left, atol=1e-5)
    with pytest.raises(ModelError, match="vLLM cannot pool with 'weightedmean'"):
        vllm_command(tmp_path / "saved", served_name="x", pooling="weightedmean", normalize=True, max_length=32)


def test_a_pooling_without_a_sentence_transformers_key_is_recorded_by_embedkit(tiny_bert_dir, tmp_path):
    """The page's promise for `st_key` left out: the folder names the pooling in embedkit's section."""
    from embedkit.models import load_model

    code = doc_blocks()["embedkit/models/pooling.py"]
    code = code.replace('"weightedmean", st_key="pooling_mode_weightedmean_tokens"', '"position_weighted"')
    run_in("embedkit.models.pooling", code)
    load_model(tiny_bert_dir, pooling="position_weighted").save(tmp_path / "saved")
    settings = json.loads((tmp_path / "saved" / "config_sentence_transformers.json").read_text())
    assert settings["embedkit"]["pooling"] == "position_weighted"
    assert load_model(tmp_path / "saved").pooling == "position_weighted"


def test_a_registered_loss_is_a_recipe_value_and_trains(tiny_bert_dir, pairs_file, tmp_path):
    from embedkit.train.config import parse_recipe
    from embedkit.train.contrastive import train
    from embedkit.train.losses import build_loss

    raw = tiny_recipe(tiny_bert_dir, pairs_file, tmp_path / "out", loss={"type": "gte", "hard_negatives": 1})
    with pytest.raises(ConfigError, match="unknown loss type 'gte'; choose one of infonce"):
        parse_recipe(raw)
    run_as_new_module("embedkit.train.losses.gte", doc_blocks()["embedkit/train/losses/gte.py"])

    recipe = parse_recipe(raw)
    assert build_loss(recipe.loss).describe() == "GTE improved contrastive (temperature 0.05)"
    result = train(recipe)
    assert result.steps == 2 and np.isfinite(result.final_loss)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "GTE improved contrastive" in card


def test_a_registered_training_backend_is_selected_by_its_section_and_trains(tiny_bert_dir, pairs_file, tmp_path):
    from embedkit.train import backends
    from embedkit.train.config import Recipe
    from embedkit.train.contrastive import train

    blocks = doc_blocks()
    section = run_in("embedkit.train.config", blocks["embedkit/train/config.py"])["DDPCompressionSection"]
    backend = run_in("embedkit.train.backends", blocks["embedkit/train/backends.py"])["CompressedDDPBackend"]

    class CompressedRecipe(Recipe):  # what declaring the field on BaseRecipe gives every recipe
        ddp_compression: section = section()

    raw = tiny_recipe(tiny_bert_dir, pairs_file, tmp_path / "out", ddp_compression={"dtype": "bf16"})
    recipe = CompressedRecipe.from_raw(raw)
    assert backends.backend_class(recipe) is backend
    assert backends.backend_class(CompressedRecipe.from_raw({**raw, "ddp_compression": {}})) is (
        backends.DataParallelBackend)
    with pytest.raises(ConfigError, match="choose one sharding engine: deepspeed.stage or ddp_compression.dtype"):
        CompressedRecipe.from_raw({**raw, "deepspeed": {"stage": "zero2"}})

    wrapped = []
    original = backend.wrap

    def wrap(self, model, extra):
        wrapped.append(type(self))
        original(self, model, extra)

    backend.wrap = wrap
    result = train(recipe)
    assert wrapped == [backend] and result.steps == 2 and np.isfinite(result.final_loss)


def test_a_registered_serve_backend_is_offered_and_serves_what_encode_computes(st_bert):
    from embedkit.models import load_model
    from embedkit.serve.backends import ModelSpec, TorchBackend, backend_help, load_backend

    spec = ModelSpec(name="bert", path=str(st_bert))
    with pytest.raises(ModelError, match="unknown backend 'sentence-transformers'"):
        load_backend(spec, "sentence-transformers")
    run_in("embedkit.serve.backends", doc_blocks()["embedkit/serve/backends.py"])

    assert "'sentence-transformers': a model folder loaded and pooled by sentence-transformers" in backend_help()
    served = load_backend(spec, "sentence-transformers")
    texts = ["what is diabetes", "a", "insulin lowers the level of glucose in the blood, the court ruled"]
    expected = load_model(st_bert)
    for kind in ("query", "document"):
        np.testing.assert_allclose(served.encode(texts, kind), expected.encode(texts, kind), atol=1e-5)
    assert isinstance(load_backend(spec, "auto"), TorchBackend)  # auto still serves plain folders with torch
