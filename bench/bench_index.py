"""The index curve: recall@10 against exact search, query latency, memory and build time of each FAISS index type
embedkit builds (flat, hnsw, ivf, ivfpq), over real text at growing corpus sizes; the `auto` rule of
embedkit/rag/index.py (`choose_index_type`) is read off it.

The corpus is real text assembled from ../shared/data: every sentence (>= 20 characters, split at . ! ?) of the
SciFact abstracts (titles included), the MedQuAD answers (train pairs and the test corpus) and the SICK and
STS12-15 sentences, whitespace-normalised, exact duplicates dropped, in a seeded random order, so that the first n
sentences are a random sample of the whole. Sentence-sized passages are what a RAG index over short chunks holds.
The queries are real questions and claims held out from the corpus (MedQuAD's train and test questions, SciFact's
claims), a seeded sample. Vectors: all-MiniLM-L6-v2 (embedkit's `minilm`), unit length, encoded once into
`--work` (in chunks, so an interrupted run resumes) and reused by later runs.

--texts FILE replaces that corpus with one of your own (a .txt with one text per line, or a .jsonl with a "text"
field per row; whitespace-normalised, blank lines and exact duplicates dropped, in the same seeded order) and
--query-texts FILE gives its questions (same formats; a question that is also a corpus text is dropped). The vectors
then go to runs/index-bench-<file name> unless --work says otherwise, so the shared-data corpus's are kept.

--chunks multi adds every document's 16/24/32/64-word half-overlapping windows to its sentences (1,247,165 texts: the
shared data's real text at several granularities, as a hierarchical chunker indexes it; the vectors go to
runs/index-bench-multi). --model takes an export folder too, encoded by its own runtime: MiniLM's OpenVINO int8
export encoded the million texts on 2 cores in ~41 minutes (a short timing gave PyTorch a third of its rate). The curve
(bench/records/index/curve-real-1m.json, ~75 minutes on 2 cores, the encoding shared with the test suite, most of it
encoding and HNSW's build):

    .venv/bin/python -m embedkit.cli export -m minilm --format openvino --quantize int8 --precision bf16 \\
        -o runs/index-bench-multi/minilm-openvino-int8-bf16
    .venv/bin/python bench/bench_index.py --chunks multi --model runs/index-bench-multi/minilm-openvino-int8-bf16 \\
        --sizes 100000,300000,1000000 --kinds flat,hnsw,ivf,ivfpq --queries 1000 --threads 1 \\
        --record bench/records/index/curve-real-1m.json

Each index is built with embedkit's own constructor (`new_faiss_index`, the parameters `embedkit rag index` uses)
and searched through the FAISS store's own search (`FaissVectors.search`), one query at a time on `--threads`
threads (built on every core): the latency a `rag query` or `/rag` request sees. Memory is the serialised index's
size (what the index holds in RAM, vectors or codes included); build time includes IVF's k-means training (and
IVF-PQ's codebooks').

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_index.py --sizes 10000,30000,100000,all --queries 1000 \\
        --record bench/records/index/curve-real.json

--synthetic N adds rows over N random unit vectors (no model, no text: the hard case for approximate search, with
no cluster structure; for sizes beyond the real corpus).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_record  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_CHARS = 20
ENCODE_CHUNK = 10_000
K = 10
RERANK_DEPTH = 100  # the candidates a reranker orders (`--rerank-top`'s usual 100)
BUILD_THREADS = os.cpu_count() or 1
WINDOWS = ((16, 8), (24, 12), (32, 16), (64, 32))  # --chunks multi: (words, stride) of each granularity


def sentences(text: str) -> list[str]:
    text = " ".join(text.split())
    return [s for s in SENTENCE_END.split(text) if len(s) >= MIN_CHARS]


def _jsonl(path: Path):
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def word_windows(text: str) -> list[str]:
    """The overlapping word windows of `text` at every WINDOWS size (each window half-overlaps the next), as a
    hierarchical chunker indexes a document at several granularities; a text no longer than a window gives none
    of that size (its sentences already stand for it)."""
    words = text.split()
    return [" ".join(words[i:i + size]) for size, stride in WINDOWS if len(words) > size
            for i in range(0, len(words) - size + 1, stride)]


def assemble(data: Path, seed: int, chunks: str = "sentences") -> tuple[list[str], list[str]]:
    """(corpus texts, held-out queries), each deduplicated and in a seeded random order. `chunks`: "sentences"
    (every sentence of the documents) or "multi" (those sentences and every document's `word_windows`: the real
    text of ../shared/data is 203,758 sentences, 4.35M words in 21,006 documents, too little for a 1,000,000-text
    curve otherwise)."""
    corpus: dict[str, None] = {}
    documents = []  # whole documents, for the windows of "multi"
    for row in _jsonl(data / "scifact" / "corpus.jsonl"):
        documents.append(row.get("title", "") + " " + row.get("text", ""))
        for s in sentences(row.get("title", "")) + sentences(row.get("text", "")):
            corpus.setdefault(s)
    for row in _jsonl(data / "medquad" / "train_pairs.jsonl"):
        documents.append(row["positive"])
        for s in sentences(row["positive"]):
            corpus.setdefault(s)
    for row in _jsonl(data / "medquad" / "test" / "corpus.jsonl"):
        documents.append(row.get("title", "") + " " + row.get("text", ""))
        for s in sentences(row.get("title", "")) + sentences(row.get("text", "")):
            corpus.setdefault(s)
    if chunks == "multi":
        for document in dict.fromkeys(documents):
            for window in word_windows(document):
                corpus.setdefault(window)
    for path in sorted((data / "sts").glob("*/*.jsonl")):
        for row in _jsonl(path):
            for key in ("sentence1", "sentence2"):
                for s in sentences(row[key]):
                    corpus.setdefault(s)
    queries: dict[str, None] = {}
    for row in _jsonl(data / "medquad" / "train_pairs.jsonl"):
        queries.setdefault(" ".join(row["query"].split()))
    for path in (data / "medquad" / "test" / "queries.jsonl", data / "scifact" / "queries.jsonl"):
        for row in _jsonl(path):
            queries.setdefault(" ".join(row["text"].split()))
    texts = list(corpus)
    questions = [q for q in queries if q not in corpus]
    random.Random(seed).shuffle(texts)
    random.Random(seed + 1).shuffle(questions)
    return texts, questions


def read_texts(path: Path) -> list[str]:
    """The texts of a .txt (one per line) or a .jsonl (a "text" field per row), whitespace-normalised, blank ones
    and exact duplicates dropped, in file order."""
    rows = (row["text"] for row in _jsonl(path)) if path.suffix == ".jsonl" else \
        path.read_text(encoding="utf-8").splitlines()
    texts: dict[str, None] = {}
    for text in rows:
        text = " ".join(text.split())
        if text:
            texts.setdefault(text)
    return list(texts)


def assemble_files(texts_path: Path, queries_path: Path, seed: int) -> tuple[list[str], list[str]]:
    """(corpus texts, queries) from --texts / --query-texts, as `assemble` gives the shared data's: deduplicated, no
    query that is a corpus text, in a seeded random order."""
    texts = read_texts(texts_path)
    corpus = set(texts)
    questions = [q for q in read_texts(queries_path) if q not in corpus]
    random.Random(seed).shuffle(texts)
    random.Random(seed + 1).shuffle(questions)
    return texts, questions


def digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()


def load_encoder(model: str):
    """`model` as embedkit loads it: an export folder (`embedkit export --format onnx | openvino`) by its own
    runtime, anything else by `load_model` on the CPU."""
    import embedkit.export.formats  # noqa: F401  (registers the export runtimes)
    from embedkit.models import load_model
    from embedkit.models.exported import export_format, load_exported_encoder

    if export_format(model) is not None:
        return load_exported_encoder(model)
    return load_model(model, device="cpu")


def encode_resumable(texts: list[str], kind: str, folder: Path, model: str, batch_size: int) -> np.ndarray:
    """The texts' unit vectors, encoded in chunks of ENCODE_CHUNK saved as they finish; a chunk already saved for
    the same texts is not encoded again."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder = None
    parts = []
    started, done_before = time.perf_counter(), 0
    for start in range(0, len(texts), ENCODE_CHUNK):
        chunk = texts[start:start + ENCODE_CHUNK]
        path = folder / f"{kind}-{start:08d}-{digest(chunk)[:16]}.npy"
        if path.is_file():
            parts.append(np.load(path))
            done_before += len(chunk)
            continue
        if encoder is None:
            encoder = load_encoder(model)
        vectors = np.asarray(encoder.encode(chunk, kind=kind, batch_size=batch_size, normalize=True),
                             dtype=np.float32)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(path)
        parts.append(vectors)
        done = start + len(chunk)
        rate = (done - done_before) / (time.perf_counter() - started)
        print(f"encoded {kind} {done}/{len(texts)} ({rate:.0f} texts/s, ~{(len(texts) - done) / rate / 60:.1f} min "
              "left)", flush=True)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


