"""BM25 for hybrid retrieval, via `bm25s` (sparse-matrix BM25, Lucene scoring; optional `embedkit[rag]` extra).

The BM25 index is saved in `<index>/bm25/` with the FAISS id of each of its rows, and is rebuilt from the document
store after every add or delete: bm25s has no incremental update, and re-tokenising is cheap next to embedding
(SciFact's 5,183 abstracts take about a second).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import numpy as np

from embedkit.errors import ConfigError

BM25_DIR = "bm25"
_IDS_FILE = "faiss_ids.npy"


def _bm25s():
    try:
        import bm25s
    except ImportError as exc:
        raise ConfigError("hybrid retrieval needs bm25s: pip install 'embedkit[rag]'") from exc
    # bm25s logs every index build at DEBUG; an application that configured the root logger would print them all.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def bm25_available() -> bool:
    try:
        import bm25s  # noqa: F401
    except ImportError:
        return False
    return True


def _tokenize(texts: list[str], *, ids: bool):
    # English stopwords, lower-cased words of 2+ characters (bm25s defaults); no stemmer, so no extra dependency.
    return _bm25s().tokenize(texts, stopwords="en", return_ids=ids, show_progress=False)


class Bm25Index:
    """BM25 scores over the live documents; `search` returns (faiss ids, scores) of documents that match."""

    def __init__(self, retriever, faiss_ids: np.ndarray) -> None:
        self.retriever = retriever
        self.faiss_ids = np.asarray(faiss_ids, dtype=np.int64)

    @classmethod
    def build(cls, rows: Iterable[tuple[int, str]]) -> "Bm25Index":
        bm25s = _bm25s()
        rows = list(rows)
        retriever = bm25s.BM25()
        retriever.index(_tokenize([text for _, text in rows], ids=True), show_progress=False)
        return cls(retriever, np.array([i for i, _ in rows], dtype=np.int64))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.retriever.save(str(folder), show_progress=False)
        with open(folder / _IDS_FILE, "wb") as f:
            np.save(f, self.faiss_ids, allow_pickle=False)

    @classmethod
    def load(cls, folder: Path) -> "Bm25Index":
        bm25s = _bm25s()
        retriever = bm25s.BM25.load(str(folder), show_progress=False)
        return cls(retriever, np.load(folder / _IDS_FILE, allow_pickle=False))

    def search(self, queries: list[str], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, the top-k (faiss ids, BM25 scores), best first; documents sharing no term are left out."""
        n = len(self.faiss_ids)
        if n == 0:
            return [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in queries]
        tokens = _tokenize(queries, ids=False)
        # bm25s fails on an empty token list (a query of stopwords only); such a query matches nothing.
        safe = [t if t else ["\x00"] for t in tokens]
        docs, scores = self.retriever.retrieve(safe, k=min(k, n), show_progress=False, n_threads=1)
        out = []
        for row_docs, row_scores in zip(docs, scores):
            keep = row_scores > 0
            out.append((self.faiss_ids[row_docs[keep]], row_scores[keep].astype(np.float32)))
        return out
