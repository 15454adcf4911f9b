"""Evaluation runner: encode, search, score, for every task; returns a report dict (see `report.py`).

Retrieval: queries are encoded with kind="query", documents with kind="document" (asymmetric prompts);
exact top-k search by chunked matrix products (or FAISS IndexFlatIP for large corpora); ties broken by
document id the way trec_eval does, so a run is deterministic. Corpus embeddings are cached on disk under
`<cache>/embeddings/` keyed by what determines them (model fingerprint, prompts, pooling, max length, corpus
texts): a second evaluation of the same model on the same corpus only encodes the queries. A corpus that misses
the cache still copies the vectors of the texts an earlier entry of the same model holds and encodes only the others
(row reuse, `embedkit.eval.rowcache`): a corpus with a few documents added encodes those few.
STS: both sentences are encoded with kind="query" (a symmetric task: both sides are the same kind of
text; mteb likewise uses no document prompt for STS), scored by cosine.
Two stages (`reranker`): each query's first `rerank_top` documents of the bi-encoder's ranking are ordered by the
reranker (embedkit.models.reranker), the rest keep their order below them; the task's metrics and per-query values
are the two-stage ones (so `embedkit compare` gates a reranker like any model), and the first stage's metrics are
kept beside them under "first_stage".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from embedkit.atomic import atomic_path
from embedkit.errors import ConfigError
from embedkit.eval.metrics import paired_cosine, retrieval_metrics, sts_metrics, trec_order
from embedkit.eval.mteb_adapter import run_mteb_task
from embedkit.eval.report import build_report
from embedkit.eval.rowcache import ReuseMismatch, RowReuse, find_reuse, text_digests, write_sidecar
from embedkit.eval.tasks import LoadedTask, TaskSpec, load_task, parse_task_specs
from embedkit.manifest import sha256_texts

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 100  # enough for recall@100 and map@100; nDCG@10 / MRR@10 only read the first 10
FAISS_MIN_DOCUMENTS = 200_000  # "auto" search switches to FAISS from this corpus size
_QUERY_CHUNK = 256  # queries per matrix product: bounds memory at 256 x n_docs floats


class Encoder(Protocol):
    fingerprint: str

    def encode(self, texts: list[str], kind: str = "query", batch_size: int = 32, normalize: bool = True,
               show_progress: bool | None = None) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


def default_cache_dir() -> Path:
    """$EMBEDKIT_HOME, else ~/.cache/embedkit (same place the model registry uses)."""
    env = os.environ.get("EMBEDKIT_HOME")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "embedkit"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch = sys.modules.get("torch")  # seed torch only if an encoder loaded it: importing it here costs seconds
    if torch is not None:
        torch.manual_seed(seed)


def _encoder_key(encoder: Encoder, kind: str) -> dict[str, Any]:
    """Everything about the model that changes a document's embedding (not the batch size)."""
    d = encoder.describe()
    return {"fingerprint": encoder.fingerprint, "prompts": d.get("prompts"), "pooling": d.get("pooling"),
            "max_length": d.get("max_length"), "dtype": d.get("dtype"), "kind": kind, "normalize": True}


def _model_key(encoder: Encoder, kind: str) -> str:
    return json.dumps(_encoder_key(encoder, kind), sort_keys=True, default=str)


def embedding_cache_path(cache_dir: Path, encoder: Encoder, ids: list[str], texts: list[str], kind: str) -> Path:
    model_key = _model_key(encoder, kind)
    corpus_key = sha256_texts(t for pair in zip(ids, texts) for t in pair)
    key = hashlib.sha256(f"{model_key}\0{corpus_key}".encode()).hexdigest()[:40]
    return Path(cache_dir) / "embeddings" / f"{key}.npy"


def embedding_model_tag(encoder: Encoder, kind: str) -> str:
    """16 hex digits naming the model key (`_encoder_key`) in the names of the row-digest sidecars, so the entries
    of one model key are found with one glob (`embedkit.eval.rowcache`)."""
    return hashlib.sha256(_model_key(encoder, kind).encode()).hexdigest()[:16]


def plan_row_reuse(encoder: Encoder, entry: Path, texts: list[str], *, kind: str,
                   level: int = logging.INFO) -> tuple[np.ndarray, RowReuse | None]:
    """(row digests of `texts`, where their vectors can be copied from) for the missing cache entry `entry`.

    The plan is None when no earlier entry of the same model key holds any of the texts, and always under sharded
    encoding (every process must encode the same texts, and the processes need not see the same cache): there a
    miss is encoded whole, as before row reuse. The digests are what `write_row_digests` writes beside the entry.
    """
    digests = text_digests(texts)
    if encodes_sharded(encoder):
        return digests, None
    reuse = find_reuse(entry, embedding_model_tag(encoder, kind), digests)
    if reuse is not None:
        log.log(level, f"reused {reuse.reused:,} of {reuse.n:,} vectors from cached entries; "
                       f"encoding {reuse.n - reuse.reused:,}")
    return digests, reuse


