"""Regression gate: is a candidate model worse than a baseline by more than a margin, on the same tasks?

Per task only the main metric decides (the others are shown for information). Write d = candidate - baseline
(negative = worse) and m = `max_drop`. Three numbers are computed per task, all paired and seeded:

- p(regression beyond the margin): a one-sided test of H0: mean d >= -m (the drop is at most m) against
  H1: mean d < -m (the drop exceeds m). The per-query differences are shifted by +m, and the paired test runs on
  the shifted values:
  - retrieval: a paired randomization (sign-flip) test over the per-query differences of the main metric, the
    standard test in IR evaluation (Smucker, Allan & Carterette, 2007). Under H0 (at its boundary) the shifted
    differences d_i + m are symmetric around 0, so p = share of random sign assignments whose mean of
    (d_i + m) is at least as low as the observed one;
  - STS: a paired bootstrap over sentence pairs (Koehn, 2004) that recomputes Spearman for both models on every
    resample (a correlation is not a mean of per-pair values); p = share of resamples whose difference + m is
    >= 0, i.e. on which the drop is at most m.
- p(improvement): the same test, unshifted and in the other direction (H0: mean d <= 0, H1: mean d > 0).
- a 95% interval of the difference: paired bootstrap percentile interval (2.5th and 97.5th percentiles of the
  difference over resamples of queries / pairs).

Both p-values use +1 smoothing, so they are never 0.

Several trained seeds per side (`compare([r1, r2, r3], [s1, s2, s3])`, `embedkit compare -b r1 -b r2 -c s1 -c s2`):
the tests above run on each side's seed average (per query, per pair, per metric), and each task also gets an
interval *over the seeds*: Welch's t interval of the difference of the seeds' means of the main metric. Why both:
the per-query tests hold the test set's noise but not the training run's, and with few training examples the run's
own randomness (batch order, dropout) moves a score as much as the differences people gate on (MedQuAD, 100
training queries: nDCG@10 sd 0.008 over 6 seeds of one recipe), so two recipes can differ "beyond the interval" on 3
seeds by the luck of their batch orders. The seeds are independent draws, not paired across the sides (one
trainer's seed 42 is not another's), hence Welch's unequal-variance t. `--strict` then asks both intervals to lie
above -max_drop; the default gate's p-values stay the per-query ones, and the seed interval is reported beside them.

Decision (exit codes): 0 = pass, 1 = regression, 2 = not comparable (different task sets, data hashes, queries
or pairs: comparing them would be meaningless).
- default: a task regresses when p(regression beyond the margin) < `alpha` (and the observed drop > m). A noisy
  drop slightly above m therefore passes; the gate fails only when the data show the drop exceeds m.
- strict (non-inferiority): a task passes only when the lower end of its 95% interval is > -m; otherwise it
  regresses. A task without per-query / per-pair scores (an mteb task) has no interval and fails in strict mode;
  in default mode it regresses when its observed drop exceeds m (no test possible).
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

INTERVAL_LEVEL = 0.95  # the interval --strict checks; fixed, independent of alpha

RANDOMIZATION_METHOD = (
    "retrieval: paired randomization test (sign flip) over per-query {metric} differences shifted by +max_drop, "
    "one-sided, {n} sign assignments; 95% interval: paired bootstrap percentile over queries, {n} resamples"
)
BOOTSTRAP_METHOD = (
    "STS: paired bootstrap over pairs recomputing {metric} (Koehn 2004), p = share of resamples with "
    "difference + max_drop >= 0, one-sided; 95% interval: bootstrap percentile; {n} resamples"
)
NO_TEST_METHOD = "none: the report holds no per-query scores (mteb task); difference only"


@dataclass
class TaskComparison:
    task: str
    metric: str
    baseline: float
    candidate: float
    difference: float  # candidate - baseline; negative = worse
    p_value: float | None  # p(regression beyond the margin): H0 drop <= max_drop, H1 drop > max_drop
    method: str
    verdict: str  # "regression" | "ok"
    reason: str
    other_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    p_improvement: float | None = None  # H0 difference <= 0, H1 difference > 0
    ci_low: float | None = None  # 95% paired bootstrap percentile interval of the difference
    ci_high: float | None = None
    seeds: list[int] | None = None  # [baseline, candidate] reports averaged; None: one each
    seeds_ci_low: float | None = None  # 95% Welch interval over the seeds (>= 2 on a side)
    seeds_ci_high: float | None = None


@dataclass
class Comparison:
    exit_code: int
    reason: str
    max_drop: float
    alpha: float
    seed: int
    tasks: list[TaskComparison] = field(default_factory=list)
    strict: bool = False
    interval_level: float = INTERVAL_LEVEL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        """One line per task: task metric baseline candidate diff [95% CI lo, hi] p(drop>m) p(improve) verdict."""
        def num(x: float | None, fmt: str) -> str:
            return "n/a" if x is None else format(x, fmt)

        p_head = f"p(drop>{self.max_drop:g})"
        lines = [f"{'task':<28} {'metric':<16} {'baseline':>8} {'candidate':>9} {'diff':>8}  {'95% CI':<18}  "
                 f"{p_head:<12} {'p(improve)':<10}  verdict"]
        for t in self.tasks:
            ci = "[n/a]" if t.ci_low is None else f"[{t.ci_low:+.4f}, {t.ci_high:+.4f}]"
            lines.append(
                f"{t.task:<28} {t.metric:<16} {t.baseline:>8.4f} {t.candidate:>9.4f} {t.difference:>+8.4f}  "
                f"{ci:<18}  {num(t.p_value, '.4f'):<12} {num(t.p_improvement, '.4f'):<10}  "
                f"{t.verdict.upper()}: {t.reason}"
            )
            if t.seeds is not None:
                over = ("n/a (needs 2 seeds on a side)" if t.seeds_ci_low is None
                        else f"[{t.seeds_ci_low:+.4f}, {t.seeds_ci_high:+.4f}]")
                lines.append(f"{'':<28} {'':<16} seed means of {t.seeds[0]} vs {t.seeds[1]} reports; "
                             f"95% interval over the seeds (Welch): {over}")
        if self.strict:
            rule = (f"strict (non-inferiority): pass only when every task's {self.interval_level:.0%} interval lies "
                    f"above -{self.max_drop:g}")
        else:
            rule = (f"default: regression when p(drop>{self.max_drop:g}) < alpha {self.alpha:g} "
                    f"(H0: drop <= {self.max_drop:g}; H1: drop > {self.max_drop:g})")
        lines.append(f"gate: {rule}")
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


def seed_interval(baseline: list[float], candidate: list[float], level: float = INTERVAL_LEVEL
                  ) -> tuple[float, float] | None:
    """Welch's t interval of mean(candidate) - mean(baseline) over independent seeds. A side of one report is a fixed
    model (the base model, a released baseline: no training noise), which leaves the other side's one-sample t
    interval; None when neither side has 2 seeds."""
    if len(baseline) < 2 and len(candidate) < 2:
        return None
    from scipy import stats

    def spread(values: list[float]) -> float:  # the variance of the side's mean; 0 for a fixed model
        return float(np.var(values, ddof=1)) / len(values) if len(values) > 1 else 0.0

    vb, vc = spread(baseline), spread(candidate)
    diff = float(np.mean(candidate) - np.mean(baseline))
    se = float(np.sqrt(vb + vc))
    if se == 0:
        return diff, diff
    # Welch-Satterthwaite degrees of freedom: the sides' variances are not assumed equal
    dof = (vb + vc) ** 2 / sum(v ** 2 / (len(side) - 1) for v, side in ((vb, baseline), (vc, candidate))
                               if len(side) > 1)
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
    return diff - half, diff + half


def seed_average(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several trained seeds of one model on the same tasks: metrics, per-query scores and per-pair
    predictions averaged over the seeds (the paired tests then compare the two sides' expected scores).
    Reports on other tasks, data or queries are a DataError."""
    if len(reports) == 1:
        return reports[0]
    first = reports[0]["results"]
    for i, report in enumerate(reports[1:], start=2):
        other = report["results"]
        if set(other) != set(first):
            raise DataError(f"report {i} of a side holds other tasks than report 1 ({sorted(other)} vs "
                            f"{sorted(first)}): seeds of one model must be evaluated on the same tasks")
        for name in first:
            if other[name]["task"].get("data_hash") != first[name]["task"].get("data_hash") or \
                    set(other[name].get("per_query", {})) != set(first[name].get("per_query", {})):
                raise DataError(f"report {i} of a side scored task '{name}' on other data or queries than report 1")
    merged: dict[str, Any] = {}
    for name, task in first.items():
        tasks = [r["results"][name] for r in reports]
        out = {**task, "metrics": {m: float(np.mean([t["metrics"][m] for t in tasks])) for m in task["metrics"]
                                   if all(m in t["metrics"] for t in tasks)}}
        if all("per_query" in t for t in tasks):
            out["per_query"] = {q: {m: float(np.mean([t["per_query"][q][m] for t in tasks])) for m in values}
                                for q, values in task["per_query"].items()}
        if all("per_pair" in t for t in tasks):
            out["per_pair"] = {"gold": task["per_pair"]["gold"],
                               "predicted": np.mean([t["per_pair"]["predicted"] for t in tasks], axis=0).tolist()}
        merged[name] = out
    return {**reports[0], "results": merged, "seed_reports": len(reports)}


