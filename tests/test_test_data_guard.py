"""Test data never steers a choice: shipped recipes name no test split as dev, `embedkit tune` refuses a dev or
test set that overlaps the other or the training data and scores --test only after the final model, and
`embedkit train` warns when data.dev is a test split (issue #28, item 1)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from embedkit.errors import ConfigError
from embedkit.tune.run import tune
from test_tune import HELD_OUT, PAIRS, write_beir, write_held_out, write_pairs, write_recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes" / "llm").glob("*.yaml"))

pytestmark = pytest.mark.usefixtures("one_torch_thread")

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedkit.cli", *args], capture_output=True, text=True)


# ---------------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_no_shipped_recipe_names_a_test_split_as_dev(path):
    """Bug: a recipe's data.dev is the test split, so `embedkit tune RECIPE` chooses its trial on the test and
    eval_every restores the checkpoint the test liked (five recipes did, the MedQuAD / SciFact ones too)."""
    from embedkit.eval.tasks import parse_task_spec

    raw = yaml.safe_load(path.read_text())
    dev = (raw.get("data") or {}).get("dev")
    if dev is not None:
        spec = parse_task_spec(dev)
        assert (spec.split or Path(spec.path or "").stem).lower() != "test", f"{path.name}: data.dev {dev}"
    assert not (raw.get("training") or {}).get("eval_every") or dev, path.name


# ---------------------------------------------------------------------------------------------------- tune refuses
@pytest.fixture
def sets(tmp_path, tiny_bert_dir):
    """A pairs-file recipe, a genuine test split, and its ways of overlapping."""
    test = write_held_out(tmp_path / "test")
    return {"tmp": tmp_path, "model": tiny_bert_dir, "pairs": str(write_pairs(tmp_path / "p.jsonl")),
            "test": f"beir:{test}:test"}


def _refused(sets, *, train=None, dev=None, test=None, **kwargs) -> ConfigError:
    tmp = sets["tmp"]
    recipe = write_recipe(tmp / "r.yaml", sets["model"], train or sets["pairs"], tmp / "out",
                          **({"data": {"dev": dev}} if dev else {}))
    with pytest.raises(ConfigError) as info:
        tune(recipe, budget="1", output=tmp / "t", final=False, test=test, **kwargs)
    assert "\n" not in str(info.value)
    assert not (tmp / "t" / "split").exists()  # refused before carving, ranking or training
    return info.value


def test_tune_refuses_a_test_that_is_the_dev_set(sets):
    """Bug: `embedkit tune RECIPE --test T` with data.dev = T chose the trial (and the engine its dev-best step) on
    T, then reported the tuned model's gain on that same T."""
    err = _refused(sets, dev=sets["test"], test=sets["test"])
    assert err.field == "--test" and "same split as data.dev" in str(err)


def test_tune_refuses_a_test_sharing_query_ids_or_texts_with_dev(sets):
    """Bug: the guard compares only spec strings or files, so a dev split that re-uses the test's queries (another
    qrels file of the same folder, or a copy under new ids) still lets the search choose on test queries."""
    folder = Path(sets["test"][len("beir:"):].rpartition(":")[0])
    shutil.copy(folder / "qrels" / "test.tsv", folder / "qrels" / "dev.tsv")  # the same query ids, another split
    err = _refused(sets, dev=f"beir:{folder}:dev", test=sets["test"])
    assert err.field == "--test" and "query ids with data.dev" in str(err) and "'t0'" in str(err)
    copy = write_held_out(sets["tmp"] / "copy", split="dev", id_prefix="c")  # the same texts, new ids
    err = _refused(sets, dev=f"beir:{copy}:dev", test=sets["test"])
    assert err.field == "--test" and "5 of its 5 query texts with data.dev" in str(err)


def test_tune_refuses_a_dev_set_the_model_trains_on(sets):
    """Bug: a data.dev holding training queries (here the training pairs as a BEIR set, case changed) scores
    memorisation: the longest, highest-lr trial always wins."""
    dev = write_held_out(sets["tmp"] / "dev", split="dev", pairs=[(q.upper(), p) for q, p in PAIRS[:3]])
    err = _refused(sets, dev=f"beir:{dev}:dev")
    assert err.field == "data.dev" and "query texts with data.train" in str(err)
    assert str(sets["tmp"] / "r.yaml") in str(err)


