"""Regression gate: exit codes 0 / 1 / 2, the paired tests, reproducibility with a seed."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from embedkit.errors import DataError
from embedkit.eval.compare import (
    EXIT_NOT_COMPARABLE,
    EXIT_OK,
    EXIT_REGRESSION,
    compare,
    load_report,
    paired_bootstrap_spearman_pvalue,
    paired_randomization_pvalue,
)
from embedkit.eval.metrics import sts_correlations


def retrieval_task(per_query_ndcg: np.ndarray, data_hash: str = "h1") -> dict:
    per_query = {f"q{i:03d}": {"ndcg_at_10": float(v), "mrr_at_10": float(v)} for i, v in enumerate(per_query_ndcg)}
    return {
        "task": {"name": "ret", "type": "retrieval", "main_metric": "ndcg_at_10", "data_hash": data_hash},
        "metrics": {"ndcg_at_10": float(np.mean(per_query_ndcg)), "mrr_at_10": float(np.mean(per_query_ndcg))},
        "per_query": per_query,
    }


def sts_task(predicted: np.ndarray, gold: np.ndarray, data_hash: str = "s1") -> dict:
    return {
        "task": {"name": "sts", "type": "sts", "main_metric": "cosine_spearman", "data_hash": data_hash},
        "metrics": sts_correlations(predicted, gold),
        "per_pair": {"predicted": [float(x) for x in predicted], "gold": [float(x) for x in gold]},
    }


@pytest.fixture()
def base_report():
    rng = np.random.default_rng(0)
    gold = rng.random(300) * 5
    return {
        "results": {
            "ret": retrieval_task(rng.random(200)),
            "sts": sts_task(gold + rng.normal(0, 0.5, 300), gold),
        }
    }


def test_same_report_is_ok_with_p_one(base_report):
    result = compare(base_report, copy.deepcopy(base_report))
    assert result.exit_code == EXIT_OK
    assert all(t.difference == 0 and t.p_value == 1.0 for t in result.tasks)


def test_clearly_worse_retrieval_is_a_regression(base_report):
    worse = copy.deepcopy(base_report)
    base = np.array([v["ndcg_at_10"] for _, v in sorted(base_report["results"]["ret"]["per_query"].items())])
    worse["results"]["ret"] = retrieval_task(base * 0.8)
    result = compare(base_report, worse, seed=1, resamples=500)
    assert result.exit_code == EXIT_REGRESSION
    ret = next(t for t in result.tasks if t.task == "ret")
    assert ret.verdict == "regression" and ret.p_value < 0.01 and "randomization" in ret.method
    assert "mrr_at_10" in ret.other_metrics


def test_clearly_worse_sts_is_a_regression(base_report):
    gold = np.array(base_report["results"]["sts"]["per_pair"]["gold"])
    worse = copy.deepcopy(base_report)
    worse["results"]["sts"] = sts_task(gold + np.random.default_rng(5).normal(0, 3.0, len(gold)), gold)
    result = compare(base_report, worse, resamples=500)
    sts = next(t for t in result.tasks if t.task == "sts")
    assert result.exit_code == EXIT_REGRESSION and sts.verdict == "regression"
    assert "bootstrap" in sts.method and sts.p_value < 0.01


def test_small_drop_within_max_drop_passes(base_report):
    base = np.array([v["ndcg_at_10"] for _, v in sorted(base_report["results"]["ret"]["per_query"].items())])
    slightly = copy.deepcopy(base_report)
    slightly["results"]["ret"] = retrieval_task(base - 0.005)  # consistent, hence significant, but small
    assert compare(base_report, slightly, max_drop=0.01, resamples=500).exit_code == EXIT_OK
    assert compare(base_report, slightly, max_drop=0.001, resamples=500).exit_code == EXIT_REGRESSION


def test_insignificant_large_drop_passes():
    # two queries: one drops by 0.5, one rises by 0.3 -- a mean drop of 0.1 that a sign flip reproduces easily
    base = {"results": {"ret": retrieval_task(np.array([0.9, 0.2]))}}
    cand = {"results": {"ret": retrieval_task(np.array([0.4, 0.5]))}}
    result = compare(base, cand)
    assert result.exit_code == EXIT_OK and "not significant" in result.tasks[0].reason


def test_different_data_or_tasks_are_not_comparable(base_report):
    other_data = copy.deepcopy(base_report)
    other_data["results"]["ret"]["task"]["data_hash"] = "h2"
    result = compare(base_report, other_data)
    assert result.exit_code == EXIT_NOT_COMPARABLE and "different data" in result.reason
    fewer = copy.deepcopy(base_report)
    del fewer["results"]["sts"]
    result = compare(base_report, fewer)
    assert result.exit_code == EXIT_NOT_COMPARABLE and "task sets" in result.reason


def test_pvalues_are_reproducible_with_a_seed_and_sensible():
    rng = np.random.default_rng(2)
    a = rng.random(100)
    b = a - 0.05 + rng.normal(0, 0.2, 100)
    p1 = paired_randomization_pvalue(a, b, permutations=500, rng=np.random.default_rng(7))
    p2 = paired_randomization_pvalue(a, b, permutations=500, rng=np.random.default_rng(7))
    assert p1 == p2
    # a better candidate gives a large one-sided p-value
    assert paired_randomization_pvalue(a, a + 0.1, permutations=500, rng=np.random.default_rng(0)) > 0.9
    gold = rng.random(80)
    assert paired_bootstrap_spearman_pvalue(gold, gold, gold + rng.normal(0, 1, 80), resamples=300,
                                            rng=np.random.default_rng(0)) < 0.01


def test_load_report_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json:1"):
        load_report(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"hello": 1}))
    with pytest.raises(DataError, match="field 'results'"):
        load_report(wrong)
