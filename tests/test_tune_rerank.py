"""`embedkit tune` on a reranker recipe (task: rerank, issue #31): reranker trials scored two-stage on the carved dev
split, the reranker's search space, `--test` with the first stage alone, the default and the tuned reranker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from embedkit.errors import ConfigError
from embedkit.train.config import load_recipe, parse_recipe
from embedkit.tune.run import tune
from test_tune import HELD_OUT, PAIRS, run_cli, write_beir, write_held_out

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EMBEDDING_ONLY = {"temperature", "mined_negatives", "mining_range", "relative_margin", "margin_from"}


def rerank_recipe(path: Path, start: Path, first_stage: Path | None, train: str, out: Path, **sections) -> Path:
    """A tiny cross-encoder recipe: the tiny BERT start, st_bert as the first stage mining 2 negatives per row."""
    raw = {"task": "rerank", "model": {"name": str(start), "max_length": 48},
           "data": {"train": train},
           "mining": {"range": "0:8", "relative_margin": None},
           "loss": {"hard_negatives": 2},
           "training": {"output_dir": str(out), "batch_size": 4, "lr": 1e-3, "epochs": 1, "seed": 7,
                        "progress": False, "threads": 1}}
    if first_stage is not None:
        raw["rerank"] = {"first_stage": str(first_stage), "top_k": 10}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_rerank_recipe_tunes_end_to_end_and_compares_two_stages_on_test(tmp_path, tiny_bert_dir, st_bert):
    """Bugs caught: the trials train bi-encoders (the contrastive step on a cross-encoder start) or search the
    bi-encoder's space; --test compares the rerankers alone (no first stage) or against the start's own ranking; the
    written recipe does not reproduce the tuned reranker."""
    from safetensors.torch import load_file

    from embedkit.train.rerank import train_reranker

    beir = write_beir(tmp_path / "beir", graded=False)
    write_held_out(tmp_path / "test")
    recipe = rerank_recipe(tmp_path / "r.yaml", tiny_bert_dir, st_bert, f"beir:{beir}:train", tmp_path / "out")
    out = tmp_path / "tuned"
    result = run_cli("tune", str(recipe), "--budget", "2", "-o", str(out), "--seed", "1", "--folds", "2",
                     "--test", f"beir:{tmp_path / 'test'}:test", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["trials"] == 2 and summary["metric"] == "ndcg_at_10"
    assert set(summary["test"]) == {"tuned_vs_first_stage", "tuned_vs_default"}
    report = json.loads((out / "tune_report.json").read_text())
    assert report["task"] == "rerank" and report["rerank"]["first_stage_dev"] is not None
    names = {p["name"] for p in report["space"]}
    assert names == {"lr", "epochs", "hard_negatives", "loss_type", "warmup_ratio"}
    for trial in report["trials"]:  # reranker trials: two-stage scores beside the first stage's own
        assert trial["state"] == "complete" and trial["first_stage"] == report["rerank"]["first_stage_dev"]
        assert set(trial["params"]) == names
    # the test: the first stage alone, and the default and tuned rerankers each over its top rerank.top_k
    first = json.loads((out / "test" / "first_stage.json").read_text())
    tuned = json.loads((out / "test" / "tuned.json").read_text())
    assert first["manifest"].get("reranker") is None and tuned["manifest"]["reranker"]["kind"] == "cross-encoder"
    assert tuned["manifest"]["settings"]["rerank_top"] == 10
    (task,) = tuned["results"].values()
    assert set(task["per_query"]) == {f"t{i}" for i in range(len(HELD_OUT))}
    assert task["first_stage"]["metrics"]["ndcg_at_10"] == pytest.approx(
        next(iter(first["results"].values()))["metrics"]["ndcg_at_10"])
    # Bug caught: a searched key the recipe does not write (loss.type, training.warmup_ratio here) counted as a
    # change at its default value, so "nothing changed" reported changes and --test trained the default again
    if report["chosen"] == report["trials"][0]["params"]:
        assert report["changes"] == [] and report["test"]["default_model"] == str(out / "model")
    markdown = (out / "tune_report.md").read_text()
    for text in ("two-stage", "first stage alone", "tuned vs first_stage", "## Test:"):
        assert text in markdown, text
    # the written recipe is a reranker recipe that trains the same weights again
    again = train_reranker(load_recipe(out / "tuned_recipe.yaml", [f"training.output_dir={tmp_path / 'again'}"]))
    a, b = load_file(str(out / "model" / "model.safetensors")), load_file(str(again.output_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_reranker_trial_is_scored_by_reranking_the_first_stage(tmp_path, tiny_bert_dir, monkeypatch):
    """Bug caught: trials scored with the first stage alone (every trial would get the same dev score, and the
    search would choose by noise in its tie-breaking): the reranker must be called on the first stage's top
    rerank.top_k of every dev query, and the trial's score must be that reranked ranking's, not the first stage's."""
    from embedkit.eval import runner

    calls = []
    real = runner.rerank_run

    def spy(reranker, queries, documents, run, *, top, batch_size=32):
        calls.append((type(reranker).__name__, top, len(run)))
        return real(reranker, queries, documents, run, top=top, batch_size=batch_size)

    monkeypatch.setattr(runner, "rerank_run", spy)
    beir = write_beir(tmp_path / "beir", graded=False)
    # the first stage: the plain tiny BERT, which does not normalise its vectors (eval ranks by cosine)
    recipe = rerank_recipe(tmp_path / "r.yaml", tiny_bert_dir, tiny_bert_dir, f"beir:{beir}:train", tmp_path / "out")
    result = tune(recipe, budget="1", output=tmp_path / "t", final=False, folds=1, isolate=False, dev_docs=0)
    (trial,) = result.trials
    assert calls and all(kind == "Reranker" and top == 10 for kind, top, _ in calls)
    assert calls[-1][2] == result.split.dev_queries
    assert trial.first_stage is not None and trial.value != pytest.approx(trial.first_stage)
    # Bug caught: the dev's first stage ranking by unnormalised dot products where `embedkit eval --rerank` ranks
    # by cosine: its score is the first stage's own as `embedkit eval` gives it on the dev split
    from embedkit.eval.runner import evaluate
    from embedkit.models import load_model

    alone = evaluate(load_model(tiny_bert_dir), [result.split.dev_spec], use_cache=False)
    assert trial.first_stage == pytest.approx(next(iter(alone["results"].values()))["metrics"]["ndcg_at_10"])


