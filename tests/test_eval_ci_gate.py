"""eval/ci_gate.sh, run for real (bash subprocess) against eval/baselines/minilm.json.

- the MiniLM model itself passes (evaluates stsb + stsb-paraphrase: ~1-2 min on 2 CPU cores, hence integration);
- prepared candidate reports (CANDIDATE_REPORT=..., no model) made from the baseline report: a clearly worse one
  fails, and a noisy drop a little beyond the margin passes by default but fails with STRICT=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedkit.eval.metrics import sts_correlations

REPO = Path(__file__).resolve().parents[1]
GATE = REPO / "eval" / "ci_gate.sh"
BASELINE = REPO / "eval" / "baselines" / "minilm.json"


def run_gate(*args: str, timeout: float = 120, **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", **env_extra)
    embedkit = Path(sys.executable).with_name("embedkit")  # the venv running the tests
    if embedkit.exists():
        env["EMBEDKIT"] = str(embedkit)
    return subprocess.run(["bash", str(GATE), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def baseline_report() -> dict:
    return json.loads(BASELINE.read_text(encoding="utf-8"))


def set_per_query(report: dict, task: str, scores: dict[str, float]) -> None:
    t = report["results"][task]
    for qid, value in scores.items():
        t["per_query"][qid]["ndcg_at_10"] = value
    t["metrics"]["ndcg_at_10"] = float(np.mean([v["ndcg_at_10"] for v in t["per_query"].values()]))


def write(report: dict, path: Path) -> Path:
    path.write_text(json.dumps(report), encoding="utf-8")
    return path


@pytest.mark.integration
def test_gate_passes_the_baseline_model_itself(tmp_path):
    result = run_gate("minilm", str(tmp_path / "gate"), timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no significant regression beyond 0.01 on 2 task(s) (exit 0)" in result.stdout
    comparison = json.loads((tmp_path / "gate" / "comparison.json").read_text())
    assert comparison["exit_code"] == 0 and not comparison["strict"]
    for task in comparison["tasks"]:
        assert abs(task["difference"]) < 0.002, task  # the same model on the same data
        assert task["verdict"] == "ok" and task["ci_low"] > -0.01
    assert (tmp_path / "gate" / "candidate.json").is_file() and (tmp_path / "gate" / "comparison.png").is_file()


def test_gate_fails_a_clearly_worse_report(tmp_path):
    worse = baseline_report()
    sts = worse["results"]["stsb"]
    gold = np.array(sts["per_pair"]["gold"])
    predicted = np.array(sts["per_pair"]["predicted"]) + np.random.default_rng(0).normal(0, 0.3, len(gold))
    sts["per_pair"]["predicted"] = predicted.tolist()
    sts["metrics"] = sts_correlations(predicted, gold)
    per_query = worse["results"]["stsb-paraphrase"]["per_query"]
    set_per_query(worse, "stsb-paraphrase", {q: 0.9 * v["ndcg_at_10"] for q, v in per_query.items()})

    result = run_gate(REPORT_DIR=str(tmp_path / "gate"), CANDIDATE_REPORT=str(write(worse, tmp_path / "worse.json")))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("stsb")}
    assert set(lines) == {"stsb", "stsb-paraphrase"}
    for line in lines.values():
        fields = line.split()
        assert "REGRESSION:" in fields and float(fields[7]) < 0.05  # p(drop>0.01)
    comparison = json.loads((tmp_path / "gate" / "comparison.json").read_text())
    assert comparison["exit_code"] == 1 and {t["verdict"] for t in comparison["tasks"]} == {"regression"}


def test_gate_noisy_drop_a_little_beyond_the_margin_passes_but_not_strict(tmp_path):
    """8 of 309 queries lose 0.46 nDCG@10: a mean drop of 0.012, not significantly beyond 0.01."""
    report = baseline_report()
    per_query = report["results"]["stsb-paraphrase"]["per_query"]
    n = len(per_query)
    hit = [q for q in sorted(per_query) if per_query[q]["ndcg_at_10"] == 1.0][:8]
    set_per_query(report, "stsb-paraphrase", {q: 1.0 - 0.012 * n / len(hit) for q in hit})
    candidate = write(report, tmp_path / "noisy.json")

    default = run_gate(REPORT_DIR=str(tmp_path / "default"), CANDIDATE_REPORT=str(candidate))
    assert default.returncode == 0, default.stdout + default.stderr
    task = next(t for t in json.loads((tmp_path / "default" / "comparison.json").read_text())["tasks"]
                if t["task"] == "stsb-paraphrase")
    assert task["difference"] == pytest.approx(-0.012, abs=1e-9)
    assert task["p_value"] > 0.05 and "not significantly beyond" in task["reason"]

    strict = run_gate(REPORT_DIR=str(tmp_path / "strict"), CANDIDATE_REPORT=str(candidate), STRICT="1")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "non-inferiority not shown on stsb-paraphrase" in strict.stdout