def test_tune_refuses_a_test_the_model_trains_on_unless_only_texts_are_allowed(sets, tmp_path, monkeypatch):
    """Bugs: --test naming the training split itself, or a test whose queries the model trains on (the old
    test_tune did exactly that and compared on the training pairs). --allow-train-overlap accepts shared texts
    only (a public split that repeats a few), never the same split, and keeps those texts out of the dev split."""
    import embedkit.tune.run as run
    from embedkit.train.config import load_recipe
    from embedkit.tune.split import carve_dev_split, carve_dev_splits

    beir = write_beir(tmp_path / "beir")
    err = _refused(sets, train=f"beir:{beir}:train", test=f"beir:{beir}:train", allow_train_overlap=True)
    assert err.field == "--test" and "same split as data.train" in str(err)
    shutil.copy(beir / "qrels" / "train.tsv", beir / "qrels" / "test.tsv")
    err = _refused(sets, train=f"beir:{beir}:train", test=f"beir:{beir}:test", allow_train_overlap=True)
    assert "query ids with data.train" in str(err)
    repeats = write_held_out(tmp_path / "repeats", pairs=HELD_OUT + [PAIRS[0], PAIRS[9]])
    err = _refused(sets, test=f"beir:{repeats}:test")
    assert "2 of its 7 query texts with data.train" in str(err) and "--allow-train-overlap" in str(err)

    seen = {}

    def spy(*args, **kwargs):
        seen["exclude"] = kwargs["exclude"]
        return carve_dev_splits(*args, **kwargs)

    monkeypatch.setattr(run, "carve_dev_splits", spy)
    recipe = write_recipe(tmp_path / "r.yaml", sets["model"], sets["pairs"], tmp_path / "out")
    tune(recipe, budget="1", output=tmp_path / "ok", final=False, test=f"beir:{repeats}:test",
         allow_train_overlap=True, nearest_dev=False, isolate=False, folds=1)
    assert seen["exclude"] == {PAIRS[0][0], PAIRS[9][0]}  # folded: these are lower case already
    # drawing nearly every query for dev still leaves the two out
    split = carve_dev_split(load_recipe(recipe), tmp_path / "split", fraction=0.9, seed=7, exclude=seen["exclude"])
    assert not set(split.dev_query_texts) & seen["exclude"] and split.dev_queries == 12


def test_cli_refusal_is_one_line_with_exit_code_2(sets):
    """Bug: the refusal surfaces as a traceback (or exit 1 after minutes of ranking) instead of the CLI's one
    `error:` line naming the field."""
    tmp = sets["tmp"]
    recipe = write_recipe(tmp / "r.yaml", sets["model"], sets["pairs"], tmp / "out", data={"dev": sets["test"]})
    result = run_cli("tune", str(recipe), "--budget", "1", "-o", str(tmp / "t"), "--test", sets["test"])
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: field '--test': ") and "same split as data.dev" in lines[0]


# ---------------------------------------------------------------------------------------------------- the order
def test_the_test_is_scored_only_after_the_final_model(sets, monkeypatch):
    """Bug: anything that scores --test before the search has chosen (the test as the trials' dev set, a base-model
    score of the test for the report, an early comparison) lets the test steer the choice. Records every training
    run and every evaluation: the test is read before the search only to be checked, and scored only after the
    final model is trained."""
    import embedkit.eval.runner as runner
    import embedkit.train.contrastive as contrastive

    tmp = sets["tmp"]
    test_folder = str(Path(sets["test"][len("beir:"):].rpartition(":")[0]))
    events: list[tuple[str, str]] = []
    evaluate, train = runner.evaluate, contrastive.train

    def recording_evaluate(encoder, tasks=None, **kwargs):
        for task in tasks or []:
            path = getattr(task, "path", None) or str(task)
            events.append(("score", "test" if test_folder in str(path) else "other"))
        return evaluate(encoder, tasks, **kwargs)

    def recording_train(recipe, *args, **kwargs):
        where = Path(recipe.training.output_dir)
        kind = "trial" if "trials" in where.parts else where.name
        events.append(("train", kind))
        result = train(recipe, *args, **kwargs)
        events.append(("trained", kind))
        return result

    monkeypatch.setattr(runner, "evaluate", recording_evaluate)
    monkeypatch.setattr(contrastive, "train", recording_train)
    recipe = write_recipe(tmp / "r.yaml", sets["model"], sets["pairs"], tmp / "out")
    # in this process (isolate=False), where the recording stand-ins see every run
    result = tune(recipe, budget="2", output=tmp / "t", seed=1, test=sets["test"], nearest_dev=False, folds=1,
                  isolate=False)
    assert result.report["test"] is not None
    tests = [i for i, e in enumerate(events) if e == ("score", "test")]
    final = events.index(("trained", "model"))
    trials = [i for i, e in enumerate(events) if e == ("trained", "trial")]
    assert len(trials) == 2 and len(tests) == 3  # base, default, tuned
    assert max(trials) < final < min(tests), events
    # the trials' dev evaluations were on the carved dev split, never the test
    assert all(e != ("score", "test") for e in events[:final]) and ("score", "other") in events[:final]


# ---------------------------------------------------------------------------------------------------- train warns
def test_train_warns_in_one_line_when_dev_is_a_test_split(tmp_path, tiny_bert_dir):
    """Bug: `embedkit train` with data.dev = a test split (and eval_every) silently restores the checkpoint the
    test liked; a dev split named dev must not warn."""
    pairs = str(write_pairs(tmp_path / "p.jsonl"))
    test = write_held_out(tmp_path / "test")
    for dev, warns in ((f"beir:{test}:test", True), (f"beir:{test}", True),
                       (f"beir:{write_held_out(tmp_path / 'dev', split='dev')}:dev", False)):
        recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, pairs, tmp_path / "out",
                              data={"dev": dev}, training={"eval_every": 2})
        result = run_cli("train", str(recipe), "--check")
        assert result.returncode == 0, result.stderr
        lines = [line for line in result.stderr.splitlines() if "test split" in line]
        assert len(lines) == (1 if warns else 0), result.stderr
        if warns:
            assert lines[0].startswith(f"embedkit train: {recipe}: data.dev ({dev}) is a test split")
