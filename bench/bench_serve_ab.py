"""Server throughput of this embedkit against another copy of it (before/after), interleaved to share the noise.

    .venv/bin/python bench/bench_serve_ab.py --other /tmp/ek_head [--other-env OMP_WAIT_POLICY=PASSIVE]
        [--model minilm] [--backend torch] [--runs 5] [--texts 2000] [--json out.json]

Make the other copy with `mkdir -p /tmp/ek_head && git archive HEAD embedkit | tar -x -C /tmp/ek_head`. Each run
starts each version's `embedkit serve` in its own process, in turn, and drives it with bench_serve.py's client
(MedQuAD questions in requests of 32, concurrency 1 then 8). On a shared machine one pass varies by +-20%: the
medians of several interleaved runs are what to compare. `--other-env` sets variables for the other version only
(e.g. to give it this version's OMP_WAIT_POLICY=PASSIVE and compare the batchers alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import bench_serve  # noqa: E402  (bench/ is on sys.path: a script)

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", required=True, help="a folder holding another copy of the embedkit package")
    parser.add_argument("--other-env", action="append", default=[], help="NAME=VALUE for the other version")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--port", type=int, default=8441)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    texts = bench_serve.load_texts(args.texts)
    other_env = dict(item.split("=", 1) for item in args.other_env)
    versions = {"this": (REPO, {}), "other": (Path(args.other), {"PYTHONPATH": args.other, **other_env})}
    rates: dict[str, list[float]] = {}
    for run in range(args.runs):
        for name, (folder, extra) in versions.items():
            # `python -m` puts the working folder first on sys.path: run where the package to serve is
            process = subprocess.Popen([sys.executable, "-m", "embedkit.cli", "serve", "--model", args.model,
                                        "--backend", args.backend, "--port", str(args.port), "--log-level", "warning"],
                                       env={**os.environ, **extra}, cwd=folder, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{args.port}"
            try:
                bench_serve.wait_up(url, process)
                for concurrency in (1, 8):
                    rate, _ = bench_serve.drive_median(url, texts, args.batch, concurrency, 1)
                    rates.setdefault(f"{name} c{concurrency}", []).append(rate)
            finally:
                process.terminate()
                process.wait()
            print(f"run {run + 1} {name}: " + ", ".join(f"c{c} {rates[f'{name} c{c}'][-1]:.0f}" for c in (1, 8))
                  + f" texts/s (load average {os.getloadavg()[0]:.1f})", flush=True)
    report = {key: {"median": statistics.median(values), "runs": [round(v) for v in values]}
              for key, values in rates.items()}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