def _tol(x: float) -> float:
    return 1e-12 * max(1.0, abs(x))


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass
class PairedTest:
    """Result of one paired test; differences are candidate - baseline."""

    p_regression: float  # H0: mean difference >= -margin; H1: mean difference < -margin
    p_improvement: float  # H0: mean difference <= 0; H1: mean difference > 0
    ci_low: float
    ci_high: float


def paired_randomization_test(
    baseline: np.ndarray, candidate: np.ndarray, *, margin: float = 0.0, permutations: int,
    rng: np.random.Generator, level: float = INTERVAL_LEVEL,
) -> PairedTest:
    """Sign-flip test over per-query differences d_i = candidate_i - baseline_i, plus a bootstrap interval.

    p_regression: the differences are shifted by +margin; under H0 (mean d = -margin at the boundary) the
    shifted values are symmetric around 0, so each gets a random sign; p is the share of sign assignments whose
    mean is at least as low as the observed mean of d_i + margin. p_improvement: the same with the unshifted d_i,
    share of sign assignments whose mean is at least as high as the observed mean. The interval is the paired
    bootstrap percentile interval of the mean difference (queries resampled with replacement).
    """
    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    n = len(diff)
    if n == 0:
        raise ValueError("no per-query scores to test")
    shifted = diff + margin
    obs_shifted, obs = float(shifted.mean()), float(diff.mean())
    as_low = as_high = 0
    chunk = max(1, 2_000_000 // n)  # bound memory: chunk x n signs at a time
    done = 0
    while done < permutations:
        size = min(chunk, permutations - done)
        signs = (rng.integers(0, 2, size=(size, n), dtype=np.int8) * 2 - 1).astype(np.float64)
        as_low += int(np.sum(signs @ shifted / n <= obs_shifted + _tol(obs_shifted)))
        as_high += int(np.sum(signs @ diff / n >= obs - _tol(obs)))
        done += size
    boot = np.empty(permutations)
    chunk = max(1, 2_000_000 // n)
    done = 0
    while done < permutations:
        size = min(chunk, permutations - done)
        boot[done:done + size] = diff[rng.integers(0, n, size=(size, n))].mean(axis=1)
        done += size
    lo, hi = _percentile_interval(boot, level)
    return PairedTest((as_low + 1) / (permutations + 1), (as_high + 1) / (permutations + 1), lo, hi)


def paired_randomization_pvalue(
    baseline: np.ndarray, candidate: np.ndarray, *, permutations: int, rng: np.random.Generator,
    margin: float = 0.0,
) -> float:
    """One-sided p-value of a drop larger than `margin` (sign-flip test on differences shifted by +margin)."""
    return paired_randomization_test(baseline, candidate, margin=margin, permutations=permutations,
                                     rng=rng).p_regression


def _resample_ranks(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties share their mean rank) of values[idx] within each row of `idx`.

    Equal to scipy.stats.rankdata(values[idx], axis=1), without sorting every resample: an element's rank in a
    resample only depends on how many drawn elements are smaller or equal, which a per-row count over the
    (sorted, deduplicated) values gives.
    """
    _, group = np.unique(values, return_inverse=True)  # group = dense rank of each original value
    n_groups = int(group.max()) + 1
    rows = idx.shape[0]
    g = group[idx]
    counts = np.bincount((g + n_groups * np.arange(rows)[:, None]).ravel(), minlength=rows * n_groups)
    counts = counts.reshape(rows, n_groups)
    below_or_equal = np.cumsum(counts, axis=1)
    mid = below_or_equal - (counts - 1) / 2.0  # average rank of each value group within each row
    return np.take_along_axis(mid, g, axis=1)


def _pearson_rows(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    rx = rx - rx.mean(axis=1, keepdims=True)
    ry = ry - ry.mean(axis=1, keepdims=True)
    denom = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    return (rx * ry).sum(axis=1) / np.maximum(denom, 1e-300)


def _spearman_rows(gold: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row pair (rows are bootstrap resamples): Pearson of the ranks."""
    from scipy.stats import rankdata

    return _pearson_rows(rankdata(gold, axis=1), rankdata(predicted, axis=1))


def paired_bootstrap_spearman_test(
    gold: np.ndarray, baseline: np.ndarray, candidate: np.ndarray, *, margin: float = 0.0, resamples: int,
    rng: np.random.Generator, level: float = INTERVAL_LEVEL,
) -> PairedTest:
    """Paired bootstrap over pairs of delta = Spearman(candidate) - Spearman(baseline).

    Both models are scored on the same resampled pairs (that is what makes the bootstrap paired).
    p_regression = share of resamples with delta + margin >= 0 (the drop is at most `margin`; H0 side);
    p_improvement = share with delta <= 0; the interval is the percentile interval of delta.
    """
    gold = np.asarray(gold, dtype=np.float64)
    baseline = np.asarray(baseline, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    n = len(gold)
    if n < 3:
        raise ValueError("too few pairs to bootstrap a correlation")
    deltas = np.empty(resamples)
    chunk = max(1, 1_000_000 // n)
    done = 0
    while done < resamples:
        size = min(chunk, resamples - done)
        idx = rng.integers(0, n, size=(size, n))
        rank_gold = _resample_ranks(gold, idx)
        deltas[done:done + size] = (_pearson_rows(rank_gold, _resample_ranks(candidate, idx))
                                    - _pearson_rows(rank_gold, _resample_ranks(baseline, idx)))
        done += size
    within_margin = int(np.sum(deltas + margin >= -_tol(margin)))
    not_better = int(np.sum(deltas <= 0))
    lo, hi = _percentile_interval(deltas, level)
    return PairedTest((within_margin + 1) / (resamples + 1), (not_better + 1) / (resamples + 1), lo, hi)


def paired_bootstrap_spearman_pvalue(
    gold: np.ndarray, baseline: np.ndarray, candidate: np.ndarray, *, resamples: int, rng: np.random.Generator,
    margin: float = 0.0,
) -> float:
    """One-sided p-value of a Spearman drop larger than `margin` (paired bootstrap over pairs)."""
    return paired_bootstrap_spearman_test(gold, baseline, candidate, margin=margin, resamples=resamples,
                                          rng=rng).p_regression


def _not_comparable(reason: str, max_drop: float, alpha: float, seed: int, strict: bool) -> Comparison:
    return Comparison(EXIT_NOT_COMPARABLE, f"not comparable: {reason}", max_drop, alpha, seed, strict=strict)


def _decide(drop: float, test: PairedTest | None, *, max_drop: float, alpha: float, strict: bool) -> tuple[str, str]:
    """(verdict, reason) of one task; see the module docstring."""
    if strict:
        if test is None:
            return "regression", "no per-query scores, so no interval: non-inferiority cannot be shown (--strict)"
        if test.ci_low > -max_drop:
            return "ok", f"95% CI lower end {test.ci_low:+.4f} > -max_drop {-max_drop:g}: non-inferior"
        return "regression", (f"95% CI lower end {test.ci_low:+.4f} <= -max_drop {-max_drop:g}: "
                              "non-inferiority not shown")
    if test is None:
        if drop > max_drop:
            return "regression", f"drop {drop:.4f} > max_drop {max_drop:g} (no test possible)"
        return "ok", (f"drop {drop:.4f} within max_drop {max_drop:g} (no test possible)" if drop > 0 else "no drop")
    p = test.p_regression
    if drop > max_drop and p < alpha:
        return "regression", f"drop {drop:.4f} significantly beyond max_drop {max_drop:g} (p {p:.4f} < alpha {alpha:g})"
    if drop > max_drop:
        return "ok", (f"drop {drop:.4f} > max_drop {max_drop:g} but not significantly beyond it "
                      f"(p {p:.4f} >= alpha {alpha:g})")
    if drop > 0:
        return "ok", f"drop {drop:.4f} within max_drop {max_drop:g}"
    return "ok", "no drop"


Reports = dict[str, Any] | str | Path | list


def compare(
    baseline: Reports,
    candidate: Reports,
    *,
    max_drop: float = 0.01,
    alpha: float = 0.05,
    seed: int = 0,
    resamples: int = 2000,
    strict: bool = False,
) -> Comparison:
    """Compare two eval reports task by task; see the module docstring for the tests and exit codes.

    Default: a task regresses when its main metric drops by significantly more than `max_drop` (absolute, e.g.
    0.01 nDCG@10): the one-sided paired test of H0 drop <= max_drop gives p < `alpha`. `strict`: a task passes
    only when the lower end of the 95% interval of its difference is above -max_drop (non-inferiority).
    """
    if max_drop < 0:
        raise ValueError("max_drop must be >= 0")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    def loaded(side: Reports) -> list[dict[str, Any]]:
        items = side if isinstance(side, list) else [side]
        if not items:
            raise ValueError("a side of the comparison has no report")
        return [r if isinstance(r, dict) else load_report(r) for r in items]

    base_seeds, cand_seeds = loaded(baseline), loaded(candidate)
    several = len(base_seeds) > 1 or len(cand_seeds) > 1
    base, cand = seed_average(base_seeds), seed_average(cand_seeds)
    base_tasks, cand_tasks = base["results"], cand["results"]

    def not_comparable(reason: str) -> Comparison:
        return _not_comparable(reason, max_drop, alpha, seed, strict)

    if set(base_tasks) != set(cand_tasks):
        only_b = sorted(set(base_tasks) - set(cand_tasks))
        only_c = sorted(set(cand_tasks) - set(base_tasks))
        return not_comparable(
            f"different task sets (only in baseline: {only_b or '-'}; only in candidate: {only_c or '-'})")
    for name in sorted(base_tasks):
        hb = base_tasks[name]["task"].get("data_hash")
        hc = cand_tasks[name]["task"].get("data_hash")
        if hb != hc:
            return not_comparable(
                f"task '{name}' was evaluated on different data (hash {str(hb)[:12]} vs {str(hc)[:12]})")

    rng = np.random.default_rng(seed)
    comparisons: list[TaskComparison] = []
    for name in sorted(base_tasks):
        tb, tc = base_tasks[name], cand_tasks[name]
        metric = tb["task"]["main_metric"]
        if metric not in tb["metrics"] or metric not in tc["metrics"]:
            return not_comparable(f"task '{name}' lacks its main metric '{metric}' in one report")
        b_value, c_value = float(tb["metrics"][metric]), float(tc["metrics"][metric])
        difference = c_value - b_value

        test: PairedTest | None
        if "per_query" in tb and "per_query" in tc:
            if set(tb["per_query"]) != set(tc["per_query"]):
                return not_comparable(f"task '{name}' was scored on different queries")
            qids = sorted(tb["per_query"])
            b_scores = np.array([tb["per_query"][q][metric] for q in qids], dtype=np.float64)
            c_scores = np.array([tc["per_query"][q][metric] for q in qids], dtype=np.float64)
            test = paired_randomization_test(b_scores, c_scores, margin=max_drop, permutations=resamples, rng=rng)
            method = RANDOMIZATION_METHOD.format(metric=metric, n=resamples)
        elif "per_pair" in tb and "per_pair" in tc:
            gold = np.array(tb["per_pair"]["gold"])
            if len(gold) != len(tc["per_pair"]["gold"]) or not np.array_equal(gold, np.array(tc["per_pair"]["gold"])):
                return not_comparable(f"task '{name}' was scored on different pairs")
            test = paired_bootstrap_spearman_test(
                gold, np.array(tb["per_pair"]["predicted"]), np.array(tc["per_pair"]["predicted"]),
                margin=max_drop, resamples=resamples, rng=rng,
            )
            method = BOOTSTRAP_METHOD.format(metric=metric, n=resamples)
        else:
            test, method = None, NO_TEST_METHOD

        over_seeds = seed_interval([float(r["results"][name]["metrics"][metric]) for r in base_seeds],
                                   [float(r["results"][name]["metrics"][metric]) for r in cand_seeds])
        verdict, reason = _decide(-difference, test, max_drop=max_drop, alpha=alpha, strict=strict)
        if strict and verdict == "ok" and several:
            if over_seeds is not None and over_seeds[0] <= -max_drop:
                verdict, reason = "regression", (f"interval over the seeds reaches {over_seeds[0]:+.4f} <= -max_drop "
                                                 f"{-max_drop:g}: non-inferiority not shown across training runs")
        others = {
            m: {"baseline": float(tb["metrics"][m]), "candidate": float(tc["metrics"][m]),
                "difference": float(tc["metrics"][m]) - float(tb["metrics"][m])}
            for m in tb["metrics"] if m != metric and m in tc["metrics"]
        }
        comparisons.append(TaskComparison(
            task=name, metric=metric, baseline=b_value, candidate=c_value, difference=difference,
            p_value=None if test is None else test.p_regression, method=method, verdict=verdict, reason=reason,
            other_metrics=others, p_improvement=None if test is None else test.p_improvement,
            ci_low=None if test is None else test.ci_low, ci_high=None if test is None else test.ci_high,
            seeds=[len(base_seeds), len(cand_seeds)] if several else None,
            seeds_ci_low=None if over_seeds is None else over_seeds[0],
            seeds_ci_high=None if over_seeds is None else over_seeds[1],
        ))

    regressions = [t.task for t in comparisons if t.verdict == "regression"]
    if regressions:
        what = "non-inferiority not shown" if strict else "regression"
        return Comparison(EXIT_REGRESSION, f"{what} on {', '.join(regressions)}", max_drop, alpha, seed,
                          comparisons, strict=strict)
    ok = (f"non-inferior within {max_drop} (95% CI) on {len(comparisons)} task(s)" if strict else
          f"no significant regression beyond {max_drop} on {len(comparisons)} task(s)")
    return Comparison(EXIT_OK, ok, max_drop, alpha, seed, comparisons, strict=strict)