def write_row_digests(encoder: Encoder, entry: Path, digests: np.ndarray, *, kind: str) -> None:
    """The sidecar that makes the just-written `entry` a candidate for row reuse (written after the entry)."""
    write_sidecar(entry, embedding_model_tag(encoder, kind), digests)


def encode_cached(
    encoder: Encoder, ids: list[str], texts: list[str], *, kind: str, batch_size: int,
    cache_dir: Path | None, use_cache: bool, progress: bool = False,
) -> tuple[np.ndarray, bool]:
    """Embeddings of `texts`, from the cache when present; returns (embeddings, was_cached).

    The cache holds plain .npy (loaded with allow_pickle=False), written atomically; a file of the wrong
    shape (e.g. cut short by a full disk) is ignored and rewritten. On a miss, the vectors of texts that an earlier
    entry of the same model key holds are copied from it and only the other texts are encoded, in one call
    (`plan_row_reuse`; logged at INFO with `progress`, else DEBUG); the entry written is the same either way, up to
    float rounding (~1e-7) of a reused vector. Under sharded encoding (several processes) the cache is used only
    when every process finds it (else all encode together, with no row reuse), and only rank 0 writes it.
    """
    path = embedding_cache_path(cache_dir, encoder, ids, texts, kind) if (use_cache and cache_dir) else None
    cached = None
    if path is not None and path.is_file():
        try:
            cached = np.load(path, allow_pickle=False)
            if not (cached.ndim == 2 and cached.shape[0] == len(texts) and cached.dtype == np.float32):
                cached = None
        except (ValueError, OSError):
            cached = None
    if ranks_agree(encoder, cached is not None):
        return cached, True
    digests, reuse, embeddings = None, None, None
    if path is not None:
        digests, reuse = plan_row_reuse(encoder, path, texts, kind=kind,
                                        level=logging.INFO if progress else logging.DEBUG)
    if reuse is not None:
        try:
            embeddings = reuse.rows(encoder, texts, 0, len(texts), kind=kind, batch_size=batch_size)
        except ReuseMismatch as exc:
            log.warning("not reusing cached rows (%s); encoding all %d texts", exc, len(texts))
        finally:
            reuse.close()
    if embeddings is None:
        embeddings = np.ascontiguousarray(encoder.encode(texts, kind=kind, batch_size=batch_size, normalize=True),
                                          dtype=np.float32)
    if path is not None and _is_main_process():
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, embeddings, allow_pickle=False)
        write_row_digests(encoder, path, digests, kind=kind)
    return embeddings, False


def ranks_agree(encoder: Encoder, flag: bool) -> bool:
    """`flag` on every process when `encoder` encodes sharded (each encode is then a collective: the processes
    must take the same branch); `flag` itself otherwise."""
    if getattr(encoder, "_embedkit_shard_group", None) is None:
        return flag
    from embedkit.models.distributed import all_agree, sharding_group

    active, group = sharding_group(encoder)
    return all_agree(flag, group) if active else flag


def encodes_sharded(encoder: Encoder) -> bool:
    """Whether `encoder.encode` is a collective over several processes now (see `ranks_agree`)."""
    if getattr(encoder, "_embedkit_shard_group", None) is None:
        return False
    from embedkit.models.distributed import sharding_group

    return sharding_group(encoder)[0]


def _is_main_process() -> bool:
    if "torch" not in sys.modules:  # no torch, no process group (and no need to import it to find out)
        return True
    from embedkit.models.distributed import is_main_process

    return is_main_process()


def _tie_ranks(doc_ids: list[str]) -> np.ndarray:
    """rank[i] = position of doc_ids[i] in sorted order; a larger rank wins a score tie (trec_eval order)."""
    order = sorted(range(len(doc_ids)), key=lambda i: doc_ids[i])
    ranks = np.empty(len(doc_ids), dtype=np.int64)
    ranks[order] = np.arange(len(doc_ids))
    return ranks


