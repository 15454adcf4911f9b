"""Our tasks as mteb custom tasks and our encoder as an mteb model: mteb.evaluate must reproduce our numbers.

Marked integration only because `mteb.evaluate` imports sentence-transformers + transformers (~10 s);
the encoder here is the fake one.
"""

from __future__ import annotations

import pytest
from test_eval_support import FakeEncoder, write_beir, write_sts

from embedkit.errors import ConfigError
from embedkit.eval.mteb_adapter import mteb_encoder, to_mteb_task
from embedkit.eval.runner import evaluate
from embedkit.eval.tasks import load_task, parse_task_spec


@pytest.mark.integration
def test_mteb_evaluate_on_our_tasks_matches_our_runner(tmp_path, monkeypatch):
    import mteb
    from mteb.cache import ResultCache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    beir = write_beir(tmp_path / "tiny")
    sts = write_sts(tmp_path / "pairs" / "test.jsonl", n=60)
    specs = [parse_task_spec(f"beir:{beir}"), parse_task_spec(f"sts:{sts}")]
    ours = evaluate(FakeEncoder(), specs, cache_dir=tmp_path / "cache", use_cache=False)["results"]

    encoder = FakeEncoder()
    tasks = [to_mteb_task(load_task(spec)) for spec in specs]
    result = mteb.evaluate(mteb_encoder(encoder), tasks, cache=ResultCache(str(tmp_path / "mteb")),
                           show_progress_bar=False)
    by_name = {r.task_name: next(iter(r.scores.values()))[0] for r in result.task_results}
    retrieval = by_name["embedkit-tiny-test"]
    for metric in ("ndcg_at_10", "recall_at_1", "recall_at_10", "recall_at_100", "mrr_at_10", "map_at_100"):
        assert retrieval[metric] == pytest.approx(ours["tiny-test"]["metrics"][metric], abs=1e-5), metric
    sts_scores = by_name["embedkit-pairs-test"]
    assert sts_scores["cosine_spearman"] == pytest.approx(ours["pairs-test"]["metrics"]["cosine_spearman"], abs=1e-5)
    # mteb asked our wrapper for query and document embeddings separately
    assert {kind for kind, _ in encoder.calls} == {"query", "document"}


def test_mteb_specs_have_no_custom_task_form():
    with pytest.raises(ConfigError):
        to_mteb_task(load_task(parse_task_spec("mteb:SciFact")))


def test_unknown_mteb_task_fails_before_any_encoding(tmp_path):
    encoder = FakeEncoder()
    with pytest.raises(ConfigError, match="unknown mteb task 'NoSuchTask'"):
        evaluate(encoder, ["mteb:NoSuchTask"], cache_dir=tmp_path)
    assert encoder.calls == []
