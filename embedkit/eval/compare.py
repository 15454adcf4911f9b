"""Regression gate: is a candidate model significantly worse than a baseline on the same tasks?

Per task, the main metric decides (the others are shown for information):
- retrieval: a paired randomization (sign-flip) test over the per-query differences of the main metric,
  the standard test in IR evaluation (Smucker, Allan & Carterette, 2007);
- STS: a paired bootstrap over sentence pairs (Koehn, 2004) that recomputes Spearman on every resample
  for both models, because a correlation is not a mean of per-pair values.
Both tests are one-sided (H0: the candidate is not worse) and seeded, so the verdict is reproducible.

Exit codes: 0 = no significant regression larger than `max_drop`; 1 = regression; 2 = not comparable
(different task sets or data hashes: comparing them would be meaningless).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.errors import DataError

EXIT_OK = 0
EXIT_REGRESSION = 1
EXIT_NOT_COMPARABLE = 2

RANDOMIZATION_METHOD = "paired randomization test (sign flip) over per-query {metric}, one-sided, {n} permutations"
BOOTSTRAP_METHOD = "paired bootstrap over pairs recomputing {metric} (Koehn 2004), one-sided, {n} resamples"
NO_TEST_METHOD = "none: the report holds no per-query scores (mteb task); difference only"


@dataclass
class TaskComparison:
    task: str
    metric: str
    baseline: float
    candidate: float
    difference: float  # candidate - baseline; negative = worse
    p_value: float | None  # probability of a drop at least this large if the candidate were not worse
    method: str
    verdict: str  # "regression" | "ok"
    reason: str
    other_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Comparison:
    exit_code: int
    reason: str
    max_drop: float
    alpha: float
    seed: int
    tasks: list[TaskComparison] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        lines = []
        for t in self.tasks:
            p = "n/a" if t.p_value is None else f"{t.p_value:.4f}"
            lines.append(
                f"{t.task:<28} {t.metric:<16} base {t.baseline:.4f}  cand {t.candidate:.4f}  "
                f"diff {t.difference:+.4f}  p {p:<7} {t.verdict.upper()}: {t.reason}"
            )
        lines.append(f"verdict: {self.reason} (exit {self.exit_code})")
        return lines


def load_report(path: str | Path) -> dict[str, Any]:
    """Read an eval report JSON; anything that is not one is a DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError("report file not found", path=path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg})", path=path, line=exc.lineno) from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), dict):
        raise DataError("not an embedkit eval report (no 'results' object)", path=path, field="results")
    for name, task in report["results"].items():
        for key in ("task", "metrics"):
            if not isinstance(task, dict) or key not in task:
                raise DataError(f"task '{name}' has no '{key}'", path=path, field=f"results.{name}.{key}")
    return report