def exact_search(
    query_emb: np.ndarray, doc_emb: np.ndarray, query_ids: list[str], doc_ids: list[str], top_k: int
) -> dict[str, dict[str, float]]:
    """Top-k documents per query by inner product (cosine on normalised embeddings), exact and deterministic.

    Every document scoring at least the k-th best score is a candidate, so ties at the cut are resolved by
    doc id (descending, as trec_eval) rather than by whatever order argpartition happens to return.
    """
    n_docs = doc_emb.shape[0]
    k = min(top_k, n_docs)
    tie_rank = _tie_ranks(doc_ids)
    run: dict[str, dict[str, float]] = {}
    for start in range(0, len(query_ids), _QUERY_CHUNK):
        scores = query_emb[start:start + _QUERY_CHUNK] @ doc_emb.T
        kth = np.partition(scores, n_docs - k, axis=1)[:, n_docs - k]
        for row, qid in enumerate(query_ids[start:start + _QUERY_CHUNK]):
            candidates = np.nonzero(scores[row] >= kth[row])[0]
            order = np.lexsort((-tie_rank[candidates], -scores[row, candidates]))[:k]
            best = candidates[order]
            run[qid] = {doc_ids[i]: float(scores[row, i]) for i in best}
    return run


def faiss_search(
    query_emb: np.ndarray, doc_emb: np.ndarray, query_ids: list[str], doc_ids: list[str], top_k: int
) -> dict[str, dict[str, float]]:
    """Top-k by FAISS IndexFlatIP (exact inner product, multithreaded); results re-sorted in trec order."""
    import faiss

    index = faiss.IndexFlatIP(doc_emb.shape[1])
    index.add(np.ascontiguousarray(doc_emb, dtype=np.float32))
    scores, indices = index.search(np.ascontiguousarray(query_emb, dtype=np.float32), min(top_k, doc_emb.shape[0]))
    run = {}
    for qid, row_scores, row_idx in zip(query_ids, scores, indices):
        hits = {doc_ids[i]: float(s) for s, i in zip(row_scores, row_idx) if i >= 0}
        run[qid] = dict(trec_order(hits))
    return run