def test_the_reranker_space_has_no_embedding_only_dimensions(tmp_path):
    """Bug caught: a reranker's trials proposing a temperature, a mining window or online mining, which the rerank
    recipe refuses (every trial would fail) or ignores (trials that differ in nothing)."""
    from embedkit.tune.space import PARAMS_BY_TASK, build_space, defaults, recipe_overrides

    def recipe(**sections):
        raw = {"task": "rerank", "model": {"name": "minilm"}, "data": {"train": "rows.jsonl"},
               "rerank": {"first_stage": "minilm"}, "loss": {"hard_negatives": 3},
               "training": {"output_dir": "o", "warmup_ratio": 0.1}}
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return parse_recipe(raw)

    space = build_space(recipe(), steps_per_epoch=10)
    names = {p.name for p in space}
    assert names == {"lr", "epochs", "hard_negatives", "loss_type", "warmup_ratio"} and not names & EMBEDDING_ONLY
    assert set(PARAMS_BY_TASK["rerank"]).isdisjoint(EMBEDDING_ONLY)
    by_name = {p.name: p for p in space}
    assert by_name["loss_type"].choices == ("listwise", "bce") and by_name["hard_negatives"].low == 1
    assert by_name["hard_negatives"].high == 7  # mined at the start: a reranker's group of 8
    # rows that carry their negatives: no more than they hold
    assert {p.name: p for p in build_space(recipe(), negatives_in_data=4)}["hard_negatives"].high == 4
    # trial 0 is the recipe as written, and its overrides change nothing
    trial_0 = recipe_overrides(space, defaults(space))
    assert trial_0["loss.type"] == "listwise" and trial_0["training.warmup_ratio"] == 0.1
    # a yes/no reranker with LoRA searches its rank too; teacher scores keep the loss's kind
    assert "lora_r" in {p.name for p in build_space(recipe(adapter={"type": "lora", "r": 8, "alpha": 16}))}
    distilled = recipe(loss={"distillation": "kl"})
    assert "loss_type" not in {p.name for p in build_space(distilled)}


def test_invalid_reranker_searches_are_refused_in_one_line(tmp_path, tiny_bert_dir, st_bert):
    """Bug caught: an embedding-only parameter asked of a reranker, a reranker without a first stage (no two-stage
    dev score) or a reranker recipe with an embedding setting fails deep inside a trial, with a traceback, after
    the dev split was carved."""
    beir = write_beir(tmp_path / "beir", graded=False)
    recipe = rerank_recipe(tmp_path / "r.yaml", tiny_bert_dir, st_bert, f"beir:{beir}:train", tmp_path / "out")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"query": q, "positive": p, "negatives": [PAIRS[0][1], PAIRS[4][1]]}) + "\n"
                            for q, p in PAIRS[1:]))
    no_first_stage = rerank_recipe(tmp_path / "n.yaml", tiny_bert_dir, None, str(rows), tmp_path / "out")
    cases = [
        (dict(recipe_path=recipe, params=["temperature"]), "task: rerank"),
        (dict(recipe_path=recipe, params=["loss_type", "mining_range"]), "mining_range"),
        (dict(recipe_path=no_first_stage), "rerank.first_stage"),
        (dict(recipe_path=recipe, overrides=["model.pooling=mean"]), "model.pooling"),
        (dict(recipe_path=recipe, overrides=["mining.online=true"]), "mining.online"),
    ]
    for i, (kwargs, expected) in enumerate(cases):
        output = tmp_path / f"t{i}"
        with pytest.raises(ConfigError) as info:
            tune(budget="1", output=output, final=False, isolate=False, **kwargs)
        assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)
        assert not output.exists()
