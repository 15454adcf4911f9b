"""Benchmark: how noisy is one dev split? The measurement behind `embedkit tune`'s DEV_QUERIES_NEEDED.

    .venv/bin/python bench/bench_dev_noise.py --datasets medquad,scifact --out runs/dev-noise \
        --record bench/records/tune/dev-noise.json

Per data set (MiniLM, recipes/minilm-<dataset>.yaml; training data only, the test split is never read): `embedkit
tune --folds 1 --budget 2 --params lr,epochs --no-final` carves one 20% dev split from the training queries (its
corpus: 1,000 documents, the base model's nearest first) and trains two trials on the other 80%: trial 0 the recipe
as written (1 epoch at 2e-5), trial 1 the recipe trained longer (3 epochs at 4e-5). Both are scored on every dev
query (the search state keeps the per-query nDCG@10), and the per-query difference between them has a standard
deviation sd. Telling a gain of `delta` (0.01, the gate's margin) from noise at z standard errors (tune's NOISE_Z,
2) takes n = (z * sd / delta)^2 dev queries: the number of dev queries below which one split is not enough.

Why these two trials: they are the two ends of the schedule every search starts with (trial 0 and trial 1), the
pair whose difference a search on few labels must resolve first. The figure is a property of the data set and the
model pair; the record keeps both data sets' sd, and tune uses the larger.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from record import write_record

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
REPO = Path(__file__).resolve().parents[1]
RECIPES = {"medquad": "recipes/minilm-medquad.yaml", "scifact": "recipes/minilm-scifact.yaml"}
NOISE_Z, DELTA = 2.0, 0.01


def measure(dataset: str, out: Path) -> dict:
    folder = out / dataset
    command = [sys.executable, "-m", "embedkit.cli", "tune", RECIPES[dataset], "--budget", "2", "--folds", "1",
               "--params", "lr,epochs", "--no-final", "-o", str(folder), "--json"]
    if (folder / "search_state.json").is_file():
        command.append("--resume")
    print(f"[{dataset}] {' '.join(command)}", flush=True)
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    state = json.loads((folder / "search_state.json").read_text())
    first, longer = state["trials"][0], state["trials"][1]
    common = sorted(set(first["per_query"]) & set(longer["per_query"]))
    diffs = [longer["per_query"][q] - first["per_query"][q] for q in common]
    sd = statistics.stdev(diffs)
    return {"dev_queries": len(common), "trial0": {"params": first["params"], "ndcg_at_10": first["value"]},
            "trial1": {"params": longer["params"], "ndcg_at_10": longer["value"]},
            "mean_difference": statistics.fmean(diffs), "sd_difference": sd,
            "standard_error": sd / math.sqrt(len(diffs)),
            "queries_needed": math.ceil((NOISE_Z * sd / DELTA) ** 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="medquad,scifact")
    parser.add_argument("--out", default="runs/dev-noise")
    parser.add_argument("--record", help="write the record here (bench/records/tune/dev-noise.json)")
    args = parser.parse_args()
    values = {"z": NOISE_Z, "delta": DELTA}
    for dataset in args.datasets.split(","):
        values[dataset] = row = measure(dataset, Path(args.out))
        print(f"[{dataset}] {row['dev_queries']} dev queries: trial 1 - trial 0 = {row['mean_difference']:+.4f}, "
              f"sd {row['sd_difference']:.4f} per query -> {row['queries_needed']} queries to resolve "
              f"{DELTA} at {NOISE_Z:g} standard errors", flush=True)
    values["sd_max"] = max(values[d]["sd_difference"] for d in args.datasets.split(","))
    print(json.dumps(values, indent=1))
    if args.record:
        write_record(args.record, values, command="bench/bench_dev_noise.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