def rerank_run(reranker: Any, queries: dict[str, str], documents: dict[str, str], run: dict[str, dict[str, float]],
               *, top: int, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """`run` with each query's first `top` documents (trec order) scored and ordered by `reranker`; the documents
    below them keep their first-stage order after them. Scores are the reranker's logits for the head and, for the
    tail, values below the head's lowest. Every pair of every query is scored in one length-sorted pass."""
    heads = {qid: [d for d, _ in trec_order(hits)] for qid, hits in run.items()}
    pairs_q = [queries[qid] for qid, ordered in heads.items() for _ in ordered[:top]]
    pairs_d = [documents[d] for ordered in heads.values() for d in ordered[:top]]
    logits = reranker.score(pairs_q, pairs_d, batch_size=batch_size, logits=True) if pairs_q else []
    reranked: dict[str, dict[str, float]] = {}
    start = 0
    for qid, ordered in heads.items():
        head = ordered[:top]
        scores = {d: float(s) for d, s in zip(head, logits[start:start + len(head)])}
        start += len(head)
        floor = min(scores.values(), default=0.0) - 1.0
        scores.update({d: floor - i for i, d in enumerate(ordered[top:])})
        reranked[qid] = scores
    return reranked


def run_retrieval(
    encoder: Encoder, task: LoadedTask, *, batch_size: int, top_k: int, search: str,
    cache_dir: Path | None, use_cache: bool, reranker: Any = None, rerank_top: int = DEFAULT_TOP_K,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    data = task.data
    query_ids = data.judged_query_ids()
    doc_ids = list(data.corpus)
    timings: dict[str, Any] = {}
    t0 = time.perf_counter()
    doc_emb, cached = encode_cached(encoder, doc_ids, data.document_texts(doc_ids), kind="document",
                                    batch_size=batch_size, cache_dir=cache_dir, use_cache=use_cache,
                                    progress=progress)
    t1 = time.perf_counter()
    query_emb = np.ascontiguousarray(
        encoder.encode([data.queries[q] for q in query_ids], kind="query", batch_size=batch_size, normalize=True),
        dtype=np.float32)
    t2 = time.perf_counter()
    use_faiss = search == "faiss" or (search == "auto" and len(doc_ids) >= FAISS_MIN_DOCUMENTS)
    run = (faiss_search if use_faiss else exact_search)(query_emb, doc_emb, query_ids, doc_ids, top_k)
    t3 = time.perf_counter()
    qrels = {q: data.qrels[q] for q in query_ids}
    scores = retrieval_metrics(qrels, run)
    t4 = time.perf_counter()
    timings.update(encode_documents_s=t1 - t0, documents_from_cache=cached, encode_queries_s=t2 - t1,
                   search_s=t3 - t2, search_backend="faiss" if use_faiss else "exact", scoring_s=t4 - t3)
    if reranker is None:
        return {"metrics": scores.metrics, "per_query": scores.per_query}, timings
    needed = {d for hits in run.values() for d, _ in trec_order(hits)[:rerank_top]}
    texts = dict(zip(sorted(needed), data.document_texts(sorted(needed))))
    reranked = rerank_run(reranker, data.queries, texts, run, top=rerank_top, batch_size=batch_size)
    t5 = time.perf_counter()
    two_stage = retrieval_metrics(qrels, reranked)
    timings.update(rerank_s=t5 - t4, rerank_ms_per_query=1000 * (t5 - t4) / max(len(query_ids), 1),
                   rerank_top=rerank_top)
    return {"metrics": two_stage.metrics, "per_query": two_stage.per_query,
            "first_stage": {"metrics": scores.metrics}}, timings


def run_sts(encoder: Encoder, task: LoadedTask, *, batch_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    data = task.data
    t0 = time.perf_counter()
    # Encode each distinct sentence once (STS files repeat sentences across pairs).
    unique = list(dict.fromkeys([*data.sentences1, *data.sentences2]))
    position = {s: i for i, s in enumerate(unique)}
    emb = np.asarray(encoder.encode(unique, kind="query", batch_size=batch_size, normalize=True), dtype=np.float32)
    t1 = time.perf_counter()
    a = emb[[position[s] for s in data.sentences1]]
    b = emb[[position[s] for s in data.sentences2]]
    scores = sts_metrics(paired_cosine(a, b), data.scores)
    return ({"metrics": scores.metrics, "per_pair": {"predicted": scores.predicted, "gold": scores.gold}},
            {"encode_s": t1 - t0, "scoring_s": time.perf_counter() - t1})


def evaluate(
    encoder: Encoder,
    tasks: list[str | TaskSpec] | None = None,
    *,
    batch_size: int = 32,
    seed: int = 0,
    top_k: int = DEFAULT_TOP_K,
    search: str = "auto",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = False,
    reranker: Any = None,
    rerank_top: int = DEFAULT_TOP_K,
) -> dict[str, Any]:
    """Evaluate `encoder` on `tasks` (spec strings or TaskSpecs; default: stsb, stsb-paraphrase); return a report.

    All task specs are parsed and all data is loaded before any encoding, so a bad spec or a bad file fails
    in seconds, not after an hour of encoding. progress: log each step at INFO (`embedkit eval`) rather than DEBUG
    (a dev evaluation inside training). `reranker`: a second stage for retrieval tasks (its first `rerank_top`
    documents per query); STS and mteb tasks are the bi-encoder's alone.
    """
    if search not in ("auto", "exact", "faiss"):
        raise ConfigError(f"unknown search backend '{search}' (use auto, exact or faiss)", field="search")
    if top_k < 100:
        raise ConfigError("top_k must be at least 100 (recall@100 and map@100 need 100 results)", field="top_k")
    if reranker is not None and not 1 <= rerank_top <= top_k:
        raise ConfigError(f"rerank_top must be between 1 and top_k ({top_k}), not {rerank_top}", field="rerank_top")
    level = logging.INFO if progress else logging.DEBUG
    started = time.perf_counter()
    specs = parse_task_specs(tasks)
    loaded = []
    for spec in specs:
        log.log(level, "loading %s (%s)", spec.name, spec.spec)
        loaded.append(load_task(spec))
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    set_seed(seed)
    results: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    for task in loaded:
        spec = task.spec
        log.log(level, "evaluating %s", spec.name)
        t0 = time.perf_counter()
        if spec.type == "retrieval":
            result, task_timings = run_retrieval(encoder, task, batch_size=batch_size, top_k=top_k, search=search,
                                                 cache_dir=cache, use_cache=use_cache, reranker=reranker,
                                                 rerank_top=rerank_top, progress=progress)
        elif spec.type == "sts":
            result, task_timings = run_sts(encoder, task, batch_size=batch_size)
        else:
            if _is_main_process():
                metrics = run_mteb_task(encoder, task.data, batch_size=batch_size, cache_dir=cache / "mteb-results")
            else:  # the other processes encode their shares too; their copy of mteb's results goes nowhere
                with tempfile.TemporaryDirectory(prefix="embedkit-mteb-") as scratch:
                    metrics = run_mteb_task(encoder, task.data, batch_size=batch_size, cache_dir=scratch)
            result, task_timings = {"metrics": metrics}, {}
        task_timings["total_s"] = time.perf_counter() - t0
        timings[spec.name] = task_timings
        results[spec.name] = {
            "task": {"name": spec.name, "type": spec.type, "main_metric": spec.main_metric, "split": spec.split,
                     "data_hash": task.data_hash, "sizes": task.sizes},
            **result,
        }
    return build_report(encoder, loaded, results, timings, seed=seed, batch_size=batch_size, top_k=top_k,
                        search=search, wall_time_s=time.perf_counter() - started, reranker=reranker,
                        rerank_top=rerank_top)
