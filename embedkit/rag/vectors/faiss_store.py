"""FAISS, the default store: one file (index.faiss) in the index folder, searched in process.

"flat" is exact inner product; "hnsw" (graph) and "ivf" (inverted lists) are approximate. FAISS keeps no
metadata: a filter is evaluated over the metadata in the document store (`Filter.matches`) and the ids that pass
become an IDSelector, so filtered search stays exact on a flat index. HNSW graphs cannot drop a node, so deleted ids
are tombstones (kept by the document store) that an IDSelector keeps out of every search.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from embedkit.errors import DataError
from embedkit.rag.filters import Filter
from embedkit.rag.vectors.base import Results, VectorStore

INDEX_FILE = "index.faiss"
HNSW_M = 32  # graph degree: FAISS' usual choice for 384-1024-d text embeddings
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128  # recall@10 0.999 of exact on SciFact/MiniLM (bench/bench_rag.py); raised to k when k is larger
FILTER_CACHE = 16  # filters whose passing ids a loaded index remembers (the same filter is usually sent again)


def _faiss():
    import faiss

    return faiss


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
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 1  # nlist <= n/39 already; this only silences the 1-list case of tiny corpora
    index.train(vectors)
    # IVF takes ids natively (no IDMap: IndexIDMap's removal assumes a compacting index); a hashtable direct map
    # lets hybrid search reconstruct vectors by id and survives removals.
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index, {"nlist": nlist, "nprobe": nprobe}


class FaissVectors(VectorStore):
    kind = "faiss"
    index_types = ("flat", "hnsw", "ivf")

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
        elif self.index_type == "ivf":
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
