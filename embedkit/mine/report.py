"""The mining summary: readable lines for the terminal and a PNG histogram of positive vs negative scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from embedkit.atomic import atomic_path
from embedkit.mine.settings import FILTERS

_SHOWN_SHORT = 10


def format_summary(summary: dict[str, Any]) -> str:
    s = summary["stats"]
    settings = summary["settings"]
    lines = [
        f"mined {s['queries']:,} queries ({s['pairs']:,} pairs) over a pool of {summary['pool_size']:,} documents, "
        f"search={s['search']}, window {settings['range_min']}:{settings['range_max']}, "
        f"{settings['num_negatives']} negatives ({settings['sampling']}, seed {settings['seed']})",
        f"candidates in window: {s['candidates_in_window']:,}",
    ]
    total = max(s["candidates_in_window"], 1)
    for name in FILTERS:
        if name in s["removed"] and _enabled(name, settings):
            n = s["removed"][name]
            lines.append(f"  removed by {name:<16} {n:>10,}  ({n / total:6.2%})  {_rule(name, settings)}")
    lines.append(f"  survivors                   {s['survivors']:>10,}  ({s['survivors'] / total:6.2%})")
    lines.append(f"negatives written: {s['negatives_written']:,}; rows written: {summary['rows_written']:,}")
    if s.get("rows_short"):
        lines.append(f"rows short of negatives: {s['rows_short']:,} of {s['pairs']:,} "
                     f"({s['rows_short'] / max(s['pairs'], 1):.0%}), {s.get('rows_without_negative', 0):,} with none")
    lines.append(
        f"positive ranked before the window (rank < {settings['range_min']}): {s['positive_ranked_before_window']:,}"
        f" queries; inside it: {s['positive_ranked_in_window']:,}; not in the top {settings['range_max']}: "
        f"{s['positive_not_in_top_range_max']:,}")
    header = f"{'scores':<10}{'count':>9}{'mean':>9}{'std':>9}{'min':>9}{'p25':>9}{'median':>9}{'p75':>9}{'max':>9}"
    lines.append(header)
    for label, d in (("positive", s["positive_scores"]), ("negative", s["negative_scores"])):
        if d.get("count"):
            lines.append(f"{label:<10}{d['count']:>9,}" + "".join(
                f"{d[k]:>9.4f}" for k in ("mean", "std", "min", "p25", "median", "p75", "max")))
        else:
            lines.append(f"{label:<10}{0:>9}")
    short = summary["short_queries"]
    if short:
        action = "left out of the output" if settings["on_short"] == "drop" else "kept with fewer negatives"
        lines.append(f"{len(short):,} queries found fewer than {settings['num_negatives']} negatives ({action}):")
        for item in short[:_SHOWN_SHORT]:
            text = item["query"] if len(item["query"]) <= 70 else item["query"][:67] + "..."
            lines.append(f"  {item['query_id']}: found {item['found']}  {text!r}")
        if len(short) > _SHOWN_SHORT:
            lines.append(f"  ... and {len(short) - _SHOWN_SHORT:,} more (all listed in the summary file)")
    else:
        lines.append(f"every query found {settings['num_negatives']} negatives")
    return "\n".join(lines)


def warning_lines(summary: dict[str, Any]) -> list[str]:
    """The summary's warnings, one line each (`embedkit mine` prints them last, on stderr)."""
    return [f"warning: {w['message']}" for w in summary.get("warnings", [])]


def _enabled(name: str, settings: dict[str, Any]) -> bool:
    key = {"known_positive": None, "near_duplicate": "duplicate_threshold"}.get(name, name)
    return key is None or settings.get(key) is not None


def _rule(name: str, settings: dict[str, Any]) -> str:
    return {
        "known_positive": "(a judged / paired positive of the query)",
        "near_duplicate": f"(cosine >= {settings['duplicate_threshold']} to a positive)",
        "absolute_margin": f"(score > pos - {settings['absolute_margin']}; {_reference(settings)})",
        "relative_margin": f"(score > pos - |pos| x {settings['relative_margin']}; {_reference(settings)})",
        "max_score": f"(score > {settings['max_score']})",
        "min_score": f"(score < {settings['min_score']})",
    }[name]


def _reference(settings: dict[str, Any]) -> str:
    """Which positive the margins are measured from, in words."""
    grade = settings.get("margin_grade", "all")
    among = {"top": "top-graded positives", "all": "positives"}.get(grade, f"positives graded >= {grade}")
    return f"pos = the {settings.get('margin_from', 'weakest')} of the query's {among}"


def write_histogram(path: str | Path, positive: np.ndarray, negative: np.ndarray, title: str) -> Path:
    """Overlaid histograms of positive and kept-negative scores, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    values = [v for v in (positive, negative) if v.size]
    if values:
        lo = min(float(v.min()) for v in values)
        hi = max(float(v.max()) for v in values)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 50)
        if positive.size:
            ax.hist(positive, bins=bins, alpha=0.6, label=f"positives ({positive.size:,})", color="tab:green")
        if negative.size:
            ax.hist(negative, bins=bins, alpha=0.6, label=f"kept negatives ({negative.size:,})", color="tab:red")
        ax.legend()
    ax.set_xlabel("score")
    ax.set_ylabel("count")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
