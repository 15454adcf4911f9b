"""A RAG index: vectors (FAISS or Milvus) + a SQLite document store + (optionally) BM25, in one folder with a manifest.

    <index>/index.faiss            FAISS index (the default store); vector ids are the document store's integer ids
    <index>/vectors.milvus.db      or: a Milvus Lite file (`--store milvus`; with `--milvus-uri` a Milvus server)
    <index>/documents.sqlite       id -> (doc_id, title, text, metadata); HNSW tombstones
    <index>/bm25/                  bm25s index and the FAISS id of each of its rows (when bm25s is installed)
    <index>/embedkit_manifest.json model fingerprint, corpus hash, index type and parameters, counts

The vectors live in a vector store (`embedkit.rag.vectors`: FAISS or Milvus, recorded in the manifest as
`index.vector_store`); documents, metadata and BM25 live here for every store, so both stores answer the same
searches, hybrid and reranked ones included, and take the same metadata filters (`embedkit.rag.filters`).

Index types: "flat" is exact inner product (cosine: vectors are L2-normalised); "hnsw" (graph, approximate, fast
on large corpora) and "ivf" (inverted lists, approximate) trade a little recall for speed; "ivfpq" (IVF over
compressed vectors, FAISS only) trades more recall for memory. "auto" picks flat below `FLAT_MAX_FLOATS` / dim
documents (100,000 for a 384-d model) and HNSW from there.

A reranker (a cross-encoder, embedkit.models.reranker) can order the results: the index retrieves the first stage's
top `rerank_top` documents and `embedkit.eval.runner.rerank_run`, the routine `embedkit eval --rerank` uses, orders
them, so a query, `rag eval` and `embedkit eval` rank with the same pairs and the same scores.

Adding and deleting documents never re-encodes the corpus: new documents are encoded and added, deleted ones are
removed from flat/IVF/IVF-PQ indexes and from Milvus, and tombstoned in FAISS HNSW graphs (which cannot drop a node) and
filtered out at search time by a FAISS IDSelector. Every update writes a complete new folder beside the old one and
swaps it in (`embedkit.atomic.atomic_dir`), so a crash leaves either the old index or the new one, never a mix (a
Milvus server's collection, which is not in the folder, is changed in place: see `vectors/milvus_store.py`).
Writers take a lock file beside the folder (`.NAME.lock`); the next writer removes the temporary folders of killed
runs (`.NAME.XXXXXXXX.tmp`) under it. A long-lived reader (`rag web`) notices a swap with `changed_on_disk()` (a few
stat calls) and loads the new folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from embedkit.atomic import atomic_dir, remove_stale_temps, write_json
from embedkit.data.documents import load_documents
from embedkit.errors import ConfigError, DataError, ModelError
from embedkit.eval.metrics import trec_order
from embedkit.eval.runner import rerank_run
from embedkit.manifest import MANIFEST_NAME, base_manifest, device_fields, sha256_texts
from embedkit.models.ray_encode import RaySettings, VectorShards, encode_to_shards, shards_beside
from embedkit.models.registry import EMBEDDED_MODELS
from embedkit.rag.bm25 import BM25_DIR, Bm25Index, bm25_available
from embedkit.rag.filters import Filter, parse_filter
from embedkit.rag.store import STORE_NAME, DocumentStore
from embedkit.rag.vectors import DEFAULT_STORE, STORES, VectorStore, store_class
from embedkit.rag.vectors.faiss_store import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, INDEX_FILE  # noqa: F401
from embedkit.rag.vectors.faiss_store import check_ivfpq_documents

log = logging.getLogger(__name__)

MANIFEST_KIND = "rag_index"
INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")
INDEX_ALIASES = {"ivf-flat": "ivf", "ivf-pq": "ivfpq"}  # FAISS' own names (IndexIVFFlat, IndexIVFPQ)
# "auto" (docs/rag.md, Choosing the index; bench/records/index/curve-real.json, real sentences, MiniLM 384-d): exact
# search reads every vector, ~0.09 ms per 1,000 documents a query on one core, so it stays under ~10 ms (about what
# encoding the query costs on a CPU, so search is never the larger part) up to ~100k x 384 floats. Beyond, HNSW
# answers in under 1 ms at recall@10 0.99 of exact; IVF is never auto's choice: 0.94-0.95 recall at HNSW's
# latency. Checked at 1,000,000 real texts (curve-real-1m.json: exact 74.8 ms a query, HNSW 0.70 ms at recall@10
# 0.99 after a ~10-minute build on 2 cores; IVF 0.98 but 6.3 ms). The budget is in floats, not documents, since
# exact search's time grows with the dimension: a 1024-d model switches at 37,500 documents. A property of exact
# search's arithmetic, not of a corpus, so it transfers.
# IVF-PQ is never auto's choice either: it gives up recall (its scores come from codes, 48 bytes a 384-d vector, not
# from the vectors) for memory, a trade only the user can weigh (bench/records/index/curve-real-ivfpq.json:
# recall@10 0.71-0.73 of exact for a sixteenth of flat's size at 100k-200k documents; 0.93-0.94 of exact's top 10
# within its top 100, so its candidates suit a reranker).
FLAT_MAX_FLOATS = 100_000 * 384
HNSW_THRESHOLD = FLAT_MAX_FLOATS // 384  # documents, for a 384-d model (MiniLM)
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009)
HYBRID_DEPTH = 100  # candidates taken from each retriever before fusion
DEFAULT_BATCH_SIZE = 32  # the eval runner's default: equal batches give bit-equal embeddings


@dataclass
class Hit:
    """One search result. `score` is the cosine similarity, the fused RRF score in hybrid mode, or, when a reranker
    ordered the results, the reranker's score (its sigmoid probability, 0..1, as `Reranker.score` gives it);
    `dense_score` / `bm25_score` are the first stage's parts either way."""

    rank: int
    doc_id: str
    score: float
    title: str
    text: str
    dense_score: float | None = None
    bm25_score: float | None = None
    reranked: bool = False
    metadata: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hnsw_threshold_for(dim: int) -> int:
    """"auto"'s switch to HNSW, in documents, for vectors of `dim` floats: FLAT_MAX_FLOATS / dim."""
    return max(1, FLAT_MAX_FLOATS // max(1, int(dim)))


def canonical_index_type(index_type: str) -> str:
    """The index type an `--index-type` value names: "ivf-flat" is "ivf", "ivf-pq" is "ivfpq"."""
    return INDEX_ALIASES.get(index_type, index_type)


def choose_index_type(n_documents: int, index_type: str = "auto", hnsw_threshold: int | None = None,
                      dim: int = 384) -> str:
    """The FAISS index kind for a corpus size: the given type, or for "auto" flat below the threshold (given, else
    `hnsw_threshold_for(dim)`), else HNSW. An alias (`INDEX_ALIASES`) gives its own name."""
    index_type = canonical_index_type(index_type)
    if index_type not in INDEX_TYPES:
        raise ConfigError(f"unknown index type {index_type!r} (use {', '.join(INDEX_TYPES)})", field="index_type")
    if index_type != "auto":
        return index_type
    return "flat" if n_documents < (hnsw_threshold or hnsw_threshold_for(dim)) else "hnsw"


def explain_index_choice(n_documents: int, index_type: str, kind: str, hnsw_threshold: int | None, dim: int) -> str:
    """One line saying which index was built and why (what `rag index` prints)."""
    if index_type != "auto":
        return f"{kind} index (--index-type {index_type})"
    threshold = hnsw_threshold or hnsw_threshold_for(dim)
    source = "--hnsw-threshold" if hnsw_threshold else f"{FLAT_MAX_FLOATS:,} floats / {dim}-d vectors"
    if kind == "flat":
        return (f"auto: flat (exact) index: {n_documents:,} documents, under the switch to HNSW at {threshold:,} "
                f"({source}), below which exact search stays under ~10 ms a query on one core")
    return (f"auto: HNSW index: {n_documents:,} documents, at or past the switch at {threshold:,} ({source}), where "
            "exact search would take over ~10 ms a query on one core; HNSW answers in about 1 ms at recall@10 ~0.99 "
            "of exact (--index-type flat keeps exact search)")


def encode_texts(encoder, texts: list[str], kind: str, batch_size: int) -> np.ndarray:
    """Contiguous float32 unit vectors, as the index stores and searches them: the eval runner's call (`kind` picks
    the model's prompt; normalised, so inner product = cosine)."""
    return np.ascontiguousarray(encoder.encode(texts, kind=kind, batch_size=batch_size, normalize=True),
                                dtype=np.float32)


def sigmoid(logit: float) -> float:
    """The reranker's probability from its logit, without overflow for logits far below zero."""
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    e = math.exp(logit)
    return e / (1.0 + e)


def check_rerank_top(rerank_top: int, k: int) -> None:
    """The reranker orders the first stage's top `rerank_top`: fewer than the k results asked for would leave some
    of them in the first stage's order."""
    if rerank_top < k:
        raise ConfigError(f"rerank top ({rerank_top}) must be at least the number of results asked for ({k}): the "
                          "reranker orders every result shown", field="rerank-top")


def check_store_index_type(store: str, index_type: str) -> None:
    """Refuse a vector store whose packages are missing, or an index type it does not build (Milvus: no IVF or
    IVF-PQ), before anything is encoded."""
    backend = store_class(store)
    backend.require()
    offered = backend.index_types
    if index_type not in offered and index_type != "auto":
        raise ConfigError(f"the {store} store builds {', '.join(offered)} indexes, not {index_type!r}",
                          field="index-type")


def _model_record(encoder) -> dict[str, Any]:
    d = encoder.describe()
    keep = ("name", "path", "fingerprint", "architecture", "pooling", "prompts", "max_length", "normalize", "dim",
            "dtype")
    record = {k: d.get(k) for k in keep}
    if d.get("attention"):  # a causal LLM made bidirectional embeds differently: recorded so it reloads as itself
        record["attention"] = d["attention"]
    return record


def _corpus_sha256(store: DocumentStore) -> str:
    return sha256_texts(t for _, d in store.iter_documents() for t in (d.doc_id, d.title, d.text))


def _is_rag_index(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST_NAME).read_text()).get("kind") == MANIFEST_KIND
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def _write_lock(path: Path):
    """One writer at a time per index (a lock file beside the folder, since the folder itself gets swapped).

    Holding the lock, the writer first removes the temporary folders that killed writers of this index left
    behind: no live writer can own one then.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            remove_stale_temps(path)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _disk_key(path: Path) -> tuple[int, ...] | None:
    """What identifies the folder now at `path`: every update swaps in a new folder with a newly written manifest."""
    try:
        folder, manifest = os.stat(path), os.stat(path / MANIFEST_NAME)
    except OSError:
        return None
    return (folder.st_dev, folder.st_ino, manifest.st_ino, manifest.st_mtime_ns, manifest.st_size)


def check_queries(queries: Sequence[str]) -> None:
    """An empty query embeds to the special tokens alone and would return arbitrary documents: refuse it."""
    for n, query in enumerate(queries, start=1):
        if not isinstance(query, str) or not query.strip():
            where = "" if len(queries) == 1 else f" (query {n} of {len(queries)})"
            raise ConfigError(f"the query is empty{where}: give some words to search for", field="query")


class RagIndex:
    """A loaded index. Searching is thread-safe; `add`/`delete` rewrite the folder and reload it."""

    def __init__(self, path: Path, vectors: VectorStore, store: DocumentStore, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.vectors = vectors
        self.store = store
        self.manifest = manifest
        self._bm25: Bm25Index | None = None
        self._disk_key: tuple[int, ...] | None = None  # set by load()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path) -> "RagIndex":
        """Load the folder at `path`; if a writer swaps it in meanwhile, load again (never a mix of two)."""
        path = Path(path)
        for attempt in range(5):
            before = _disk_key(path)
            index = cls._load_files(path)
            if before is not None and _disk_key(path) == before:
                index._disk_key = before
                return index
            index.close()
            time.sleep(0.01 * (attempt + 1))
        index = cls._load_files(path)  # swapped five times in a row: take this one; changed_on_disk() says so
        return index

    def changed_on_disk(self) -> bool:
        """Whether another folder was swapped in at this index's path since it was loaded (cheap: two stats)."""
        return _disk_key(self.path) != self._disk_key

    @classmethod
    def _load_files(cls, path: Path) -> "RagIndex":
        if not path.is_dir():
            raise DataError("RAG index folder not found (build one with 'embedkit rag index')", path=path)
        manifest_path = path / MANIFEST_NAME
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise DataError(f"not a RAG index: no {MANIFEST_NAME}", path=path) from None
        except ValueError as exc:
            raise DataError(f"manifest is not valid JSON ({exc})", path=manifest_path) from None
        if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
            raise DataError(f"not a RAG index manifest (kind is {manifest.get('kind')!r})"
                            if isinstance(manifest, dict) else "manifest is not an object", path=manifest_path,
                            field="kind")
        for key in ("model", "index", "corpus"):
            if not isinstance(manifest.get(key), dict):
                raise DataError("missing section", path=manifest_path, field=key)
        kind = manifest["index"].get("vector_store", "faiss")  # indexes from before Milvus are FAISS ones
        if kind not in STORES:
            raise DataError(f"unknown vector store {kind!r} (this embedkit knows {', '.join(STORES)})",
                            path=manifest_path, field="vector_store")
        store = DocumentStore(path / STORE_NAME, readonly=True)
        try:
            vectors = store_class(kind).open(path, manifest["index"], store)
        except BaseException:
            store.close()
            raise
        try:
            vectors.check(manifest["index"], path)
        except BaseException:
            vectors.close()
            store.close()
            raise
        return cls(path, vectors, store, manifest)

    def close(self) -> None:
        self.vectors.close()
        self.store.close()

    # ------------------------------------------------------------------ properties
    @property
    def vector_store(self) -> str:
        return self.manifest["index"].get("vector_store", "faiss")

    @property
    def index_type(self) -> str:
        return self.manifest["index"]["type"]

    @property
    def dim(self) -> int:
        return int(self.manifest["index"]["dim"])

    @property
    def model_fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    def __len__(self) -> int:
        return int(self.manifest["index"]["documents"])

    @property
    def has_bm25(self) -> bool:
        return bool(self.manifest["index"].get("bm25")) and (self.path / BM25_DIR).is_dir()

    def describe(self) -> dict[str, Any]:
        info = self.manifest["index"]
        return {"path": str(self.path), "vector_store": self.vector_store, "type": info["type"],
                "documents": info["documents"],
                "vectors": info["vectors"], "tombstones": info["tombstones"], "dim": info["dim"],
                "params": info.get("params", {}), "bm25": self.has_bm25, "model": self.manifest["model"].get("name"),
                "fingerprint": self.model_fingerprint}

    # ------------------------------------------------------------------ model check
    def check_encoder(self, encoder) -> None:
        """Refuse a model other than the one the index was built with: its vectors would live in another space."""
        built = self.manifest["model"]
        if encoder.fingerprint != built["fingerprint"]:
            raise ModelError(
                f"index was built with model '{built.get('name')}' (fingerprint {built['fingerprint'][:12]}), but the "
                f"query model '{getattr(encoder, 'name', '?')}' has fingerprint {encoder.fingerprint[:12]}: query "
                "with the same model or rebuild the index", path=self.path)

    # ------------------------------------------------------------------ search
    def search_vectors(self, query_emb: np.ndarray, k: int, flt: Filter | str | None = None
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Dense top-k per query as (vector ids, inner products), best first; deleted documents never appear, nor
        documents whose metadata fails the filter `flt`."""
        query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
        if query_emb.ndim != 2 or query_emb.shape[1] != self.dim:
            raise ModelError(f"query vectors have shape {query_emb.shape}, the index holds {self.dim}-d vectors")
        return self.vectors.search(query_emb, k, parse_filter(flt))

    @property
    def bm25(self) -> Bm25Index:
        if self._bm25 is None:
            if not self.has_bm25:
                raise ConfigError("this index has no BM25 part (built without bm25s installed, or with --no-bm25): "
                                  "rebuild it with bm25s installed (pip install 'embedkit[rag]')", field="hybrid")
            self._bm25 = Bm25Index.load(self.path / BM25_DIR)
        return self._bm25

    def _reconstruct(self, ids: Sequence[int]) -> np.ndarray:
        return self.vectors.reconstruct(ids)

    def _passing(self, ids: Sequence[int], flt: Filter | None) -> list[int]:
        """The ids among `ids` whose documents pass `flt` (BM25 candidates: BM25 knows no metadata)."""
        if flt is None:
            return list(ids)
        docs = self.store.get(ids)
        return [i for i in ids if i in docs and flt.matches(docs[i].metadata)]

    def rank(self, query_texts: Sequence[str], query_emb: np.ndarray, k: int, *, hybrid: bool = False,
             hybrid_weight: float = 0.5, depth: int = HYBRID_DEPTH, filter: Filter | str | None = None
             ) -> list[list[tuple[int, float, float | None, float | None]]]:
        """Per query, up to k (vector id, score, dense score, bm25 score), best first; with `filter`, only
        documents whose metadata passes it (both retrievers' candidates).

        Hybrid: weighted reciprocal rank fusion, score = (1-w)/(60+dense rank) + w/(60+BM25 rank), over the
        union of the top-`depth` (100) of each retriever. Dense scores of BM25-only candidates are computed exactly from
        their stored vectors, so every candidate has a dense rank; only documents sharing a term with the query
        get a BM25 rank. RRF needs no score normalisation (cosine and BM25 live on different scales).
        """
        if not 0.0 <= hybrid_weight <= 1.0:
            raise ConfigError(f"hybrid weight must be between 0 and 1, not {hybrid_weight}", field="hybrid_weight")
        flt = parse_filter(filter)
        if not hybrid:
            return [[(int(i), float(s), float(s), None) for i, s in _tie_sorted(ids, scores)]
                    for ids, scores in self.search_vectors(query_emb, k, flt)]
        depth = max(k, depth)
        dense = self.search_vectors(query_emb, depth, flt)
        lexical = self.bm25.search(list(query_texts), depth)
        out = []
        for q, ((d_ids, d_scores), (b_ids, b_scores)) in enumerate(zip(dense, lexical)):
            if flt is not None:
                keep = set(self._passing([int(i) for i in b_ids], flt))
                b_scores = [s for i, s in zip(b_ids, b_scores) if int(i) in keep]
                b_ids = [i for i in b_ids if int(i) in keep]
            dense_score = {int(i): float(s) for i, s in zip(d_ids, d_scores)}
            extra = [int(i) for i in b_ids if int(i) not in dense_score]
            if extra:
                vectors = self._reconstruct(extra)
                for i, s in zip(extra, vectors @ query_emb[q]):
                    dense_score[i] = float(s)
            dense_rank = {i: r for r, (i, _) in enumerate(_tie_sorted(list(dense_score), list(dense_score.values())),
                                                            start=1)}
            bm25_score = {int(i): float(s) for i, s in zip(b_ids, b_scores)}
            bm25_rank = {i: r for r, (i, _) in enumerate(_tie_sorted(list(bm25_score), list(bm25_score.values())),
                                                         start=1)}
            fused = {i: (1 - hybrid_weight) / (RRF_K + dense_rank[i])
                     + (hybrid_weight / (RRF_K + bm25_rank[i]) if i in bm25_rank else 0.0) for i in dense_score}
            best = _tie_sorted(list(fused), list(fused.values()))[:k]
            out.append([(i, s, dense_score[i], bm25_score.get(i)) for i, s in best])
        return out

    def search(self, encoder, query: str | Sequence[str], k: int = 5, *, hybrid: bool = False,
               hybrid_weight: float = 0.5, batch_size: int = DEFAULT_BATCH_SIZE, reranker=None,
               rerank_top: int | None = None, filter: Filter | str | None = None) -> list[Hit] | list[list[Hit]]:
        """Top-k documents for a query (a list of Hits) or for each of several queries (a list of lists).

        reranker: order the first stage's top `rerank_top` (default: k; at least k) documents with it and return
        the best k of them, scored by the reranker. filter: only documents whose metadata passes it
        (`embedkit.rag.filters`, e.g. 'source == "manual" and year >= 2020')."""
        single = isinstance(query, str)
        queries = [query] if single else list(query)
        check_queries(queries)
        flt = parse_filter(filter)
        if k < 1:
            raise ConfigError(f"k must be at least 1, not {k}", field="k")
        depth = k
        if reranker is not None:
            depth = k if rerank_top is None else int(rerank_top)
            check_rerank_top(depth, k)
        self.check_encoder(encoder)
        query_emb = encode_texts(encoder, queries, "query", batch_size)
        ranked = self.rank(queries, query_emb, depth, hybrid=hybrid, hybrid_weight=hybrid_weight, filter=flt)
        docs = self.store.get({i for row in ranked for i, *_ in row})
        ranked = [[r for r in row if r[0] in docs] for row in ranked]
        if reranker is not None:
            ranked = rerank_ranked(reranker, queries, ranked, docs, k=k, batch_size=batch_size)
        results = [[Hit(rank, docs[i].doc_id, score, docs[i].title, docs[i].text, dense, lex,
                        reranked=reranker is not None, metadata=docs[i].metadata)
                    for rank, (i, score, dense, lex) in enumerate(row, start=1)]
                   for row in ranked]
        return results[0] if single else results

    # ------------------------------------------------------------------ updates
    def add(self, encoder, docs: Any, *, batch_size: int = DEFAULT_BATCH_SIZE,
            progress: bool = False) -> int:
        """Encode and add documents (same inputs as `build_index`); ids already in the index are refused."""
        self.check_encoder(encoder)
        new = load_documents(docs)
        if not new:
            return 0
        clash = self.store.ids_for(d.doc_id for d in new)
        if clash:
            names = ", ".join(sorted(clash)[:5]) + (" ..." if len(clash) > 5 else "")
            raise DataError(f"{len(clash)} document id(s) already in the index ({names}): delete them first",
                            path=self.path, field="_id")
        log.log(logging.INFO if progress else logging.DEBUG, "encoding %d documents", len(new))
        vectors = encode_texts(encoder, [d.embed_text for d in new], "document", batch_size)
        start = int(self.manifest["index"]["next_id"])
        ids = np.arange(start, start + len(new), dtype=np.int64)

        def change(store_vectors: VectorStore, store: DocumentStore) -> None:
            store.add(zip(ids.tolist(), new))
            store_vectors.add(ids, vectors, [d.metadata for d in new])

        self._commit(change, op="add", count=len(new), next_id=start + len(new))
        return len(new)

    def delete(self, doc_ids: Iterable[str], *, missing_ok: bool = False) -> int:
        """Delete documents by corpus id; an unknown id is an error unless `missing_ok`."""
        doc_ids = list(dict.fromkeys(str(d) for d in doc_ids))
        found = self.store.ids_for(doc_ids)
        missing = [d for d in doc_ids if d not in found]
        if missing and not missing_ok:
            names = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise DataError(f"{len(missing)} id(s) not in the index: {names}", path=self.path, field="_id")
        if not found:
            return 0
        ids = np.array(sorted(found.values()), dtype=np.int64)

        def change(store_vectors: VectorStore, store: DocumentStore) -> None:
            tombstone = store_vectors.remove(ids)  # FAISS HNSW graphs cannot remove nodes: tombstones
            store.delete(ids.tolist(), tombstone=tombstone)

        self._commit(change, op="delete", count=len(ids), next_id=int(self.manifest["index"]["next_id"]))
        return len(ids)

    def _commit(self, change, *, op: str, count: int, next_id: int) -> None:
        """Apply `change` to a copy of the vectors and the store, write a complete new folder, swap it in, reload.

        (A vector store that is not in the folder, a Milvus server, is changed in place by `change`.)"""
        with _write_lock(self.path):
            on_disk = json.loads((self.path / MANIFEST_NAME).read_text())
            if (self._disk_key is not None and self.changed_on_disk()) or \
                    on_disk["index"].get("generation") != self.manifest["index"].get("generation"):
                raise DataError("the index changed on disk since it was loaded (another writer?): load it again",
                                path=self.path)
            with atomic_dir(self.path) as tmp:
                self.store.backup_to(tmp / STORE_NAME)
                store = DocumentStore(tmp / STORE_NAME)
                vectors = None
                try:
                    vectors = self.vectors.fork(tmp, store)  # the loaded index stays valid if anything fails
                    change(vectors, store)
                    manifest = dict(self.manifest)
                    updates = list(manifest.get("updates", []))[-99:]  # bounded history
                    updates.append({"op": op, "documents": count,
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                    manifest["updates"] = updates
                    _write_folder(tmp, vectors, store, manifest, next_id=next_id,
                                  generation=int(self.manifest["index"].get("generation", 0)) + 1,
                                  bm25=bool(self.manifest["index"].get("bm25")))
                finally:
                    if vectors is not None:
                        vectors.close()
                    store.close()
        self.close()
        fresh = RagIndex.load(self.path)
        self.vectors, self.store, self.manifest = fresh.vectors, fresh.store, fresh.manifest
        self._bm25, self._disk_key = None, fresh._disk_key


def rerank_ranked(reranker, queries: Sequence[str], ranked: list[list[tuple[int, float, float | None, float | None]]],
                  docs: dict[int, Any], *, k: int, batch_size: int = DEFAULT_BATCH_SIZE
                  ) -> list[list[tuple[int, float, float | None, float | None]]]:
    """Each query's candidates (rows of `rank`, all in `docs`) ordered by the reranker, best k kept, each with the
    reranker's probability as its score (first-stage dense and BM25 parts kept).

    Through `rerank_run`, the routine of `embedkit eval --rerank`: the same pair texts (Document.embed_text is the
    eval runner's document text), all pairs in one length-sorted pass, ties in trec_eval's order."""
    keys = [str(n) for n in range(len(queries))]
    run = {key: {docs[i].doc_id: score for i, score, *_ in row} for key, row in zip(keys, ranked)}
    texts = {docs[i].doc_id: docs[i].embed_text for row in ranked for i, *_ in row}
    depth = max((len(row) for row in ranked), default=0)
    reordered = rerank_run(reranker, dict(zip(keys, queries)), texts, run, top=depth, batch_size=batch_size)
    out = []
    for key, row in zip(keys, ranked):
        by_doc = {docs[i].doc_id: (i, dense, lex) for i, _, dense, lex in row}
        best = trec_order(reordered[key])[:k]
        out.append([(by_doc[d][0], sigmoid(logit), by_doc[d][1], by_doc[d][2]) for d, logit in best])
    return out


def _tie_sorted(ids: Sequence[int], scores: Sequence[float]) -> list[tuple[int, float]]:
    """Best first; equal scores by id, so the order never depends on FAISS internals."""
    return sorted(((int(i), float(s)) for i, s in zip(ids, scores)), key=lambda x: (-x[1], x[0]))


def _write_folder(folder: Path, vectors: VectorStore, store: DocumentStore, manifest: dict[str, Any], *,
                  next_id: int, generation: int, bm25: bool) -> None:
    """The vectors, bm25/ and the manifest for `store`'s documents (the store is already in `folder`)."""
    held = vectors.ntotal
    record = vectors.save()
    documents = store.count()
    if bm25:
        Bm25Index.build((i, d.embed_text) for i, d in store.iter_documents()).save(folder / BM25_DIR)
    manifest["corpus"] = {**manifest.get("corpus", {}), "sha256": _corpus_sha256(store), "documents": documents}
    manifest["index"] = {**manifest["index"], **record, "vectors": int(held), "documents": documents,
                         "tombstones": len(store.tombstones()), "next_id": next_id, "generation": generation,
                         "bm25": bm25}
    write_json(folder / MANIFEST_NAME, manifest)


def build_index(
    encoder,
    corpus: Any,
    output: str | Path,
    *,
    index_type: str = "auto",
    hnsw_threshold: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    bm25: bool | None = None,
    progress: bool = False,
    source: str | Path | None = None,
    write: bool = True,
    store: str = DEFAULT_STORE,
    milvus_uri: str | None = None,
    milvus_collection: str | None = None,
    ray: RaySettings | None = None,
) -> RagIndex | None:
    """Encode a corpus and write a RAG index folder at `output` (replacing an older RAG index there).

    corpus: a BeirDataset, a dict id -> {"title", "text"}, or a path (BEIR folder, corpus.jsonl, .txt).
    bm25: build the BM25 part for hybrid search; None = when bm25s is installed.
    source: where the corpus came from, for the manifest (default: the path, when `corpus` is one).
    write=False: only encode (same calls), write nothing, return None: the processes other than rank 0 of a
    sharded build (`embedkit rag index --nproc`). progress: log the steps at INFO rather than DEBUG.
    store: where the vectors live, "faiss" (index.faiss in the folder) or "milvus" (a Milvus Lite file in the
    folder, or with `milvus_uri` a Milvus server's collection `milvus_collection`, default embedkit_rag_<folder>).
    ray: encode on Ray Data (embedkit.models.ray_encode) into vector shards beside the index (`<output>.shards/`),
    read back for the index and removed once it is written; an interrupted build resumes from the finished shards.
    """
    level = logging.INFO if progress else logging.DEBUG
    output = Path(output)
    vector_store = store_class(store)  # an unknown store fails before anything is encoded
    if store != "milvus" and (milvus_uri or milvus_collection):
        raise ConfigError("--milvus-uri and --milvus-collection need --store milvus", field="store")
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not _is_rag_index(output))):
        raise ConfigError("output exists and is not a RAG index: refusing to replace it", path=output)
    if bm25 and not bm25_available():
        raise ConfigError("BM25 needs bm25s: pip install 'embedkit[rag]'", field="bm25")
    with_bm25 = bm25_available() if bm25 is None else bm25
    docs = load_documents(corpus)
    if not docs:
        raise DataError("the corpus has no documents")
    dim = int(getattr(encoder, "dim", 384) or 384)
    kind = choose_index_type(len(docs), index_type, hnsw_threshold, dim)
    check_store_index_type(store, kind)
    if kind == "ivfpq":
        check_ivfpq_documents(len(docs))
    choice = explain_index_choice(len(docs), index_type, kind, hnsw_threshold, dim)
    log.log(level, "%s", choice)
    log.log(level, "encoding %d documents with %s", len(docs), getattr(encoder, "name", "the model"))
    t0 = time.perf_counter()
    shards = shards_beside(output)
    on_ray: dict[str, Any] = {}
    if ray is None:
        vectors = encode_texts(encoder, [d.embed_text for d in docs], "document", batch_size)
    else:
        report = encode_to_shards(encoder, [d.doc_id for d in docs], [d.embed_text for d in docs], shards,
                                  kind="document", batch_size=batch_size, normalize=True, settings=ray,
                                  progress=progress)
        on_ray = {"ray": {"workers": report.workers, "shard_size": ray.shard_size, "shards": report.shards,
                          "resumed_shards": report.shards - len(report.encoded)}}
        vectors = VectorShards(shards).to_array()
    encode_s = time.perf_counter() - t0
    if not write:
        return None
    log.log(level, "building a %s index (%s)", kind, store)
    t1 = time.perf_counter()
    ids = np.arange(len(docs), dtype=np.int64)
    if source is None:
        source = corpus.path if hasattr(corpus, "path") else corpus if isinstance(corpus, (str, Path)) else None
    manifest = base_manifest(
        MANIFEST_KIND,
        model=_model_record(encoder),
        corpus={"source": str(Path(source).resolve()) if source is not None else None},
        index={"type": kind, "requested_type": index_type, "choice": choice,
               "metric": "inner_product (cosine, normalised vectors)", "dim": int(vectors.shape[1]),
               "vector_store": store, "store": STORE_NAME},
        build={"encode_s": round(encode_s, 3), "batch_size": batch_size,
               **device_fields(getattr(encoder, "device", None)), **on_ray},
    )
    with _write_lock(output), atomic_dir(output) as tmp:
        documents = DocumentStore(tmp / STORE_NAME)
        held = None
        try:
            documents.add(zip(ids.tolist(), docs))
            held, record = vector_store.create(
                tmp, kind, vectors, ids, [d.metadata for d in docs], documents=documents,
                options={"uri": milvus_uri, "collection": milvus_collection, "name": output.name})
            manifest["index"].update(record)
            manifest["build"]["index_s"] = round(time.perf_counter() - t1, 3)
            _write_folder(tmp, held, documents, manifest, next_id=len(docs), generation=0, bm25=with_bm25)
        finally:
            if held is not None:
                held.close()
            documents.close()
    if ray is not None:
        shutil.rmtree(shards)
    log.log(level, "wrote %s", output)
    return RagIndex.load(output)


def load_index_encoder(index: RagIndex, model: str | Path | None = None, *, device: Any = "cpu"):
    """The encoder to query `index` with: `model` if given, else the one recorded in its manifest, on `device`.

    The recorded model is reloaded with its recorded settings (pooling, prompts, max length, dtype, attention) so
    that its fingerprint matches; any other model is refused by `check_encoder`.
    """
    from embedkit.models import load_model

    info = index.manifest["model"]
    if model is not None:
        encoder = load_model(model, device=device)
    else:
        name, path = info.get("name"), info.get("path")
        target = name if name in EMBEDDED_MODELS or (name and Path(name).exists()) else path
        if not target:
            raise ModelError("the index manifest names no model: pass --model", path=index.path)
        encoder = load_model(target, pooling=info.get("pooling"), prompts=info.get("prompts") or {},
                             max_length=info.get("max_length"), normalize=info.get("normalize"),
                             dtype=info.get("dtype"), attention=info.get("attention"), device=device)
    index.check_encoder(encoder)
    return encoder
