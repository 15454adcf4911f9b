"""Benchmark: embedkit's evaluation against mteb's own, same model, same data, one process.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    .venv/bin/python bench/bench_eval.py --data ../shared/data/scifact --split test --runs 3

embedkit side: `embedkit.models.load_model("minilm")` + `embedkit.eval.runner.evaluate` (an empty embedding
cache each run, so both sides encode the whole corpus). mteb side: the same MiniLM weights through `SentenceTransformer`, the same
data registered as an mteb custom task (`embedkit.eval.mteb_adapter.to_mteb_task`), `mteb.evaluate`.
Prints both nDCG@10, their difference, the median wall time of N runs of each (model loading excluded) and
the ratio; `--cached` adds embedkit's time for a re-run with a warm corpus-embedding cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/scifact", help="BEIR folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--runs", type=int, default=1, help="timed runs per side; the median is reported")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cached", action="store_true", help="also time an embedkit re-run with a warm cache")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args()

    import mteb
    from mteb.cache import ResultCache
    from sentence_transformers import SentenceTransformer

    from embedkit.eval.mteb_adapter import to_mteb_task
    from embedkit.eval.runner import evaluate
    from embedkit.eval.tasks import load_task, parse_task_spec
    from embedkit.models import load_model
    from embedkit.models.registry import minilm_path

    spec = parse_task_spec(f"beir:{args.data}:{args.split}")
    loaded = load_task(spec)
    print(f"task {spec.name}: {loaded.sizes}", flush=True)

    encoder = load_model("minilm")
    st_model = SentenceTransformer(str(minilm_path()), device="cpu")

    ek_times, mteb_times = [], []
    ek_ndcg = mteb_ndcg = float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            # a fresh, empty cache folder per run: the corpus is encoded every time (writing the .npy is negligible),
            # and the last run's cache serves the --cached re-run
            run_cache = Path(tmp) / f"cache-{run}"
            t0 = time.perf_counter()
            report = evaluate(encoder, [spec], batch_size=args.batch_size, cache_dir=run_cache)
            ek_times.append(time.perf_counter() - t0)
            ek_ndcg = report["results"][spec.name]["metrics"]["ndcg_at_10"]
            print(f"run {run + 1}: embedkit nDCG@10 {ek_ndcg:.5f} in {ek_times[-1]:.1f} s", flush=True)

            task = to_mteb_task(loaded)
            t0 = time.perf_counter()
            result = mteb.evaluate(st_model, task, cache=ResultCache(str(Path(tmp) / "mteb")),
                                   overwrite_strategy="always", encode_kwargs={"batch_size": args.batch_size},
                                   show_progress_bar=False)
            mteb_times.append(time.perf_counter() - t0)
            scores = next(iter(result.task_results[0].scores.values()))[0]
            mteb_ndcg = float(scores["ndcg_at_10"])
            print(f"run {run + 1}: mteb     nDCG@10 {mteb_ndcg:.5f} in {mteb_times[-1]:.1f} s", flush=True)
        cached_s = None
        if args.cached:
            t0 = time.perf_counter()
            cached = evaluate(encoder, [spec], batch_size=args.batch_size, cache_dir=run_cache)
            cached_s = time.perf_counter() - t0
            assert cached["timings"]["tasks"][spec.name]["documents_from_cache"]
            assert cached["results"] == report["results"]  # the cache changes the time, not the numbers

    ek_median, mteb_median = statistics.median(ek_times), statistics.median(mteb_times)
    numbers = {
        "task": spec.name, "runs": args.runs, "batch_size": args.batch_size,
        "embedkit_ndcg_at_10": ek_ndcg, "mteb_ndcg_at_10": mteb_ndcg, "abs_difference": abs(ek_ndcg - mteb_ndcg),
        "embedkit_median_s": ek_median, "mteb_median_s": mteb_median, "ratio_embedkit_over_mteb": ek_median / mteb_median,
        "embedkit_cached_rerun_s": cached_s,
    }
    print(f"\nnDCG@10   embedkit {ek_ndcg:.5f}   mteb {mteb_ndcg:.5f}   |diff| {abs(ek_ndcg - mteb_ndcg):.6f}")
    print(f"wall (median of {args.runs})   embedkit {ek_median:.1f} s   mteb {mteb_median:.1f} s   "
          f"ratio embedkit/mteb {ek_median / mteb_median:.2f}")
    if cached_s is not None:
        print(f"embedkit re-run with warm embedding cache: {cached_s:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    main()
