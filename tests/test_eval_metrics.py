"""Metric core: hand-computed values, the MRR@10 cutoff, tie order, and agreement with mteb and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from embedkit.eval.metrics import RETRIEVAL_METRICS, retrieval_metrics, sts_correlations, sts_metrics, trec_order


def test_hand_computed_single_query():
    qrels = {"q1": {"d1": 1}}
    run = {"q1": {"d2": 0.9, "d1": 0.8, "d3": 0.1}}
    scores = retrieval_metrics(qrels, run)
    m = scores.metrics
    assert m["ndcg_at_10"] == pytest.approx(1 / math.log2(3))
    assert m["mrr_at_10"] == pytest.approx(0.5)
    assert m["recall_at_1"] == 0.0
    assert m["recall_at_10"] == 1.0
    assert m["map_at_100"] == pytest.approx(0.5)
    assert scores.per_query["q1"]["mrr_at_10"] == pytest.approx(0.5)


def test_mrr_is_cut_at_10():
    # the only relevant document is ranked 11th: MRR@10 must be 0 (plain recip_rank would give 1/11)
    run = {"q1": {f"d{i:02d}": 1.0 - i / 100 for i in range(20)}}
    scores = retrieval_metrics({"q1": {"d10": 1}}, run)
    assert scores.metrics["mrr_at_10"] == 0.0
    assert scores.metrics["recall_at_100"] == 1.0
    assert scores.metrics["map_at_100"] == pytest.approx(1 / 11)


def test_ties_follow_trec_order_doc_id_descending():
    assert [d for d, _ in trec_order({"a": 0.5, "c": 0.5, "b": 0.7})] == ["b", "c", "a"]
    # with tied scores, "b" ranks before "a", so a relevant "a" is at rank 2
    scores = retrieval_metrics({"q": {"a": 1}}, {"q": {"a": 0.5, "b": 0.5}})
    assert scores.metrics["mrr_at_10"] == pytest.approx(0.5)


def test_judged_query_missing_from_run_scores_zero_and_counts():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    scores = retrieval_metrics(qrels, {"q1": {"d1": 1.0}})
    assert scores.per_query["q2"] == {name: 0.0 for name in RETRIEVAL_METRICS}
    assert scores.metrics["ndcg_at_10"] == pytest.approx(0.5)


def test_equal_to_mteb_on_random_run_with_ties():
    from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores

    rng = np.random.default_rng(0)
    docs = [f"doc{i}" for i in range(150)]
    qrels, run = {}, {}
    for q in range(40):
        qid = f"q{q}"
        relevant = rng.choice(docs, size=rng.integers(1, 6), replace=False)
        qrels[qid] = {d: int(rng.integers(1, 3)) for d in relevant}
        # rounded scores create many ties, which is where orderings usually disagree
        run[qid] = {d: float(np.round(rng.random(), 2)) for d in docs}
    ours = retrieval_metrics(qrels, run).metrics
    theirs = calculate_retrieval_scores(run, qrels, [1, 10, 100])  # rounded to 5 decimals
    assert ours["ndcg_at_10"] == pytest.approx(theirs.ndcg["NDCG@10"], abs=1e-5)
    assert ours["recall_at_1"] == pytest.approx(theirs.recall["Recall@1"], abs=1e-5)
    assert ours["recall_at_10"] == pytest.approx(theirs.recall["Recall@10"], abs=1e-5)
    assert ours["recall_at_100"] == pytest.approx(theirs.recall["Recall@100"], abs=1e-5)
    assert ours["map_at_100"] == pytest.approx(theirs.map["MAP@100"], abs=1e-5)
    assert ours["mrr_at_10"] == pytest.approx(theirs.mrr["MRR@10"], abs=1e-5)


def test_sts_correlations_equal_scipy():
    rng = np.random.default_rng(3)
    gold = rng.random(200) * 5
    predicted = gold / 5 + rng.normal(0, 0.3, 200)
    result = sts_correlations(predicted, gold)
    assert result["cosine_spearman"] == pytest.approx(spearmanr(gold, predicted).statistic, abs=1e-12)
    assert result["cosine_pearson"] == pytest.approx(pearsonr(gold, predicted).statistic, abs=1e-12)
    kept = sts_metrics(predicted, gold)
    assert kept.predicted == pytest.approx(list(predicted)) and kept.gold == pytest.approx(list(gold))


def test_sts_correlations_reject_mismatched_lengths():
    with pytest.raises(ValueError):
        sts_correlations([0.1, 0.2, 0.3], [1.0, 2.0])
