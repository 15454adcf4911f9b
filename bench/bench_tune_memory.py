"""Benchmark: the peak memory of an `embedkit tune` run against one training run of the same recipe.

    .venv/bin/python bench/bench_tune_memory.py --recipe recipes/minilm-medquad.yaml --budget 3 \
        --set data.max_examples=130 --out runs/tune-memory --record bench/records/tune/memory.json

Both commands run as a user runs them (`embedkit train RECIPE` and `embedkit tune RECIPE --budget B --test TASK`),
and a sampler adds up the resident memory of the command's whole process tree every 0.2 s (the tune process and the
trial, final-model and comparison processes it starts: what the machine has to hold at once), keeping the peak.
Issue #30 asks for a tune run's peak <= 1.3x one training run's (a held-out search peaked at 8.7 GB, three times
one training run, when every trial, the final and the default model lived in one process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from record import write_record

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
REPO = Path(__file__).resolve().parents[1]
INTERVAL = 0.2


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def peak_of(command: list[str]) -> tuple[float, float]:
    """(peak GB of the process tree, seconds) of `command`, run in the repository root."""
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(INTERVAL)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    code = proc.wait()
    thread.join()
    if code != 0:
        raise SystemExit(f"{command[3]} failed with exit code {code}")
    return peak[0] / 1e9, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/minilm-medquad.yaml")
    parser.add_argument("--budget", default="3")
    parser.add_argument("--test", default="beir:../shared/data/medquad/test:test")
    parser.add_argument("--set", action="append", default=[], help="recipe overrides for both runs")
    parser.add_argument("--out", default="runs/tune-memory")
    parser.add_argument("--record")
    args = parser.parse_args()
    out = Path(args.out)
    sets = [x for o in args.set for x in ("--set", o)]
    cli = [sys.executable, "-m", "embedkit.cli"]
    train_gb, train_s = peak_of([*cli, "train", args.recipe, *sets, "--set", f"training.output_dir={out / 'train'}"])
    tune_gb, tune_s = peak_of([*cli, "tune", args.recipe, *sets, "--budget", args.budget, "-o", str(out / "tune"),
                               "--test", args.test, "--allow-train-overlap"])
    # Which trials ran matters: a trial that mines negatives holds more texts per step than the recipe as written,
    # so a search that had time for the recipe alone measures less than the search's worst case.
    report = json.loads((out / "tune" / "tune_report.json").read_text())
    trials = [{"number": t.get("number"), "state": t.get("state"), "params": t.get("params")}
              for t in report.get("trials", [])]
    values = {"recipe": args.recipe, "overrides": args.set, "budget": args.budget, "test": args.test,
              "train_peak_gb": round(train_gb, 3), "train_s": round(train_s, 1), "tune_peak_gb": round(tune_gb, 3),
              "tune_s": round(tune_s, 1), "ratio": round(tune_gb / train_gb, 3), "trials": trials}
    print(f"peak memory of the process tree: train {train_gb:.2f} GB, tune {tune_gb:.2f} GB: "
          f"{values['ratio']:.2f}x (issue #30: <= 1.3x) over {len(trials)} trial(s): "
          + "; ".join(f"{t['number']} {t['state']} {t['params']}" for t in trials), flush=True)
    if args.record:
        write_record(args.record, values, command="bench/bench_tune_memory.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
