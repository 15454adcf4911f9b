"""Eval reports: one JSON file (plus a Markdown summary beside it) and a PNG comparing several reports.

Layout of the JSON:

    {"format": "embedkit.eval.report/1",
     "results":  {task: {"task": {name, type, main_metric, split, data_hash, sizes},
                         "metrics": {...},
                         "per_query": {qid: {metric: value}}        (retrieval)
                         "per_pair": {"predicted": [...], "gold": [...]}}},   (STS)
     "manifest": {model describe(), data paths and hashes, seed, settings, library versions, command line,
                  reranker describe() and settings.rerank_top for a two-stage run,
                  data.<task>.synthetic: the folder's synthetic.json when its queries were generated},
     "timings":  {wall_time_s, per task phases}}

`results` depends only on model + data + settings: two runs with the same inputs give byte-identical
`results` blocks (times, dates and paths live in `manifest` / `timings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embedkit.atomic import atomic_path, write_json, write_text
from embedkit.data.beir import synthetic_marker, synthetic_note
from embedkit.manifest import base_manifest, device_fields

REPORT_FORMAT = "embedkit.eval.report/1"


def build_report(
    encoder: Any, loaded_tasks: list[Any], results: dict[str, Any], timings: dict[str, Any], *,
    seed: int, batch_size: int, top_k: int, search: str, wall_time_s: float, reranker: Any = None,
    rerank_top: int | None = None,
) -> dict[str, Any]:
    model = encoder.describe()
    data = {
        t.spec.name: {"spec": t.spec.spec, "path": t.spec.path or (str(t.data.path) if hasattr(t.data, "path") else None),
                      "split": t.spec.split, "data_hash": t.data_hash, "sizes": t.sizes}
        for t in loaded_tasks
    }
    for t in loaded_tasks:  # generated queries (embedkit synth --eval): every report that uses them says so
        marker = synthetic_marker(data[t.spec.name]["path"]) if t.spec.type == "retrieval" else None
        if marker is not None:
            data[t.spec.name]["synthetic"] = marker
    manifest = base_manifest(
        "eval_report", model=model, data=data, seed=seed,
        settings={"batch_size": batch_size, "top_k": top_k, "search": search,
                  "prompts": model.get("prompts"), "pooling": model.get("pooling"), "max_length": model.get("max_length"),
                  "sts_encoding": "both sentences with kind='query'", "normalize": True},
    )
    if reranker is not None:  # a two-stage report: the reranker is part of what was evaluated
        manifest["reranker"] = reranker.describe()
        manifest["settings"]["rerank_top"] = rerank_top
    manifest.update(device_fields(getattr(encoder, "device", None)))
    manifest["wall_time_s"] = round(wall_time_s, 3)
    return {
        "format": REPORT_FORMAT,
        "results": results,
        "manifest": manifest,
        "timings": {"wall_time_s": round(wall_time_s, 3), "tasks": timings},
    }


def write_report(report: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """Write the JSON report and `<stem>.md` beside it (both atomically); return both paths."""
    path = Path(path)
    write_json(path, report)
    md_path = path.with_suffix(".md")
    write_text(md_path, render_markdown(report))
    return path, md_path


def synthetic_notes(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(task, note) for every task whose queries were generated (a BEIR folder with synthetic.json)."""
    data = report.get("manifest", {}).get("data", {})
    return [(name, synthetic_note(d["synthetic"])) for name, d in data.items()
            if isinstance(d, dict) and isinstance(d.get("synthetic"), dict)]


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(task, main metric, value) per task, in report order."""
    return [(name, t["task"]["main_metric"], float(t["metrics"][t["task"]["main_metric"]]))
            for name, t in report["results"].items()]


def render_markdown(report: dict[str, Any]) -> str:
    manifest = report.get("manifest", {})
    model = manifest.get("model", {})
    lines = [
        f"# Eval report: {model.get('name', '?')}",
        "",
        f"- model fingerprint: `{str(model.get('fingerprint', '?'))[:16]}`, pooling {model.get('pooling')}, "
        f"max_length {model.get('max_length')}, dim {model.get('dim')}",
        f"- prompts: `{model.get('prompts')}`",
        f"- seed {manifest.get('seed')}, created {manifest.get('created')}, "
        f"wall time {report.get('timings', {}).get('wall_time_s')} s"
        + (f", device {manifest['device']}" if manifest.get("device") else "")
        + (f" x {manifest['processes']} processes" if manifest.get("processes") else ""),
        *([f"- reranked by `{manifest['reranker'].get('name')}` (fingerprint "
           f"`{str(manifest['reranker'].get('fingerprint'))[:16]}`), top {manifest['settings'].get('rerank_top')} "
           "per query; first-stage values under first_stage in the JSON"] if manifest.get("reranker") else []),
        *[f"- **{name}**: {note}" for name, note in synthetic_notes(report)],
        "",
        "| task | type | main metric | value | other metrics | data hash |",
        "|---|---|---|---|---|---|",
    ]
    for name, task in report["results"].items():
        info, metrics = task["task"], task["metrics"]
        main = info["main_metric"]
        others = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != main)
        lines.append(f"| {name} | {info['type']} | {main} | **{metrics[main]:.4f}** | {others} | "
                     f"`{str(info.get('data_hash'))[:12]}` |")
    lines.append("")
    return "\n".join(lines)


def plot_reports(reports: list[tuple[str, dict[str, Any]]], path: str | Path) -> Path:
    """A grouped bar chart of each task's main metric, one bar colour per report (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks: list[str] = []
    for _, report in reports:
        tasks += [name for name in report["results"] if name not in tasks]
    width = 0.8 / max(1, len(reports))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(tasks) + 2), 4))
    x = np.arange(len(tasks))
    for i, (label, report) in enumerate(reports):
        values = [report["results"][t]["metrics"][report["results"][t]["task"]["main_metric"]]
                  if t in report["results"] else 0.0 for t in tasks]
        bars = ax.bar(x + (i - (len(reports) - 1) / 2) * width, values, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    metric_names = sorted({r["results"][t]["task"]["main_metric"] for _, r in reports for t in r["results"]})
    ax.set_xticks(x, tasks, rotation=15)
    ax.set_ylabel(" / ".join(metric_names))
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("main metric per task")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
