"""FAISS, the default store: one file (index.faiss) in the index folder, searched in process.

"flat" is exact inner product; "hnsw" (graph) and "ivf" (inverted lists) are approximate; "ivfpq" is IVF over
product-quantized codes (a 384-d vector in 48 bytes instead of 1,536), approximate twice: in the lists probed and in
the scores, which come from the codes (as do the vectors hybrid search reconstructs). FAISS keeps no metadata: a
filter is evaluated over the metadata in the document store (`Filter.matches`) and the ids that pass become an
IDSelector, so filtered search stays exact on a flat index. HNSW graphs cannot drop a node, so deleted ids
are tombstones (kept by the document store) that an IDSelector keeps out of every search.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from embedkit.errors import ConfigError, DataError
from embedkit.rag.filters import Filter
from embedkit.rag.vectors.base import Results, VectorStore

INDEX_FILE = "index.faiss"
HNSW_M = 32  # graph degree: FAISS' usual choice for 384-1024-d text embeddings
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128  # recall@10 0.999 of exact on SciFact/MiniLM (bench/bench_rag.py); raised to k when k is larger
PQ_NBITS = 8  # 256 centroids per sub-quantizer: one byte a sub-vector, the code FAISS scans fastest
# Every codebook is trained by k-means on the corpus: FAISS wants 39 points per centroid (it warns below, and refuses
# fewer points than centroids). A fixed 8 bits rather than fewer on small corpora: a codebook trained on a small
# first corpus would encode every later `rag add`; and below ~10,000 documents flat's memory is small anyway.
PQ_MIN_DOCUMENTS = 39 * 2 ** PQ_NBITS  # 9,984
FILTER_CACHE = 16  # filters whose passing ids a loaded index remembers (the same filter is usually sent again)


def _faiss():
    import faiss

    return faiss


def pq_subquantizers(dim: int) -> int:
    """IVF-PQ's m: sub-vectors of about 8 floats, one byte each (48 for a 384-d model: 32x less than flat's float32
    vectors); the largest divisor of `dim` not above dim / 8, since FAISS cuts a vector into m equal parts."""
    target = max(1, dim // 8)
    return next(m for m in range(target, 0, -1) if dim % m == 0)


def check_ivfpq_documents(n: int) -> None:
    """Refuse an IVF-PQ index over too few documents to train its codebooks (before anything is encoded)."""
    if n < PQ_MIN_DOCUMENTS:
        raise ConfigError(f"ivfpq needs at least {PQ_MIN_DOCUMENTS:,} documents to train its codebooks "
                          f"({2 ** PQ_NBITS} centroids per sub-vector, 39 points each), not {n:,}: use flat (exact; "
                          "small at this size) or ivf", field="index-type")


def new_faiss_index(kind: str, vectors: np.ndarray) -> tuple[Any, dict[str, Any]]:
    faiss = _faiss()
    n, dim = vectors.shape
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), {}
    if kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return faiss.IndexIDMap2(graph), {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION,
                                          "ef_search": HNSW_EF_SEARCH}
    # IVF: ~4 sqrt(n) lists, but at least 39 training points per list (FAISS warns below that).
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    nprobe = min(nlist, max(8, nlist // 16))
    params: dict[str, Any] = {"nlist": nlist, "nprobe": nprobe}
    if kind == "ivfpq":  # the same lists and probes as IVF; only the vectors in them are compressed
        check_ivfpq_documents(n)
        m = pq_subquantizers(dim)
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, PQ_NBITS, faiss.METRIC_INNER_PRODUCT)
        params.update(m=m, nbits=PQ_NBITS)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 1  # nlist <= n/39 already; this only silences the 1-list case of tiny corpora
    index.train(vectors)
    # IVF takes ids natively (no IDMap: IndexIDMap's removal assumes a compacting index); a hashtable direct map
    # lets hybrid search reconstruct vectors by id and survives removals.
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index, params


class FaissVectors(VectorStore):
    kind = "faiss"
    index_types = ("flat", "hnsw", "ivf", "ivfpq")

    def __init__(self, index, index_type: str, params: Mapping[str, Any], documents, folder: Path) -> None:
        self.index, self.index_type, self.params = index, index_type, dict(params)
        self.documents, self.folder = documents, Path(folder)
        self._tombstones = np.array(documents.tombstones(), dtype=np.int64)
        self._allowed: dict[str, np.ndarray] = {}

    @classmethod
    def create(cls, folder, index_type, vectors, ids, metadata, *, documents, options):
        index, params = new_faiss_index(index_type, vectors)
        index.add_with_ids(vectors, ids)
        return cls(index, index_type, params, documents, folder), {"params": params, "file": INDEX_FILE}

    @classmethod
    def open(cls, folder, info, documents):
        path = Path(folder) / INDEX_FILE
        if not path.is_file():
            raise DataError("FAISS index file missing", path=path)
        return cls(_faiss().read_index(str(path)), info["type"], info.get("params", {}), documents, folder)

    def check(self, info, path):
        if self.index.ntotal != info.get("vectors"):
            raise DataError(f"index holds {self.index.ntotal} vectors, the manifest says {info.get('vectors')} "
                            "(folder modified by hand?)", path=Path(path) / INDEX_FILE)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def _allowed_ids(self, flt: Filter) -> np.ndarray:
        ids = self._allowed.get(flt.text)
        if ids is None:
            ids = np.array([i for i, meta in self.documents.iter_metadata() if flt.matches(meta)], dtype=np.int64)
            if len(self._allowed) >= FILTER_CACHE:
                self._allowed.pop(next(iter(self._allowed)))
            self._allowed[flt.text] = ids
        return ids

    def search(self, query_emb: np.ndarray, k: int, flt: Filter | None = None) -> Results:
        faiss = _faiss()
        empty = [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in query_emb]
        if self.index.ntotal == 0:
            return empty
        selector = None
        if flt is not None:
            allowed = self._allowed_ids(flt)  # live documents only: deleted ones are not in the document store
            if not len(allowed):
                return empty
            selector = faiss.IDSelectorBatch(allowed)
        elif len(self._tombstones):
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self._tombstones))
        k = max(1, min(int(k), self.index.ntotal))
        if self.index_type == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.params.get("ef_search", HNSW_EF_SEARCH), k))
        elif self.index_type in ("ivf", "ivfpq"):
            params = faiss.SearchParametersIVF(nprobe=self.params.get("nprobe", 8))
        else:
            params = faiss.SearchParameters() if selector is not None else None
        if selector is not None:
            params.sel = selector  # `selector` must outlive the search: SWIG keeps no reference to it
        scores, ids = self.index.search(query_emb, k, params=params)
        return [(row_ids[row_ids >= 0], row_scores[row_ids >= 0]) for row_ids, row_scores in zip(ids, scores)]

    def reconstruct(self, ids: Sequence[int]) -> np.ndarray:
        return self.index.reconstruct_batch(np.asarray(ids, dtype=np.int64))

    def fork(self, folder, documents):
        # a clone: the loaded index stays valid if the update fails
        return FaissVectors(_faiss().clone_index(self.index), self.index_type, self.params, documents, folder)

    def add(self, ids, vectors, metadata):
        self.index.add_with_ids(vectors, ids)

    def remove(self, ids) -> bool:
        if self.index_type == "hnsw":  # HNSW graphs cannot remove nodes
            return True
        self.index.remove_ids(np.asarray(ids, dtype=np.int64))
        return False

    def save(self) -> dict[str, Any]:
        _faiss().write_index(self.index, str(self.folder / INDEX_FILE))
        return {"file": INDEX_FILE}
