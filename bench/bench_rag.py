"""RAG index search: flat (exact) vs HNSW latency per single query, and HNSW recall@10 against flat.

Vectors are random unit vectors (no model), so this measures the index alone; random data is the hard case for
HNSW recall (no cluster structure), so real embeddings do at least as well. It checks the "auto" threshold in
embedkit/rag/index.py: below it exact search is cheap enough, above it HNSW pays off.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_rag.py --sizes 10000,50000 --dim 384

With --rag-index (a flat index from `embedkit rag index`) and --beir (its BEIR folder), it instead builds HNSW over
the index's real document vectors and compares it with exact search on the folder's test queries (recall@10 of
HNSW against flat, and nDCG@10 of both):

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_rag.py --rag-index runs/scifact-index \
        --beir ../shared/data/scifact
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def main() -> None:
    import faiss

    from embedkit.rag.index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rag-index", default=None, help="a flat RAG index: use its real vectors")
    parser.add_argument("--beir", default=None, help="with --rag-index: the BEIR folder whose test queries to use")
    args = parser.parse_args()
    if args.rag_index:
        return real_vectors(args)
    rng = np.random.default_rng(args.seed)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        docs, queries = unit(rng, n, args.dim), unit(rng, args.queries, args.dim)
        flat = faiss.IndexIDMap2(faiss.IndexFlatIP(args.dim))
        flat.add_with_ids(docs, np.arange(n))
        graph = faiss.IndexHNSWFlat(args.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        hnsw = faiss.IndexIDMap2(graph)
        t0 = time.perf_counter()
        hnsw.add_with_ids(docs, np.arange(n))
        build_s = time.perf_counter() - t0
        params = faiss.SearchParametersHNSW(efSearch=HNSW_EF_SEARCH)
        result = {"documents": n, "dim": args.dim, "hnsw_build_s": round(build_s, 2)}
        found = {}
        for name, index, p in (("flat", flat, None), ("hnsw", hnsw, params)):
            times, ids = [], []
            for q in queries:  # one query at a time, as a user sends them
                s = time.perf_counter()
                _, i = index.search(q[None, :], args.k, params=p)
                times.append((time.perf_counter() - s) * 1000)
                ids.append(i[0])
            found[name] = ids
            result[f"{name}_median_ms"] = round(float(np.median(times)), 3)
            result[f"{name}_p95_ms"] = round(float(np.percentile(times, 95)), 3)
        result["hnsw_recall_at_10"] = round(float(np.mean(
            [len(set(a) & set(b)) / args.k for a, b in zip(found["flat"], found["hnsw"])])), 4)
        rows.append(result)
        print(json.dumps(result), flush=True)


def real_vectors(args) -> None:
    import faiss

    from embedkit.data.beir import load_beir
    from embedkit.eval.metrics import retrieval_metrics
    from embedkit.rag.index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, RagIndex, encode_texts, load_index_encoder

    index = RagIndex.load(args.rag_index)
    assert index.index_type == "flat", "--rag-index must be a flat index (its vectors are the reference)"
    ids = np.array(sorted(index.store.doc_ids(range(index.manifest["index"]["next_id"]))), dtype=np.int64)
    docs = index.vectors.reconstruct(ids)
    doc_id = index.store.doc_ids(ids.tolist())
    data = load_beir(args.beir, "test")
    qids = data.judged_query_ids()
    encoder = load_index_encoder(index)
    queries = encode_texts(encoder, [data.queries[q] for q in qids], "query", 32)
    graph = faiss.IndexHNSWFlat(docs.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    hnsw = faiss.IndexIDMap2(graph)
    t0 = time.perf_counter()
    hnsw.add_with_ids(docs, ids)
    build_s = time.perf_counter() - t0
    result = {"documents": len(ids), "queries": len(qids), "hnsw_build_s": round(build_s, 2)}
    found = {}
    for name, idx, p in (("flat", index.vectors.index, None),
                         ("hnsw", hnsw, faiss.SearchParametersHNSW(efSearch=HNSW_EF_SEARCH))):
        times, rows = [], []
        for q in queries:
            s = time.perf_counter()
            scores, hits = idx.search(q[None, :], 100, params=p)
            times.append((time.perf_counter() - s) * 1000)
            rows.append((hits[0], scores[0]))
        found[name] = rows
        run = {qid: {doc_id[int(i)]: float(sc) for i, sc in zip(h, sc_) if i >= 0} for qid, (h, sc_) in zip(qids, rows)}
        result[f"{name}_ndcg_at_10"] = round(retrieval_metrics({q: data.qrels[q] for q in qids}, run)
                                             .metrics["ndcg_at_10"], 4)
        result[f"{name}_median_ms"] = round(float(np.median(times)), 3)
    result["hnsw_recall_at_10_vs_flat"] = round(float(np.mean(
        [len(set(a[0][:10]) & set(b[0][:10])) / 10 for a, b in zip(found["flat"], found["hnsw"])])), 4)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
