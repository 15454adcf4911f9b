"""Top-k inner-product search over a VectorSource, and row gathering, both streaming over corpus chunks.

exact: for each corpus chunk, `faiss.knn` (blocked BLAS + heaps, multithreaded) gives the chunk's top k, which is
       merged into the running top k. Memory: one chunk + queries + [queries, k] results, whatever the corpus size.
       Ties are broken by corpus position (lower first), so results do not depend on the chunk size.
hnsw:  faiss IndexHNSWFlat (inner product) built by adding chunks; approximate; holds the corpus in memory (plus
       the graph), so it trades memory for speed on very large query sets.
"""

from __future__ import annotations

import numpy as np

from embedkit.mine.vectors import VectorSource

HNSW_MIN_WORK = 5e10  # "auto" switches to HNSW when queries x documents exceeds this (exact would take hours here)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80


def choose_search(method: str, n_queries: int, n_docs: int) -> str:
    if method != "auto":
        return method
    return "hnsw" if float(n_queries) * float(n_docs) > HNSW_MIN_WORK else "exact"


def merge_topk(scores_a: np.ndarray, idx_a: np.ndarray, scores_b: np.ndarray, idx_b: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top k of two candidate lists: score descending, then index ascending; -1 indices sort last."""
    scores = np.concatenate([scores_a, scores_b], axis=1)
    idx = np.concatenate([idx_a, idx_b], axis=1)
    missing = idx < 0
    key_score = np.where(missing, np.inf, -scores.astype(np.float64))
    key_idx = np.where(missing, np.iinfo(np.int64).max, idx)
    order = np.lexsort((key_idx, key_score), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(idx, order, axis=1)


def exact_topk(queries: np.ndarray, source: VectorSource, k: int, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """[n_queries, k] scores (float32) and corpus indices (int64, -1 where the corpus has fewer than k rows)."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    nq = queries.shape[0]
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    best_i = np.full((nq, k), -1, dtype=np.int64)
    for start, chunk in source.chunks(chunk_rows):
        kk = min(k, chunk.shape[0])
        s, i = faiss.knn(queries, np.ascontiguousarray(chunk, dtype=np.float32), kk,
                         metric=faiss.METRIC_INNER_PRODUCT)
        i = np.where(i >= 0, i + start, -1)
        best_s, best_i = merge_topk(best_s, best_i, s.astype(np.float32), i.astype(np.int64), k)
    return best_s, best_i


class HnswIndex:
    """An HNSW index over the whole source, built once and searched per query block."""

    def __init__(self, source: VectorSource, chunk_rows: int) -> None:
        import faiss

        self.index = faiss.IndexHNSWFlat(source.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        for _, chunk in source.chunks(chunk_rows):
            self.index.add(np.ascontiguousarray(chunk, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.index.hnsw.efSearch = max(2 * k, 128)
        s, i = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        s = np.where(i >= 0, s, -np.inf).astype(np.float32)
        # Re-sort with the same tie order as the exact search.
        empty_s = np.empty((s.shape[0], 0), dtype=np.float32)
        return merge_topk(s, i.astype(np.int64), empty_s, np.empty((s.shape[0], 0), dtype=np.int64), k)


def gather_rows(source: VectorSource, rows: np.ndarray, chunk_rows: int) -> np.ndarray:
    """source[rows] as float32 [len(rows), dim], by one streaming pass (rows may repeat, any order)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((rows.size, source.dim), dtype=np.float32)
    if rows.size == 0:
        return out
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    for start, chunk in source.chunks(chunk_rows):
        lo, hi = np.searchsorted(sorted_rows, [start, start + chunk.shape[0]])
        if hi > lo:
            out[order[lo:hi]] = chunk[sorted_rows[lo:hi] - start]
    return out


def max_similarity_to_groups(source: VectorSource, cand_idx: np.ndarray, cand_group: np.ndarray,
                             group_ptr: np.ndarray, group_vectors: np.ndarray, chunk_rows: int,
                             sub_batch: int = 16384) -> np.ndarray:
    """For each candidate c: max over v in group_vectors[group_ptr[g]:group_ptr[g+1]] of <source[c], v>, g = its group.

    One streaming pass over the source; used for the near-duplicate filter (groups = a query's positives).
    """
    cand_idx = np.asarray(cand_idx, dtype=np.int64)
    out = np.full(cand_idx.size, -np.inf, dtype=np.float32)
    if cand_idx.size == 0:
        return out
    order = np.argsort(cand_idx, kind="stable")
    sorted_idx = cand_idx[order]
    sizes = np.diff(group_ptr)
    if sizes.size and sizes.min() < 1:
        raise ValueError("every group needs at least one vector")
    for start, chunk in source.chunks(chunk_rows):
        lo, hi = np.searchsorted(sorted_idx, [start, start + chunk.shape[0]])
        for b in range(lo, hi, sub_batch):
            sel = order[b:min(b + sub_batch, hi)]
            groups = cand_group[sel]
            reps = sizes[groups]
            vec_rows = np.repeat(np.arange(sel.size), reps)
            offsets = np.cumsum(reps) - reps
            pos_rows = np.repeat(group_ptr[groups], reps) + (np.arange(reps.sum()) - np.repeat(offsets, reps))
            dots = np.einsum("ij,ij->i", chunk[cand_idx[sel] - start][vec_rows], group_vectors[pos_rows])
            out[sel] = np.maximum.reduceat(dots, offsets) if dots.size else -np.inf
    return out