class _NoDocuments:
    """The document store's part FaissVectors reads at search time: no tombstones, no filters."""

    def tombstones(self):
        return []


def exact_top_found(found, exact_ids: np.ndarray) -> list[float]:
    """Per query, the share of exact search's top K among the ids an index returned (-1: no result)."""
    return [len(set(a.tolist()) & set(b.tolist()) - {-1}) / K for a, b in zip(found, exact_ids)]


def measure(kind: str, vectors: np.ndarray, queries: np.ndarray, exact_ids: np.ndarray | None,
            threads: int) -> tuple[dict, np.ndarray]:
    import faiss

    from embedkit.rag.vectors.faiss_store import FaissVectors, new_faiss_index

    faiss.omp_set_num_threads(BUILD_THREADS)  # built as `rag index` builds it: on every core
    started = time.perf_counter()
    index, params = new_faiss_index(kind, vectors)
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    build_s = time.perf_counter() - started
    faiss.omp_set_num_threads(threads)
    store = FaissVectors(index, kind, params, _NoDocuments(), Path("."))
    store.search(queries[:1], K)  # warm-up
    latencies, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        (ids, _), = store.search(q[None, :], K)
        latencies.append((time.perf_counter() - t0) * 1000)
        found.append(np.pad(ids[:K], (0, K - len(ids[:K])), constant_values=-1))
    found = np.stack(found)
    row = {"index": kind, "params": params, "build_s": round(build_s, 2),
           "bytes": int(faiss.serialize_index(index).size),
           "p50_ms": round(float(np.percentile(latencies, 50)), 3),
           "p99_ms": round(float(np.percentile(latencies, 99)), 3),
           "mean_ms": round(float(np.mean(latencies)), 3)}
    if exact_ids is not None:
        hits = exact_top_found(found, exact_ids)
        row["recall_at_10"] = round(float(np.mean(hits)), 4)
        row["recall_at_10_min"] = round(float(np.min(hits)), 2)
        # What a second stage over the top RERANK_DEPTH can recover: the share of exact search's top 10 that the index
        # returns anywhere in its top RERANK_DEPTH (a reranker reorders candidates, it cannot add one). Not timed.
        deep = [ids for ids, _ in store.search(queries, RERANK_DEPTH)]
        row[f"recall_10_at_{RERANK_DEPTH}"] = round(float(np.mean(exact_top_found(deep, exact_ids))), 4)
    return row, found


