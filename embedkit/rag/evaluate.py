"""`rag eval`: retrieval quality of an index (through embedkit.eval.metrics / pytrec_eval) and query latency.

Quality: all judged queries are encoded in one `encode` call with the eval runner's batch size and searched in
one vector-store call, so on an exact (flat) index, FAISS or Milvus, built from the same corpus the run equals
`embedkit eval`'s and so does nDCG@10. Latency: each query again on its own, as a user would send it (encode one
query + search), timed end to end; median and p95 over the queries.

Two stages (`reranker`): each query's first `rerank_top` documents of that run are ordered by the reranker through
`embedkit.eval.runner.rerank_run`, exactly as `embedkit eval --rerank` orders them (the rest keep their order below),
so the two-stage per-query values equal `embedkit eval --rerank`'s; the first stage's metrics are kept under
"first_stage", and the latency pass includes the reranking of each query's candidates.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Sequence

import numpy as np

from embedkit.errors import ConfigError, DataError
from embedkit.eval.metrics import retrieval_metrics, trec_order
from embedkit.eval.runner import DEFAULT_TOP_K, rerank_run
from embedkit.rag.filters import parse_filter
from embedkit.rag.index import DEFAULT_BATCH_SIZE, RagIndex, encode_texts, rerank_ranked

log = logging.getLogger(__name__)

DEFAULT_K_VALUES = (1, 3, 5, 10, 100)


def _recall_at(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]],
               k_values: Sequence[int]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """pytrec_eval recall@k for any k (metrics.py fixes its own set); unretrieved judged queries count as 0."""
    import pytrec_eval

    measure = "recall." + ",".join(str(k) for k in k_values)
    scores = pytrec_eval.RelevanceEvaluator({q: dict(d) for q, d in qrels.items()}, {measure}).evaluate(
        {q: dict(run[q]) for q in qrels if run.get(q)})
    per_query = {q: {f"recall_at_{k}": float(scores.get(q, {}).get(f"recall_{k}", 0.0)) for k in k_values}
                 for q in qrels}
    means = {f"recall_at_{k}": float(np.mean([v[f"recall_at_{k}"] for v in per_query.values()])) for k in k_values}
    return means, per_query


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def evaluate_index(
    index: RagIndex,
    encoder,
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    *,
    hybrid: bool = False,
    hybrid_weight: float = 0.5,
    batch_size: int = DEFAULT_BATCH_SIZE,
    latency_queries: int | None = None,
    latency_k: int = 10,
    progress: bool = False,
    reranker=None,
    rerank_top: int = DEFAULT_TOP_K,
    filter: str | None = None,
) -> dict[str, Any]:
    """Recall@k (k_values), nDCG@10, MRR@10, MAP@100 of the index's ranking, and per-query latency.

    Evaluated queries are those with judgments, in `queries` order (as the eval runner does).
    latency_queries: time only the first N of them (None: all; 0: skip the latency pass). progress: log the steps
    at INFO rather than DEBUG. reranker: a second stage over each query's first `rerank_top` documents (at most
    the depth searched, max(k_values, 100)); the metrics and per-query values are then the two-stage ones.
    filter: retrieve only documents whose metadata passes it (judged documents it excludes count as not found).
    """
    level = logging.INFO if progress else logging.DEBUG
    k_values = sorted({int(k) for k in k_values})
    if not k_values or k_values[0] < 1:
        raise ConfigError("k values must be positive integers", field="k_values")
    unknown = [q for q in qrels if q not in queries]
    if unknown:
        raise DataError(f"{len(unknown)} judged query id(s) have no query text (e.g. '{unknown[0]}')",
                        field="query-id")
    judged = {q: dict(qrels[q]) for q in queries if q in qrels}
    qids = list(judged)
    if not qids:
        raise DataError("no judged queries to evaluate")
    flt = parse_filter(filter)  # a bad filter fails before anything is encoded
    index.check_encoder(encoder)
    texts = [queries[q] for q in qids]
    top_k = max(max(k_values), DEFAULT_TOP_K)  # 100: recall@100 and MAP@100, as `embedkit eval`
    if reranker is not None and not 1 <= rerank_top <= top_k:
        raise ConfigError(f"rerank top must be between 1 and the depth searched ({top_k}), not {rerank_top}",
                          field="rerank-top")
    latency_depth = max(latency_k, rerank_top) if reranker is not None else latency_k

    log.log(level, "searching %d queries (batch)", len(qids))
    t0 = time.perf_counter()
    query_emb = encode_texts(encoder, texts, "query", batch_size)
    t1 = time.perf_counter()
    ranked = index.rank(texts, query_emb, top_k, hybrid=hybrid, hybrid_weight=hybrid_weight, filter=flt)
    t2 = time.perf_counter()
    doc_ids = index.store.doc_ids({i for row in ranked for i, *_ in row})
    run = {q: {doc_ids[i]: score for i, score, *_ in row if i in doc_ids} for q, row in zip(qids, ranked)}
    first_stage = None
    t3 = t2
    if reranker is not None:
        log.log(level, "reranking the first %d documents of %d queries", rerank_top, len(qids))
        first_stage = {"metrics": {**retrieval_metrics(judged, run).metrics, **_recall_at(judged, run, k_values)[0]}}
        faiss_id = {doc_id: i for i, doc_id in doc_ids.items()}
        head = index.store.get({faiss_id[d] for hits in run.values() for d, _ in trec_order(hits)[:rerank_top]})
        head_texts = {doc.doc_id: doc.embed_text for doc in head.values()}  # the eval runner's document text
        run = rerank_run(reranker, queries, head_texts, run, top=rerank_top, batch_size=batch_size)
        t3 = time.perf_counter()
    scores = retrieval_metrics(judged, run)
    recalls, recall_per_query = _recall_at(judged, run, k_values)
    metrics = {**scores.metrics, **recalls}
    per_query = {q: {**scores.per_query.get(q, {}), **recall_per_query[q]} for q in qids}

    n_latency = len(qids) if latency_queries is None else max(0, min(latency_queries, len(qids)))
    total, encode, search, rerank = [], [], [], []
    if n_latency:
        log.log(level, "timing %d single queries", n_latency)
        index.search(encoder, texts[0], k=latency_k, hybrid=hybrid, hybrid_weight=hybrid_weight,
                     reranker=reranker, rerank_top=latency_depth, filter=flt)  # warm-up
    for text in texts[:n_latency]:
        s0 = time.perf_counter()
        emb = encode_texts(encoder, [text], "query", batch_size)
        s1 = time.perf_counter()
        ranked_one = index.rank([text], emb, latency_depth, hybrid=hybrid, hybrid_weight=hybrid_weight, filter=flt)
        docs = index.store.get(i for i, *_ in ranked_one[0])  # fetching the passages is part of answering a query
        s2 = time.perf_counter()
        if reranker is not None:
            rerank_ranked(reranker, [text], [[r for r in ranked_one[0] if r[0] in docs]], docs, k=latency_k,
                          batch_size=batch_size)
        s3 = time.perf_counter()
        total.append((s3 - s0) * 1000)
        encode.append((s1 - s0) * 1000)
        search.append((s2 - s1) * 1000)
        rerank.append((s3 - s2) * 1000)
    latency = {"queries": n_latency, "k": latency_k,
               "median_ms": _percentile(total, 50), "p95_ms": _percentile(total, 95),
               "mean_ms": float(np.mean(total)) if total else float("nan"),
               "encode_median_ms": _percentile(encode, 50), "search_median_ms": _percentile(search, 50),
               "search_p95_ms": _percentile(search, 95)}
    retrieval: dict[str, Any] = {"hybrid": hybrid, "hybrid_weight": hybrid_weight if hybrid else None,
                                 "filter": flt.text if flt is not None else None}
    result: dict[str, Any] = {
        "metrics": metrics,
        "latency": latency,
        "batch": {"queries": len(qids), "encode_s": t1 - t0, "search_s": t2 - t1, "top_k": top_k},
        "retrieval": retrieval,
        "index": index.describe(),
        "per_query": per_query,
    }
    if reranker is not None:  # a two-stage result: the reranker is part of what was evaluated, as the model is
        retrieval["rerank_top"] = rerank_top
        latency.update(rerank_depth=latency_depth, rerank_median_ms=_percentile(rerank, 50))
        result["batch"]["rerank_s"] = t3 - t2
        result["reranker"] = reranker.describe()
        result["first_stage"] = first_stage
    return result
