"""The tune report: tune_report.json (everything), tune_report.md (for people) and dev_curve.png (best-so-far dev score
per trial), written atomically into the tune output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from embedkit.atomic import atomic_path, write_json, write_text
from embedkit.manifest import base_manifest

REPORT_FORMAT = "embedkit.tune.report/1"
JSON_NAME = "tune_report.json"
MD_NAME = "tune_report.md"
PNG_NAME = "dev_curve.png"


def build_report(state: dict[str, Any], recipe_text: str) -> dict[str, Any]:
    curve, best = [], None
    for trial in state["trials"]:
        if trial["state"] in ("complete", "repeat") and trial["value"] is not None:
            best = trial["value"] if best is None else max(best, trial["value"])
        curve.append({"trial": trial["number"], "state": trial["state"], "value": trial["value"],
                      "last_dev": trial["history"][-1]["score"] if trial["history"] else trial["value"],
                      "best_so_far": best})
    return {"format": REPORT_FORMAT, **state, "dev_curve": curve, "tuned_recipe": recipe_text,
            "manifest": base_manifest("tune_report", seed=state["seed"])}


def write_reports(output: Path, report: dict[str, Any]) -> dict[str, Path]:
    paths = {"json": output / JSON_NAME, "md": output / MD_NAME, "png": output / PNG_NAME}
    write_json(paths["json"], report)
    write_text(paths["md"], render_markdown(report))
    plot_curve(report, paths["png"])
    return paths


def _value(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3g}"
    return str(x)


def _param(x: Any) -> str:
    if x is None:  # a dependent parameter in a trial where its switch was off
        return "-"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def render_markdown(report: dict[str, Any]) -> str:
    metric = report["metric"]
    trials = report["trials"]
    best = next(t for t in trials if t["number"] == report["best_trial"])
    first = next((t for t in trials if t["number"] == 0 and t["state"] == "complete"), None)
    counts = {s: sum(1 for t in trials if t["state"] == s) for s in ("complete", "pruned", "failed", "repeat")}
    lines = [
        "# embedkit tune report",
        "",
        f"- recipe: `{report['recipe']}`" + (f" with `{' '.join('--set ' + o for o in report['overrides'])}`"
                                              if report["overrides"] else ""),
        f"- budget: {report['budget']['described']}; search {report['search_seconds']:.0f} s"
        + (f" ({report['preparation_seconds']:.0f} s of it preparing the dev split and the mining probe)"
           if report.get("preparation_seconds", 0) >= 1 else "") + ", "
        f"{len(trials)} trials ({counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed"
        + (f", {counts['repeat']} repeats" if counts["repeat"] else "") + f"); stopped: {report['stop_reason']}",
        f"- best: trial {best['number']}, dev {metric} {best['value']:.4f}"
        + (f" (trial 0, the recipe as written: {first['value']:.4f}; {best['value'] - first['value']:+.4f})"
           if first and best["number"] != 0 else " (the recipe as written)" if best["number"] == 0 else ""),
        f"- changed: {'; '.join(report['changes']) if report['changes'] else 'nothing: the recipe as written was best'}",
        f"- tuned recipe: `{report['recipe_file']}` (reproduce the model: `embedkit train {report['recipe_file']}`)",
        f"- model: `{report['model_dir']}`" if report["model_dir"] else "- model: not trained (--no-final)",
        f"- seed {report['seed']} (dev split and sampler); trials score the {report['objective']} dev {metric}, "
        f"evaluated every {report['eval_every']} steps ({report['steps_per_epoch']} steps per epoch)",
        *_rerank_lines(report.get("rerank"), metric),
        "",
        "## Dev split",
        "",
        _split_text(report["split"]),
        "",
    ]
    probe = report.get("probe")
    if probe:
        s = probe["stats"]
        lines += ["## Mining with the base model", "",
                  f"{s['queries']:,} queries, {s['pairs']:,} rows: {s['candidates_in_window']:,} candidates in the "
                  f"window, removed " + ", ".join(f"{k} {v:,}" for k, v in s["removed"].items() if v) +
                  f"; {s['rows_short']:,} rows short of negatives ({s['rows_without_negative']:,} with none) "
                  f"({probe['seconds']:.0f} s). A later round of online mining in a trial (new weights, no cache) "
                  f"is estimated at {probe.get('round_seconds', 0):.0f} s; the time budget counts it.", ""]
        if probe["warning"]:
            lines += [f"**Warning:** {probe['warning']['message']}. The margin was searched.", ""]
    static = report.get("static_negatives")
    if static and static["max_per_row"] and static["rows_without"] / static["rows"] > 0.5:
        lines += ["## Negatives in the data", "",
                  f"{static['rows_without']:,} of {static['rows']:,} training rows ({static['rows_without'] / static['rows']:.0%}) "
                  "carry no negative. If they were mined with `embedkit mine` and its margin warning, re-mine with "
                  "`--margin-from strongest` or a smaller `--relative-margin`, or set `mining.online: true` so that "
                  "tune searches the mining window and margin.", ""]
    lines += ["## Search space", "", "| parameter | bounds | the recipe | chosen | why these bounds hold elsewhere |",
              "|---|---|---|---|---|"]
    for p in report["space"]:
        needs = p.get("needs")  # searched only where its switch is on; the recipe as written has it off
        lines.append(f"| {p['name']} | {p['bounds']}{f' (where {needs} > 0)' if needs else ''} | "
                     f"{'off' if needs else _param(p['default'])} | "
                     f"{_param(report['chosen'].get(p['name']))} | {p['why']} |")
    names = [p["name"] for p in report["space"]]
    lines += ["", "## Trials", "",
              "| trial | " + " | ".join(names) + f" | dev {metric} | state | steps | seconds |",
              "|---|" + "---|" * len(names) + "---|---|---|---|"]
    for t in trials:
        state = t["state"] + (f" at step {t['pruned_at']}" if t["state"] == "pruned" else "")
        if t["note"]:
            state += f" ({t['note']})"
        shown = t["value"] if t["value"] is not None else (t["history"][-1]["score"] if t["history"] else None)
        mark = " **best**" if t["number"] == report["best_trial"] else ""
        steps = f"{t['steps']}/{t['total_steps']}" if t["steps"] is not None and t["total_steps"] else "-"
        lines.append(f"| {t['number']}{mark} | " + " | ".join(_param(t["params"].get(n)) for n in names)
                     + f" | {_value(shown)} | {state} | {steps} | {t['seconds']:.1f} |")
    lines += ["", "A pruned trial shows its last dev score before it was stopped.", "",
              "## Dev curve", "", "![best-so-far dev score per trial](dev_curve.png)", "",
              f"| trial | dev {metric} | best so far |", "|---|---|---|"]
    for point in report["dev_curve"]:
        lines.append(f"| {point['trial']} | {_value(point['last_dev'])} | {_value(point['best_so_far'])} |")
    final = report.get("final")
    if final:
        lines += ["", "## Final model", "",
                  f"Trained from the tuned recipe on all the training data: {final['steps']} steps in "
                  f"{final['seconds']:.0f} s ({final['samples_per_second']} samples/s) -> `{report['model_dir']}`."]
    test = report.get("test")
    if test:
        s = test["scores"]
        two_stage = f" (the top {test.get('rerank_top')} of the first stage, reranked)" if "first_stage" in s else ""
        labels = {"base": "base model", "first_stage": f"first stage alone (`{test.get('first_stage')}`)",
                  "default": "default recipe" + two_stage, "tuned": "tuned recipe" + two_stage}
        lines += ["", f"## Test: {test['task']} ({test['metric']})", "",
                  "| model | " + test["metric"] + " |", "|---|---|",
                  *(f"| {labels.get(name, name)} | {score:.4f} |" for name, score in s.items()), "",
                  "| comparison | difference | 95% CI | p(improvement) | gate (margin 0.01) |", "|---|---|---|---|---|"]
        for name, c in test["comparisons"].items():
            ci = "n/a" if c["ci_low"] is None else f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
            p = "n/a" if c["p_improvement"] is None else f"{c['p_improvement']:.4f}"
            lines.append(f"| tuned vs {c['baseline']} | {c['difference']:+.4f} | {ci} | {p} | {c['verdict']}: "
                         f"{c['reason']} |")
        lines += ["", "Paired over the test queries (`embedkit compare`); eval reports in `test/`."]
    lines += ["", "## The tuned recipe", "", "```yaml", report["tuned_recipe"].rstrip(), "```", ""]
    return "\n".join(lines)


def _rerank_lines(rerank: dict[str, Any] | None, metric: str) -> list[str]:
    """A reranker's search: what its dev score is, and the first stage's own on the same queries."""
    if not rerank:
        return []
    first = rerank.get("first_stage_dev")
    return [f"- a reranker (task: rerank): every dev {metric} is two-stage, `{rerank['first_stage']}`'s top "
            f"{rerank['top_k']} of the dev corpus reranked by the trial's model"
            + (f"; the first stage alone scores {first:.4f} on the same queries" if first is not None else "")]


def _split_text(split: dict[str, Any]) -> str:
    if not split["carved"]:
        return f"The recipe's own dev set `{split['dev_spec']}`; the trials train on all of `{split['train_spec']}`."
    return (f"Carved from the training queries (seed {split['seed']}, query-disjoint): {split['train_queries']:,} "
            f"queries ({split['train_pairs']:,} pairs) train the trials, {split['dev_queries']:,} queries "
            f"({split['dev_pairs']:,} pairs) score them against {split['dev_documents']:,} of the "
            f"{split['pool_documents']:,} documents ({_dev_corpus_text(split)}; a smaller corpus than the real one: "
            "dev scores only rank the trials). The final model trains on all of them.")


def _dev_corpus_text(split: dict[str, Any]) -> str:
    hard = split.get("hard_documents") or 0
    if not hard:
        return "their positives plus a seeded sample"
    return (f"their positives, the {hard:,} documents {split.get('ranked_by') or 'the base model'} ranks nearest "
            "to them, and a seeded sample of the rest")


def plot_curve(report: dict[str, Any], path: Path) -> Path:
    """Each trial's dev score (pruned trials: their last one, as crosses) and the best-so-far line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    curve = report["dev_curve"]
    fig, ax = plt.subplots(figsize=(7, 4))
    done = [(p["trial"], p["value"]) for p in curve if p["state"] in ("complete", "repeat") and p["value"] is not None]
    pruned = [(p["trial"], p["last_dev"]) for p in curve if p["state"] == "pruned" and p["last_dev"] is not None]
    best = [(p["trial"], p["best_so_far"]) for p in curve if p["best_so_far"] is not None]
    if done:
        ax.scatter(*zip(*done), color="tab:blue", label="trial (complete)", zorder=3)
    if pruned:
        ax.scatter(*zip(*pruned), color="tab:red", marker="x", label="trial (pruned: last dev score)", zorder=3)
    if best:
        ax.step(*zip(*best), where="post", color="tab:green", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"dev {report['metric']}")
    ax.set_title(f"embedkit tune: {Path(report['recipe']).name}, budget {report['budget']['described']}")
    if curve:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
