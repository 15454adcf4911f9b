"""Regression gate: exit codes 0 / 1 / 2, the margin-shifted paired tests, --strict, reproducibility with a seed.

The synthetic cases build per-query (retrieval) and per-pair (STS) scores whose true drop is just below / just above
the margin max_drop = 0.01; the gate must test the margin (H0: drop <= 0.01), not "any drop".
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from embedkit.errors import DataError
from embedkit.eval.compare import (
    EXIT_NOT_COMPARABLE,
    EXIT_OK,
    EXIT_REGRESSION,
    compare,
    load_report,
    paired_bootstrap_spearman_pvalue,
    paired_bootstrap_spearman_test,
    paired_randomization_pvalue,
    paired_randomization_test,
)
from embedkit.eval.metrics import sts_correlations


def retrieval_task(per_query_ndcg: np.ndarray, data_hash: str = "h1") -> dict:
    per_query = {f"q{i:03d}": {"ndcg_at_10": float(v), "mrr_at_10": float(v)} for i, v in enumerate(per_query_ndcg)}
    return {
        "task": {"name": "ret", "type": "retrieval", "main_metric": "ndcg_at_10", "data_hash": data_hash},
        "metrics": {"ndcg_at_10": float(np.mean(per_query_ndcg)), "mrr_at_10": float(np.mean(per_query_ndcg))},
        "per_query": per_query,
    }


def sts_task(predicted: np.ndarray, gold: np.ndarray, data_hash: str = "s1") -> dict:
    return {
        "task": {"name": "sts", "type": "sts", "main_metric": "cosine_spearman", "data_hash": data_hash},
        "metrics": sts_correlations(predicted, gold),
        "per_pair": {"predicted": [float(x) for x in predicted], "gold": [float(x) for x in gold]},
    }


@pytest.fixture()
def base_report():
    rng = np.random.default_rng(0)
    gold = rng.random(300) * 5
    return {
        "results": {
            "ret": retrieval_task(rng.random(200)),
            "sts": sts_task(gold + rng.normal(0, 0.5, 300), gold),
        }
    }


def test_same_report_is_ok_with_p_one(base_report):
    result = compare(base_report, copy.deepcopy(base_report))
    assert result.exit_code == EXIT_OK
    assert all(t.difference == 0 and t.p_value == 1.0 and t.p_improvement == 1.0 for t in result.tasks)
    assert all(t.ci_low == 0 and t.ci_high == 0 for t in result.tasks)
    assert compare(base_report, copy.deepcopy(base_report), strict=True).exit_code == EXIT_OK


def test_clearly_worse_retrieval_is_a_regression(base_report):
    worse = copy.deepcopy(base_report)
    base = np.array([v["ndcg_at_10"] for _, v in sorted(base_report["results"]["ret"]["per_query"].items())])
    worse["results"]["ret"] = retrieval_task(base * 0.8)
    result = compare(base_report, worse, seed=1, resamples=500)
    assert result.exit_code == EXIT_REGRESSION
    ret = next(t for t in result.tasks if t.task == "ret")
    assert ret.verdict == "regression" and ret.p_value < 0.01 and "randomization" in ret.method
    assert "mrr_at_10" in ret.other_metrics


def test_clearly_worse_sts_is_a_regression(base_report):
    gold = np.array(base_report["results"]["sts"]["per_pair"]["gold"])
    worse = copy.deepcopy(base_report)
    worse["results"]["sts"] = sts_task(gold + np.random.default_rng(5).normal(0, 3.0, len(gold)), gold)
    result = compare(base_report, worse, resamples=500)
    sts = next(t for t in result.tasks if t.task == "sts")
    assert result.exit_code == EXIT_REGRESSION and sts.verdict == "regression"
    assert "bootstrap" in sts.method and sts.p_value < 0.01


def test_small_drop_within_max_drop_passes(base_report):
    base = np.array([v["ndcg_at_10"] for _, v in sorted(base_report["results"]["ret"]["per_query"].items())])
    slightly = copy.deepcopy(base_report)
    slightly["results"]["ret"] = retrieval_task(base - 0.005)  # consistent, hence significant, but small
    assert compare(base_report, slightly, max_drop=0.01, resamples=500).exit_code == EXIT_OK
    assert compare(base_report, slightly, max_drop=0.001, resamples=500).exit_code == EXIT_REGRESSION


def test_insignificant_large_drop_passes():
    # two queries: one drops by 0.5, one rises by 0.3 -- a mean drop of 0.1 that a sign flip reproduces easily
    base = {"results": {"ret": retrieval_task(np.array([0.9, 0.2]))}}
    cand = {"results": {"ret": retrieval_task(np.array([0.4, 0.5]))}}
    result = compare(base, cand)
    assert result.exit_code == EXIT_OK and "not significant" in result.tasks[0].reason
    # ... and --strict, which needs the whole 95% interval above -max_drop, fails it
    assert compare(base, cand, strict=True).exit_code == EXIT_REGRESSION


def test_different_data_or_tasks_are_not_comparable(base_report):
    other_data = copy.deepcopy(base_report)
    other_data["results"]["ret"]["task"]["data_hash"] = "h2"
    result = compare(base_report, other_data)
    assert result.exit_code == EXIT_NOT_COMPARABLE and "different data" in result.reason
    fewer = copy.deepcopy(base_report)
    del fewer["results"]["sts"]
    result = compare(base_report, fewer)
    assert result.exit_code == EXIT_NOT_COMPARABLE and "task sets" in result.reason


def test_pvalues_are_reproducible_with_a_seed_and_sensible():
    rng = np.random.default_rng(2)
    a = rng.random(100)
    b = a - 0.05 + rng.normal(0, 0.2, 100)
    p1 = paired_randomization_pvalue(a, b, permutations=500, rng=np.random.default_rng(7))
    p2 = paired_randomization_pvalue(a, b, permutations=500, rng=np.random.default_rng(7))
    assert p1 == p2
    # a better candidate gives a large one-sided p-value
    assert paired_randomization_pvalue(a, a + 0.1, permutations=500, rng=np.random.default_rng(0)) > 0.9
    gold = rng.random(80)
    assert paired_bootstrap_spearman_pvalue(gold, gold, gold + rng.normal(0, 1, 80), resamples=300,
                                            rng=np.random.default_rng(0)) < 0.01


def test_load_report_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json:1"):
        load_report(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"hello": 1}))
    with pytest.raises(DataError, match="field 'results'"):
        load_report(wrong)


# ---- synthetic scores around the margin --------------------------------------------------------------------------

MARGIN = 0.01
ROUNDS = 4000  # sign assignments / bootstrap resamples: ~0.2 s per retrieval task of 1,000 queries


def per_query_pair(drop: float, sd: float, n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Baseline and candidate per-query nDCG whose mean difference is exactly -drop, with noise of std `sd`."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.25, 0.75, n)
    noise = rng.uniform(-1.0, 1.0, n) * sd * np.sqrt(3.0)  # uniform: bounded, so scores stay in [0, 1]
    noise -= noise.mean()
    cand = base + noise - drop
    assert cand.min() >= 0 and cand.max() <= 1
    return base, cand


def retrieval_reports(drop: float, sd: float, **kw) -> tuple[dict, dict]:
    base, cand = per_query_pair(drop, sd, **kw)
    return {"results": {"ret": retrieval_task(base)}}, {"results": {"ret": retrieval_task(cand)}}


def sts_reports(drop: float, n: int = 1000, seed: int = 0) -> tuple[dict, dict]:
    """STS reports whose Spearman differs by -drop (to 1e-6): candidate = baseline prediction + e x noise,
    e found by bisection (for an improvement the noise points towards the gold scores)."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(seed)
    gold = rng.uniform(0, 5, n)
    base = gold + rng.normal(0, 1.2, n)
    direction = gold - base if drop < 0 else rng.normal(0, 1, n)
    rho = spearmanr(gold, base)[0]

    def achieved(e: float) -> float:
        return rho - spearmanr(gold, base + e * direction)[0]

    lo, hi = 0.0, (1.0 if drop < 0 else 10.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (achieved(mid) < drop if drop > 0 else achieved(mid) > drop) else (lo, mid)
    cand = base + (lo + hi) / 2 * direction
    assert achieved((lo + hi) / 2) == pytest.approx(drop, abs=1e-4)
    return {"results": {"sts": sts_task(base, gold)}}, {"results": {"sts": sts_task(cand, gold)}}


def test_noisy_drop_just_beyond_the_margin_passes_by_default():
    base, cand = retrieval_reports(drop=0.012, sd=0.1)
    result = compare(base, cand, max_drop=MARGIN, resamples=ROUNDS)
    ret = result.tasks[0]
    assert ret.difference == pytest.approx(-0.012)
    assert result.exit_code == EXIT_OK and ret.verdict == "ok", result.summary_lines()
    assert ret.p_value > 0.1 and "not significantly beyond" in ret.reason
    # the drop itself is real (testing "any drop", as the gate used to, would have failed it) ...
    b, c = per_query_pair(0.012, 0.1)
    assert paired_randomization_pvalue(b, c, permutations=ROUNDS, rng=np.random.default_rng(0)) < 0.01
    assert compare(base, cand, max_drop=0.0, resamples=ROUNDS).exit_code == EXIT_REGRESSION
    # ... its interval lies below 0 and straddles -max_drop, so --strict (non-inferiority) fails it
    assert ret.ci_low < -MARGIN < ret.ci_high < 0
    assert ret.p_improvement > 0.99
    assert compare(base, cand, max_drop=MARGIN, resamples=ROUNDS, strict=True).exit_code == EXIT_REGRESSION


def test_drop_well_beyond_the_margin_fails():
    base, cand = retrieval_reports(drop=0.03, sd=0.1)
    for strict in (False, True):
        result = compare(base, cand, max_drop=MARGIN, resamples=ROUNDS, strict=strict)
        assert result.exit_code == EXIT_REGRESSION and result.tasks[0].verdict == "regression"
    ret = result.tasks[0]
    assert ret.p_value < 0.001 and ret.ci_high < -MARGIN
    assert "significantly beyond max_drop" in compare(base, cand, resamples=ROUNDS).tasks[0].reason


def test_strict_fails_a_small_drop_whose_interval_crosses_the_margin():
    base, cand = retrieval_reports(drop=0.005, sd=0.12)  # within the margin, but noisy
    default = compare(base, cand, max_drop=MARGIN, resamples=ROUNDS)
    strict = compare(base, cand, max_drop=MARGIN, resamples=ROUNDS, strict=True)
    assert default.exit_code == EXIT_OK
    assert strict.exit_code == EXIT_REGRESSION and "non-inferiority not shown" in strict.tasks[0].reason
    assert strict.tasks[0].ci_low < -MARGIN < strict.tasks[0].ci_high
    assert "non-inferiority not shown on ret" in strict.reason
    # the same small drop, measured precisely: the interval lies above -max_drop, so --strict passes
    base, cand = retrieval_reports(drop=0.002, sd=0.02)
    tight = compare(base, cand, max_drop=MARGIN, resamples=ROUNDS, strict=True)
    assert tight.exit_code == EXIT_OK and tight.tasks[0].ci_low > -MARGIN and "non-inferior" in tight.reason


def test_clear_improvement_passes_in_both_modes_with_a_small_improvement_p():
    base, cand = retrieval_reports(drop=-0.03, sd=0.1)
    for strict in (False, True):
        result = compare(base, cand, max_drop=MARGIN, resamples=ROUNDS, strict=strict)
        assert result.exit_code == EXIT_OK
        ret = result.tasks[0]
        assert ret.p_improvement < 0.001 and ret.p_value > 0.99 and ret.ci_low > 0


def test_sts_drop_just_beyond_the_margin_passes_and_well_beyond_fails():
    base, cand = sts_reports(0.012)
    result = compare(base, cand, max_drop=MARGIN, resamples=2000)
    sts = result.tasks[0]
    assert result.exit_code == EXIT_OK and sts.p_value > 0.1 and "bootstrap" in sts.method
    assert sts.ci_low < -MARGIN < sts.ci_high
    assert compare(base, cand, max_drop=MARGIN, resamples=2000, strict=True).exit_code == EXIT_REGRESSION

    base, cand = sts_reports(0.03)
    result = compare(base, cand, max_drop=MARGIN, resamples=2000)
    assert result.exit_code == EXIT_REGRESSION and result.tasks[0].p_value < 0.01
    assert result.tasks[0].ci_high < -MARGIN


def test_sts_clear_improvement_passes_in_both_modes():
    base, cand = sts_reports(-0.03)
    for strict in (False, True):
        result = compare(base, cand, max_drop=MARGIN, resamples=2000, strict=strict)
        assert result.exit_code == EXIT_OK
        assert result.tasks[0].p_improvement < 0.01 and result.tasks[0].ci_low > 0


def test_the_margin_test_is_the_plain_test_on_shifted_differences():
    """p(drop > m) on (baseline, candidate) == p(drop > 0) on (baseline, candidate + m), same seed."""
    b, c = per_query_pair(0.012, 0.1, n=300)
    shifted = paired_randomization_test(b, c, margin=0.01, permutations=2000, rng=np.random.default_rng(3))
    plain = paired_randomization_test(b, c + 0.01, margin=0.0, permutations=2000, rng=np.random.default_rng(3))
    assert shifted.p_regression == pytest.approx(plain.p_regression)
    gold = np.random.default_rng(1).random(200)
    pred_b = gold + np.random.default_rng(2).normal(0, 0.3, 200)
    pred_c = gold + np.random.default_rng(4).normal(0, 0.4, 200)
    wide = paired_bootstrap_spearman_test(gold, pred_b, pred_c, margin=0.05, resamples=1000, rng=np.random.default_rng(0))
    none = paired_bootstrap_spearman_test(gold, pred_b, pred_c, margin=0.0, resamples=1000, rng=np.random.default_rng(0))
    assert wide.p_regression >= none.p_regression  # a larger margin is easier to stay within
    assert (wide.ci_low, wide.ci_high) == (none.ci_low, none.ci_high)  # the interval does not depend on it
    assert paired_bootstrap_spearman_pvalue(gold, pred_b, pred_c, resamples=1000, rng=np.random.default_rng(0),
                                            margin=0.05) == wide.p_regression


def test_interval_is_a_bootstrap_percentile_interval_close_to_the_t_interval():
    b, c = per_query_pair(0.012, 0.1)
    test = paired_randomization_test(b, c, margin=0.01, permutations=ROUNDS, rng=np.random.default_rng(0))
    d = c - b
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert test.ci_low == pytest.approx(d.mean() - half, abs=0.001)
    assert test.ci_high == pytest.approx(d.mean() + half, abs=0.001)


def test_task_without_per_query_scores(base_report):
    def mteb_like(value: float) -> dict:
        return {"results": {"m": {"task": {"name": "m", "type": "mteb", "main_metric": "main_score", "data_hash": "x"},
                                  "metrics": {"main_score": value}}}}

    assert compare(mteb_like(0.5), mteb_like(0.495)).exit_code == EXIT_OK  # observed drop within the margin
    assert compare(mteb_like(0.5), mteb_like(0.48)).exit_code == EXIT_REGRESSION
    strict = compare(mteb_like(0.5), mteb_like(0.5), strict=True)
    assert strict.exit_code == EXIT_REGRESSION and "cannot be shown" in strict.tasks[0].reason
    assert strict.tasks[0].p_value is None and strict.tasks[0].ci_low is None


def test_summary_line_format():
    base, cand = retrieval_reports(drop=0.03, sd=0.1, n=200)
    lines = compare(base, cand, resamples=500).summary_lines()
    assert lines[0].split() == ["task", "metric", "baseline", "candidate", "diff", "95%", "CI", "p(drop>0.01)",
                                "p(improve)", "verdict"]
    fields = lines[1].split()
    assert fields[:2] == ["ret", "ndcg_at_10"] and fields[4] == "-0.0300"
    assert fields[5].startswith("[") and fields[6].endswith("]")
    assert float(fields[7]) < 0.05 and float(fields[8]) > 0.9 and fields[9] == "REGRESSION:"
    assert lines[-2].startswith("gate: default") and lines[-1].endswith("(exit 1)")
    strict_lines = compare(base, cand, resamples=500, strict=True).summary_lines()
    assert strict_lines[-2].startswith("gate: strict")


def test_cli_strict_flag_and_help(tmp_path):
    import typer
    from typer.testing import CliRunner

    from embedkit.eval.cli import compare_command

    app = typer.Typer()
    app.command("compare")(compare_command)
    app.command("noop")(lambda: None)  # two commands, so "compare" is a subcommand as in embedkit
    runner = CliRunner()
    help_text = " ".join(runner.invoke(app, ["compare", "--help"], env={"COLUMNS": "200"}).stdout.split())
    for phrase in ("H0 mean d >= -m", "H1 mean d < -m", "shifted by +m", "sign-flip", "bootstrap percentile",
                   "p(improve)", "--strict", "exit 0 pass, 1 regression, 2 not comparable"):
        assert phrase in help_text, phrase
    base, cand = retrieval_reports(drop=0.005, sd=0.12)  # within the margin, interval crosses it
    (tmp_path / "b.json").write_text(json.dumps(base))
    (tmp_path / "c.json").write_text(json.dumps(cand))
    return_code = {}
    for extra in ([], ["--strict"]):
        result = runner.invoke(app, ["compare", "-b", str(tmp_path / "b.json"), "-c", str(tmp_path / "c.json"),
                                     "--resamples", "1000", *extra])
        return_code[tuple(extra)] = result.exit_code
        assert "95% CI" in result.stdout and "test: retrieval: paired randomization" in result.stdout
    assert return_code == {(): 0, ("--strict",): 1}


def test_margin_test_rejects_at_rate_alpha_at_the_margin_and_never_for_no_drop():
    """Size and power of the shifted sign-flip test on simulated queries (i.i.d. normal noise, seeded)."""
    rng = np.random.default_rng(123)

    def rejection_rate(true_drop: float, sims: int = 150, n: int = 200) -> float:
        base = rng.uniform(0.3, 0.7, (sims, n))
        cand = base - true_drop + rng.normal(0, 0.1, (sims, n))
        return float(np.mean([paired_randomization_test(b, c, margin=MARGIN, permutations=300, rng=rng).p_regression
                              < 0.05 for b, c in zip(base, cand)]))

    assert 0.01 <= rejection_rate(MARGIN) <= 0.12  # at the boundary of H0: about alpha
    assert rejection_rate(0.0) == 0.0  # no drop at all: never a regression


# ---------------------------------------------------------------------------------------------- several seeds
def _seed_reports(per_query: np.ndarray, offsets: list[float]) -> list[dict]:
    """One report per trained seed: the same per-query scores shifted by that seed's luck."""
    return [{"results": {"ret": retrieval_task(np.clip(per_query + o, 0, 1))}} for o in offsets]


def test_several_seeds_are_averaged_and_get_an_interval_over_the_seeds():
    # Bugs caught: only the first report of a side used; the seeds' interval pooled or paired instead of Welch's.
    from scipy import stats

    from embedkit.eval.compare import seed_interval

    base = np.random.default_rng(3).uniform(0.2, 0.8, 300)
    b_offsets, c_offsets = [0.0, 0.004, -0.002], [0.02, 0.011, 0.03, 0.024]
    result = compare(_seed_reports(base, b_offsets), _seed_reports(base, c_offsets), resamples=500)
    (task,) = result.tasks
    assert task.seeds == [3, 4]
    assert task.difference == pytest.approx(np.mean(c_offsets) - np.mean(b_offsets))
    b_values = [float(np.mean(base + o)) for o in b_offsets]
    c_values = [float(np.mean(base + o)) for o in c_offsets]
    welch = stats.ttest_ind(c_values, b_values, equal_var=False).confidence_interval(0.95)
    assert (task.seeds_ci_low, task.seeds_ci_high) == pytest.approx((welch.low, welch.high), abs=1e-9)
    # one report on a side is a fixed model (the base model): the other side's one-sample t interval
    one_sample = stats.ttest_1samp(c_values, b_values[0]).confidence_interval(0.95)
    got = seed_interval(b_values[:1], c_values)
    assert got == pytest.approx((one_sample.low - b_values[0], one_sample.high - b_values[0]), abs=1e-9)
    assert seed_interval([0.8], [0.9]) is None  # no side with two seeds: no spread to estimate
    assert "over the seeds" in "\n".join(result.summary_lines())


def test_strict_needs_the_seeds_to_agree_not_only_the_queries():
    # Bug caught: a 3-seed comparison passed --strict on the per-query interval alone, although the seeds' own
    # spread (the batch-order luck of few-label training) leaves the difference anywhere within +-0.05.
    base = np.random.default_rng(4).uniform(0.2, 0.8, 400)
    steady, lucky = _seed_reports(base, [0.0, 0.001, -0.001]), _seed_reports(base, [0.03, -0.03, 0.0])
    assert compare(steady, lucky, resamples=500).exit_code == EXIT_OK  # the default gate: no significant drop
    strict = compare(steady, lucky, strict=True, resamples=500)
    assert strict.tasks[0].ci_low > -0.01  # the per-query interval alone would pass
    assert strict.exit_code == EXIT_REGRESSION and "over the seeds" in strict.tasks[0].reason
    assert compare(steady, _seed_reports(base, [0.001, 0.0, 0.002]), strict=True).exit_code == EXIT_OK


def test_seeds_of_one_side_on_other_queries_are_refused():
    base = np.random.default_rng(5).uniform(0.2, 0.8, 50)
    seeds = _seed_reports(base, [0.0, 0.01])
    seeds[1]["results"]["ret"]["per_query"].pop("q000")
    with pytest.raises(DataError, match="report 2 of a side"):
        compare(seeds, _seed_reports(base, [0.0, 0.01]))


def test_cli_takes_several_seeds_per_side(tmp_path):
    from typer.testing import CliRunner

    from embedkit.cli import app

    base = np.random.default_rng(6).uniform(0.2, 0.8, 100)
    paths = {}
    for side, offsets in (("b", [0.0, 0.002]), ("c", [0.001, 0.003, 0.0])):
        for i, report in enumerate(_seed_reports(base, offsets)):
            paths.setdefault(side, []).append(tmp_path / f"{side}{i}.json")
            paths[side][-1].write_text(json.dumps(report))
    args = ["compare", *[a for p in paths["b"] for a in ("-b", str(p))], *[a for p in paths["c"] for a in ("-c", str(p))],
            "--resamples", "200", "-o", str(tmp_path / "cmp.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "seed means of 2 vs 3 reports" in result.output
    assert json.loads((tmp_path / "cmp.json").read_text())["tasks"][0]["seeds"] == [2, 3]