def curve(vectors: np.ndarray, queries: np.ndarray, sizes: list[int], kinds: list[str], label: str,
          threads: int) -> list[dict]:
    rows = []
    for n in sizes:
        exact = None
        for kind in ["flat"] + [k for k in kinds if k != "flat"]:
            row, found = measure(kind, vectors[:n], queries, exact, threads)
            if kind == "flat":
                exact = found
                row["recall_at_10"] = row[f"recall_10_at_{RERANK_DEPTH}"] = 1.0
            row.update(corpus=label, documents=n)
            rows.append(row)
            print(f"{label:>9} n={n:>8} {kind:>5}: recall@10 {row['recall_at_10']:.4f}  p50 {row['p50_ms']:.2f} ms  "
                  f"p99 {row['p99_ms']:.2f} ms  {row['bytes'] / 2**20:.0f} MiB  build {row['build_s']:.1f} s",
                  flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, help="encoded vectors (reused; default runs/index-bench, with --texts "
                                                  "runs/index-bench-<file name>)")
    parser.add_argument("--texts", type=Path, help="a corpus of your own instead of --data's: .txt (a text a line) "
                                                   "or .jsonl (a \"text\" field a row)")
    parser.add_argument("--query-texts", type=Path, help="with --texts: its questions (same formats)")
    parser.add_argument("--model", default="minilm", help="a model, or an export folder (encoded by its runtime)")
    parser.add_argument("--chunks", choices=("sentences", "multi"), default="sentences",
                        help="the shared data's texts: every sentence, or (multi) also every document's 16/24/32/64-"
                             "word half-overlapping windows (~1.3M texts)")
    parser.add_argument("--sizes", default="10000,30000,100000,all", help="corpus sizes; 'all' = every sentence")
    parser.add_argument("--kinds", default="flat,hnsw,ivf", help="any of flat, hnsw, ivf, ivfpq")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads while searching")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", default="", help="sizes over random unit vectors, e.g. 1000000")
    parser.add_argument("--synthetic-queries", type=int, default=200, help="random queries for --synthetic")
    parser.add_argument("--encode-only", action="store_true", help="encode (or check) the vectors, measure nothing")
    parser.add_argument("--record", type=Path)
    parser.add_argument("--note", default="", help="an observation to keep in the record (e.g. a run stopped)")
    args = parser.parse_args()

    from embedkit.rag.vectors.faiss_store import FaissVectors

    unknown = set(args.kinds.split(",")) - set(FaissVectors.index_types)
    if unknown:
        parser.error(f"--kinds: unknown {', '.join(sorted(unknown))} (use {', '.join(FaissVectors.index_types)})")
    if (args.texts is None) != (args.query_texts is None):
        parser.error("--texts and --query-texts go together")
    if args.work is None:
        args.work = Path("runs/index-bench" + (f"-{args.texts.stem}" if args.texts is not None else
                                               "-multi" if args.chunks == "multi" else ""))

    if args.texts is not None:
        texts, questions = assemble_files(args.texts, args.query_texts, args.seed)
    else:
        texts, questions = assemble(args.data, args.seed, args.chunks)
    questions = questions[:args.queries]
    sizes = [len(texts) if s == "all" else min(int(s), len(texts)) for s in args.sizes.split(",") if s]
    if sizes and not args.encode_only:
        texts = texts[:max(sizes)]  # the seeded order makes the first n a random sample: encode no more than used
    print(f"corpus: {len(texts)} texts; queries: {len(questions)}", flush=True)
    # the cache is keyed by the texts, so each model keeps a folder of its own
    cache = args.work / ("vectors" if args.model == "minilm" else f"vectors-{Path(args.model).name}")
    corpus_vectors = encode_resumable(texts, "document", cache, args.model, args.batch_size)
    query_vectors = encode_resumable(questions, "query", cache, args.model, args.batch_size)
    for name, array in (("corpus.npy", corpus_vectors), ("queries.npy", query_vectors)):
        np.save(args.work / f".{name}", array)  # the joined vectors, for bench_mine_memory.py --vectors
        (args.work / f".{name}").replace(args.work / name)
    if args.encode_only:
        return
    kinds = args.kinds.split(",")
    rows = curve(corpus_vectors, query_vectors, sizes, kinds, "real", args.threads) if sizes else []
    if args.synthetic:
        rng = np.random.default_rng(args.seed)
        top = max(int(s) for s in args.synthetic.split(","))
        synthetic = rng.standard_normal((top, corpus_vectors.shape[1]), dtype=np.float32)
        synthetic /= np.linalg.norm(synthetic, axis=1, keepdims=True)
        probe = rng.standard_normal((args.synthetic_queries, corpus_vectors.shape[1]), dtype=np.float32)
        probe /= np.linalg.norm(probe, axis=1, keepdims=True)
        rows += curve(synthetic, probe, [int(s) for s in args.synthetic.split(",")], kinds, "synthetic",
                      args.threads)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak_gb:.2f} GB")
    if args.record:
        values = {"model": args.model, "dim": int(corpus_vectors.shape[1]), "k": K, "threads": args.threads,
                  "texts": str(args.texts) if args.texts else None,
                  "query_texts": str(args.query_texts) if args.query_texts else None,
                  "chunks": None if args.texts else args.chunks,
                  "queries": len(questions), "synthetic_queries": args.synthetic_queries if args.synthetic else 0,
                  "build_threads": BUILD_THREADS, "corpus_sentences": len(texts), "corpus_sha256": digest(texts),
                  "queries_sha256": digest(questions), "seed": args.seed, "note": args.note,
                  "peak_rss_gb": round(peak_gb, 2),
                  "rows": rows}
        write_record(args.record, values, command=" ".join(sys.argv))


if __name__ == "__main__":
    main()
