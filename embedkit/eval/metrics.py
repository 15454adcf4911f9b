"""Metric core: retrieval metrics through pytrec_eval, STS correlations through scipy.

Names and definitions follow mteb (`ndcg_at_10`, `recall_at_100`, `mrr_at_10`, `map_at_100`,
`cosine_spearman`, ...) so a number here can be put next to a number on the MTEB leaderboard.
Every function keeps the per-query (per-pair) values: the paired significance tests in
`embedkit.eval.compare` need them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

# The metrics every retrieval report carries; the first is the main metric (as in mteb/BEIR).
RETRIEVAL_METRICS = ("ndcg_at_10", "recall_at_1", "recall_at_10", "recall_at_100", "mrr_at_10", "map_at_100")
RETRIEVAL_MAIN_METRIC = "ndcg_at_10"
STS_METRICS = ("cosine_spearman", "cosine_pearson")
STS_MAIN_METRIC = "cosine_spearman"

# metric name -> pytrec_eval measure (the key pytrec_eval returns)
_PYTREC_MEASURES = {
    "ndcg_at_10": "ndcg_cut_10",
    "recall_at_1": "recall_1",
    "recall_at_10": "recall_10",
    "recall_at_100": "recall_100",
    "map_at_100": "map_cut_100",
}
_MRR_CUTOFF = 10


@dataclass
class RetrievalScores:
    """Mean metrics over the evaluated queries, and each query's own values (qid -> metric -> value)."""

    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]] = field(repr=False)


@dataclass
class StsScores:
    """Correlations of predicted similarity with gold scores, and the pairs they were computed from."""

    metrics: dict[str, float]
    predicted: list[float] = field(repr=False)
    gold: list[float] = field(repr=False)


def trec_order(doc_scores: Mapping[str, float]) -> list[tuple[str, float]]:
    """Rank documents the way trec_eval / pytrec_eval do: score descending, ties by doc id descending.

    Using the same order everywhere (top-k cut, MRR cut, pytrec_eval itself) is what keeps our numbers
    equal to mteb's, which sorts the same way.
    """
    return sorted(doc_scores.items(), key=lambda item: (item[1], item[0]), reverse=True)


def retrieval_metrics(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]
) -> RetrievalScores:
    """Score a run (qid -> doc id -> similarity) against relevance judgements (qid -> doc id -> grade).

    Evaluated queries are those with at least one judgement (mteb drops the others too). A judged query
    missing from the run scores 0 on every metric rather than being silently left out of the mean.
    MRR@10 is pytrec_eval's `recip_rank` on the run cut to its 10 best documents (`recip_rank` has no cutoff).
    """
    import pytrec_eval

    judged = {qid: {str(d): int(g) for d, g in docs.items()} for qid, docs in qrels.items() if len(docs) > 0}
    if not judged:
        return RetrievalScores(metrics={name: 0.0 for name in RETRIEVAL_METRICS}, per_query={})
    full_run = {qid: {str(d): float(s) for d, s in run.get(qid, {}).items()} for qid in judged}
    full_run = {qid: docs for qid, docs in full_run.items() if docs}
    top10_run = {qid: dict(trec_order(docs)[:_MRR_CUTOFF]) for qid, docs in full_run.items()}

    measures = {"ndcg_cut.10", "recall.1,10,100", "map_cut.100"}
    scores = pytrec_eval.RelevanceEvaluator(judged, measures).evaluate(full_run)
    rr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(top10_run)

    per_query: dict[str, dict[str, float]] = {}
    for qid in sorted(judged):
        values = {name: float(scores.get(qid, {}).get(measure, 0.0)) for name, measure in _PYTREC_MEASURES.items()}
        values["mrr_at_10"] = float(rr.get(qid, {}).get("recip_rank", 0.0))
        per_query[qid] = {name: values[name] for name in RETRIEVAL_METRICS}
    means = {name: float(np.mean([q[name] for q in per_query.values()])) for name in RETRIEVAL_METRICS}
    return RetrievalScores(metrics=means, per_query=per_query)


def sts_correlations(predicted: np.ndarray | list[float], gold: np.ndarray | list[float]) -> dict[str, float]:
    """Spearman and Pearson correlation of predicted similarities with gold scores (scipy)."""
    from scipy.stats import pearsonr, spearmanr

    predicted = np.asarray(predicted, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    if predicted.shape != gold.shape or predicted.ndim != 1:
        raise ValueError(f"predicted {predicted.shape} and gold {gold.shape} must be 1-d and of equal length")
    if len(gold) < 2:
        raise ValueError("a correlation needs at least 2 pairs")
    return {
        "cosine_spearman": float(spearmanr(gold, predicted).statistic),
        "cosine_pearson": float(pearsonr(gold, predicted).statistic),
    }


def sts_metrics(predicted: np.ndarray | list[float], gold: np.ndarray | list[float]) -> StsScores:
    """STS scores plus the per-pair values a paired bootstrap needs (it recomputes Spearman on resamples)."""
    predicted_list = [float(x) for x in np.asarray(predicted, dtype=np.float64)]
    gold_list = [float(x) for x in np.asarray(gold, dtype=np.float64)]
    return StsScores(metrics=sts_correlations(predicted_list, gold_list), predicted=predicted_list, gold=gold_list)


def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row i of `a` with row i of `b` (float64, robust to unnormalised rows)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.maximum(norms, 1e-12)