def paired_randomization_pvalue(
    baseline: np.ndarray, candidate: np.ndarray, *, permutations: int, rng: np.random.Generator
) -> float:
    """One-sided p-value that the candidate's mean is this much lower by chance (sign-flip test).

    Under H0 each query's difference is equally likely to have either sign; p is the share of random sign
    assignments whose mean difference is at least as negative as the observed one (+1 smoothing, never 0).
    """
    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    observed = diff.mean()
    if not np.any(diff):
        return 1.0
    as_low = 0
    chunk = max(1, 2_000_000 // max(1, len(diff)))  # bound memory: chunk x n signs at a time
    done = 0
    while done < permutations:
        size = min(chunk, permutations - done)
        signs = rng.integers(0, 2, size=(size, len(diff)), dtype=np.int8) * 2 - 1
        means = (signs * diff).mean(axis=1)
        as_low += int(np.sum(means <= observed + 1e-12))
        done += size
    return (as_low + 1) / (permutations + 1)


def _spearman_rows(gold: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row pair (rows are bootstrap resamples): Pearson of the ranks."""
    from scipy.stats import rankdata

    rg = rankdata(gold, axis=1)
    rp = rankdata(predicted, axis=1)
    rg -= rg.mean(axis=1, keepdims=True)
    rp -= rp.mean(axis=1, keepdims=True)
    denom = np.sqrt((rg * rg).sum(axis=1) * (rp * rp).sum(axis=1))
    return (rg * rp).sum(axis=1) / np.maximum(denom, 1e-300)


def paired_bootstrap_spearman_pvalue(
    gold: np.ndarray, baseline: np.ndarray, candidate: np.ndarray, *, resamples: int, rng: np.random.Generator
) -> float:
    """One-sided p-value: share of bootstrap resamples of pairs on which the candidate is not worse.

    Both models are scored on the same resampled pairs (that is what makes the bootstrap paired).
    """
    gold = np.asarray(gold, dtype=np.float64)
    baseline = np.asarray(baseline, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    n = len(gold)
    not_worse = 0
    chunk = max(1, 1_000_000 // max(1, n))
    done = 0
    while done < resamples:
        size = min(chunk, resamples - done)
        idx = rng.integers(0, n, size=(size, n))
        g = gold[idx]
        delta = _spearman_rows(g, candidate[idx]) - _spearman_rows(g, baseline[idx])
        not_worse += int(np.sum(delta >= 0))
        done += size
    return (not_worse + 1) / (resamples + 1)


def _not_comparable(reason: str, max_drop: float, alpha: float, seed: int) -> Comparison:
    return Comparison(EXIT_NOT_COMPARABLE, f"not comparable: {reason}", max_drop, alpha, seed)


def compare(
    baseline: dict[str, Any] | str | Path,
    candidate: dict[str, Any] | str | Path,
    *,
    max_drop: float = 0.01,
    alpha: float = 0.05,
    seed: int = 0,
    resamples: int = 2000,
) -> Comparison:
    """Compare two eval reports task by task; see the module docstring for the tests and exit codes.

    A task regresses when its main metric drops by more than `max_drop` (absolute, e.g. 0.01 nDCG@10)
    AND the drop is significant at level `alpha`.
    """
    if max_drop < 0:
        raise ValueError("max_drop must be >= 0")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    base = load_report(baseline) if not isinstance(baseline, dict) else baseline
    cand = load_report(candidate) if not isinstance(candidate, dict) else candidate
    base_tasks, cand_tasks = base["results"], cand["results"]

    if set(base_tasks) != set(cand_tasks):
        only_b = sorted(set(base_tasks) - set(cand_tasks))
        only_c = sorted(set(cand_tasks) - set(base_tasks))
        return _not_comparable(
            f"different task sets (only in baseline: {only_b or '-'}; only in candidate: {only_c or '-'})",
            max_drop, alpha, seed,
        )
    for name in sorted(base_tasks):
        hb = base_tasks[name]["task"].get("data_hash")
        hc = cand_tasks[name]["task"].get("data_hash")
        if hb != hc:
            return _not_comparable(
                f"task '{name}' was evaluated on different data (hash {str(hb)[:12]} vs {str(hc)[:12]})",
                max_drop, alpha, seed,
            )

    rng = np.random.default_rng(seed)
    comparisons: list[TaskComparison] = []
    for name in sorted(base_tasks):
        tb, tc = base_tasks[name], cand_tasks[name]
        metric = tb["task"]["main_metric"]
        if metric not in tb["metrics"] or metric not in tc["metrics"]:
            return _not_comparable(f"task '{name}' lacks its main metric '{metric}' in one report", max_drop, alpha, seed)
        b_value, c_value = float(tb["metrics"][metric]), float(tc["metrics"][metric])
        difference = c_value - b_value

        p_value: float | None
        if "per_query" in tb and "per_query" in tc:
            if set(tb["per_query"]) != set(tc["per_query"]):
                return _not_comparable(f"task '{name}' was scored on different queries", max_drop, alpha, seed)
            qids = sorted(tb["per_query"])
            b_scores = np.array([tb["per_query"][q][metric] for q in qids])
            c_scores = np.array([tc["per_query"][q][metric] for q in qids])
            p_value = paired_randomization_pvalue(b_scores, c_scores, permutations=resamples, rng=rng)
            method = RANDOMIZATION_METHOD.format(metric=metric, n=resamples)
        elif "per_pair" in tb and "per_pair" in tc:
            gold = np.array(tb["per_pair"]["gold"])
            if len(gold) != len(tc["per_pair"]["gold"]) or not np.array_equal(gold, np.array(tc["per_pair"]["gold"])):
                return _not_comparable(f"task '{name}' was scored on different pairs", max_drop, alpha, seed)
            p_value = paired_bootstrap_spearman_pvalue(
                gold, np.array(tb["per_pair"]["predicted"]), np.array(tc["per_pair"]["predicted"]),
                resamples=resamples, rng=rng,
            )
            method = BOOTSTRAP_METHOD.format(metric=metric, n=resamples)
        else:
            p_value, method = None, NO_TEST_METHOD

        drop = -difference
        significant = p_value is not None and p_value < alpha
        if drop > max_drop and (significant or p_value is None):
            verdict = "regression"
            reason = f"drop {drop:.4f} > max_drop {max_drop}" + (f" and p {p_value:.4f} < alpha {alpha}" if p_value is not None else " (no test possible)")
        elif drop > max_drop:
            verdict, reason = "ok", f"drop {drop:.4f} > max_drop but not significant (p {p_value:.4f} >= {alpha})"
        elif drop > 0:
            verdict, reason = "ok", f"drop {drop:.4f} within max_drop {max_drop}"
        else:
            verdict, reason = "ok", "no drop"
        others = {
            m: {"baseline": float(tb["metrics"][m]), "candidate": float(tc["metrics"][m]),
                "difference": float(tc["metrics"][m]) - float(tb["metrics"][m])}
            for m in tb["metrics"] if m != metric and m in tc["metrics"]
        }
        comparisons.append(TaskComparison(name, metric, b_value, c_value, difference, p_value, method, verdict, reason, others))

    regressions = [t.task for t in comparisons if t.verdict == "regression"]
    if regressions:
        return Comparison(EXIT_REGRESSION, f"regression on {', '.join(regressions)}", max_drop, alpha, seed, comparisons)
    return Comparison(EXIT_OK, f"no significant regression beyond {max_drop} on {len(comparisons)} task(s)",
                      max_drop, alpha, seed, comparisons)
