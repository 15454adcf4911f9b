"""Benchmark: peak memory and time of mining over a large precomputed corpus (issue #5 acceptance: < 4 GB RSS).

    .venv/bin/python bench/bench_mine_memory.py                       # 1,000,000 x 384 corpus, 10,000 queries
    .venv/bin/python bench/bench_mine_memory.py --docs 200000 --queries 2000   # quicker
    .venv/bin/python bench/bench_mine_memory.py --search exact,hnsw --record bench/records/mine/memory-1m.json
    .venv/bin/python bench/bench_mine_memory.py --vectors runs/index-bench --search exact,hnsw   # real vectors

Writes a synthetic float32 corpus (unit vectors, with np.lib.format.open_memmap in chunks, so generation is bounded
too), queries placed near a random "positive" document each, then runs `embedkit.mine.mine_embeddings` over the
.npy file in a fresh subprocess (exact search streamed in corpus chunks, rank window 10:100, 3 negatives, relative
margin 0.05, near-duplicate filter on, the best-scored survivors kept) and prints that process's peak RSS and wall
time. Exit code 1 if the peak exceeds --limit-gb. With several --search methods (exact,hnsw) each mines the same data
in its own subprocess and the approximate ones are compared with exact search: the share of exact search's chosen
negatives they also chose ("top" sampling, so a difference comes from the index, not from the sampler's draws).

--vectors DIR mines real vectors instead: DIR/corpus.npy and DIR/queries.npy (as bench/bench_index.py writes them:
MiniLM vectors of ~200k real sentences and of held-out questions), each query's exact nearest document standing in
for its positive (the sentences carry no labels). Random vectors have no cluster structure, the hard case for an
approximate index, so the overlap there is a floor; real vectors give the figure a user sees.

Peak RSS is VmHWM of /proc/self/status read by the mining process at its end: the high-water mark of its own
memory since exec. (ru_maxrss is printed too, but Linux carries the parent's high-water mark into a child's
ru_maxrss across fork+exec, so the data is generated in a separate subprocess to keep that number honest as well.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def generate(folder: Path, docs: int, queries: int, dim: int, seed: int, chunk: int = 65536) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    corpus = np.lib.format.open_memmap(folder / "corpus.npy", mode="w+", dtype=np.float32, shape=(docs, dim))
    for start in range(0, docs, chunk):
        block = rng.standard_normal((min(chunk, docs - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        corpus[start:start + block.shape[0]] = block
        corpus.flush()
    positives = rng.choice(docs, size=queries, replace=False).astype(np.int64)
    noise = rng.standard_normal((queries, dim), dtype=np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    q = np.asarray(corpus[np.sort(positives)])[np.argsort(np.argsort(positives))] + 0.5 * noise
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    del corpus
    np.save(folder / "queries.npy", q.astype(np.float32))
    np.save(folder / "positives.npy", positives)


def link_real(folder: Path, vectors: Path, queries: int, chunk: int = 65536) -> None:
    """DIR's vectors in `folder`, the queries cut to `queries`, each query's positive its exact nearest document."""
    import numpy as np

    (folder / "corpus.npy").symlink_to((vectors / "corpus.npy").resolve())
    corpus = np.load(folder / "corpus.npy", mmap_mode="r")
    q = np.ascontiguousarray(np.load(vectors / "queries.npy")[:queries], dtype=np.float32)
    best_s = np.full(len(q), -np.inf, dtype=np.float32)
    best_i = np.zeros(len(q), dtype=np.int64)
    for start in range(0, corpus.shape[0], chunk):
        scores = q @ np.asarray(corpus[start:start + chunk]).T
        i = scores.argmax(axis=1)
        s = scores[np.arange(len(q)), i]
        better = s > best_s
        best_s[better], best_i[better] = s[better], i[better] + start
    np.save(folder / "queries.npy", q)
    np.save(folder / "positives.npy", best_i)


def vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def child(folder: Path, chunk: int, search: str) -> None:
    import numpy as np

    from embedkit.mine import MiningSettings, MiningStats, NpyFileSource, mine_embeddings

    t0 = time.perf_counter()
    source = NpyFileSource(folder / "corpus.npy")
    queries = np.load(folder / "queries.npy")
    positives = np.load(folder / "positives.npy")
    settings = MiningSettings(range_min=10, range_max=100, num_negatives=3, relative_margin=0.05,
                              duplicate_threshold=0.98, corpus_chunk=chunk, search=search, sampling="top")
    stats = MiningStats()
    chosen = np.full((len(queries), settings.num_negatives), -1, dtype=np.int64)
    row = 0
    for block in mine_embeddings(queries, len(queries), source, np.arange(len(queries) + 1), positives, settings,
                                 stats=stats):
        for negatives in block.negatives:
            chosen[row, :len(negatives)] = negatives
            row += 1
    wall = time.perf_counter() - t0
    np.save(folder / f"negatives-{search}.npy", chosen)
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    hwm = vm_hwm_mb()
    print(json.dumps({"peak_rss_mb": round(hwm if hwm is not None else maxrss_mb, 1),
                      "ru_maxrss_mb": round(maxrss_mb, 1), "wall_s": round(wall, 1),
                      "negatives": int((chosen >= 0).sum()),
                      "stats": stats.to_dict()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--chunk", type=int, default=131072, help="corpus rows per search chunk")
    parser.add_argument("--search", default="exact", help="exact, hnsw or auto; several comma-separated: each mines "
                        "the same data and the approximate ones are compared with exact")
    parser.add_argument("--limit-gb", type=float, default=4.0)
    parser.add_argument("--workdir", help="where to write the synthetic data (default: a temp folder, removed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vectors", type=Path, help="mine real vectors: DIR/corpus.npy and DIR/queries.npy")
    parser.add_argument("--record", help="write the figures to this bench record (bench/records/...json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child), args.chunk, args.search)
        return
    if args.generate:
        generate(Path(args.generate), args.docs, args.queries, args.dim, args.seed)
        return

    with tempfile.TemporaryDirectory(prefix="bench-mine-", dir=args.workdir) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        if args.vectors:
            link_real(folder, args.vectors, args.queries)
            import numpy as np

            args.docs, args.dim = np.load(folder / "corpus.npy", mmap_mode="r").shape
            args.queries = len(np.load(folder / "queries.npy", mmap_mode="r"))
            what = f"real vectors from {args.vectors}"
        else:
            subprocess.run([sys.executable, __file__, "--generate", str(folder), "--docs", str(args.docs),
                            "--queries", str(args.queries), "--dim", str(args.dim), "--seed", str(args.seed)],
                           check=True)
            what = "synthetic corpus"
        size_gb = (folder / "corpus.npy").stat().st_size / 1e9
        print(f"{what}: {args.docs:,} x {args.dim} float32 ({size_gb:.2f} GB on disk), {args.queries:,} "
              f"queries: ready in {time.perf_counter() - t0:.1f} s", flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        results = {}
        for search in args.search.split(","):
            proc = subprocess.run([sys.executable, __file__, "--child", str(folder), "--chunk", str(args.chunk),
                                   "--search", search], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"mining subprocess ({search}) failed:\n{proc.stderr}")
            results[search] = json.loads(proc.stdout.strip().splitlines()[-1])
            report(results[search], args)
        if "exact" in results:
            import numpy as np

            exact = np.load(folder / "negatives-exact.npy")
            for search in results:
                if search != "exact":
                    other = np.load(folder / f"negatives-{search}.npy")
                    shared = sum(len(set(a[a >= 0].tolist()) & set(b[b >= 0].tolist())) for a, b in zip(exact, other))
                    results[search]["overlap_with_exact"] = round(shared / max(1, int((exact >= 0).sum())), 4)
                    print(f"{search}: {results[search]['overlap_with_exact']:.2%} of exact search's negatives chosen "
                          "too")
    over = [s for s, r in results.items() if r["peak_rss_mb"] > args.limit_gb * 1024]
    if args.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from record import write_record

        write_record(args.record, {"vectors": str(args.vectors) if args.vectors else "synthetic", "docs": args.docs,
                                   "queries": args.queries, "dim": args.dim, "chunk": args.chunk,
                                   "limit_gb": args.limit_gb, "seed": args.seed, "runs": results},
                     command=" ".join(sys.argv))
    if over:
        print(f"FAIL: peak RSS above the limit ({', '.join(over)})")
        sys.exit(1)
    print("PASS")


def report(result: dict, args) -> None:
    s = result["stats"]
    print(f"mining ({s['search']} search, chunks of {args.chunk:,}): wall {result['wall_s']:.1f} s "
          f"(search {s['seconds']['search']:.1f} s, positives {s['seconds']['positives']:.1f} s, near-duplicates "
          f"{s['seconds']['duplicates']:.1f} s, filters {s['seconds']['filter']:.1f} s)")
    print(f"peak RSS of the mining process: {result['peak_rss_mb']:.0f} MB (VmHWM); its ru_maxrss "
          f"{result['ru_maxrss_mb']:.0f} MB; limit {args.limit_gb * 1024:.0f} MB")
    print(f"candidates {s['candidates_in_window']:,}, removed {s['removed']}, negatives {result['negatives']:,}, "
          f"short queries {s['queries_short']}, positive in top 10: {s['positive_ranked_before_window']:,}",
          flush=True)


if __name__ == "__main__":
    main()
