"""The benchmark pages of the documentation site, rendered from the records under bench/records/.

A mkdocs hook (mkdocs.yml: `hooks: [docs/gen_bench.py]`): on every build it adds benchmarks/index.md,
benchmarks/tune.md and benchmarks/eval.md as generated pages, so there is no copy of a number to drift from its
record. No extra package: mkdocs loads hooks itself.

- benchmarks/tune.md: every bench_tune record (bench/records/tune/<ds>.json): per data set the arms with nDCG@10 per
  seed, mean +- sd, steps and train seconds, `embedkit compare`'s verdicts, and the search (trials from
  <ds>-tune/tune_report.json);
- benchmarks/eval.md: every `embedkit eval` record under bench/records/eval/ (the base model's scores);
- benchmarks/index.md: which record feeds which page, and the provenance of each.

`python docs/gen_bench.py OUT_DIR` writes the same pages to OUT_DIR (to read them without mkdocs).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "bench" / "records"
PROVENANCE_KEYS = ("command", "commit", "date", "cpu")

ARMS = {  # bench_tune's arm names, in the order a reader compares them
    "default": "the recipe as written",
    "st": "sentence-transformers' default trainer (MNRL)",
    "tuned": "**tuned by `embedkit tune`**",
}
VERDICTS = {"tuned_vs_st": "tuned vs sentence-transformers' trainer", "tuned_vs_default": "tuned vs the recipe as written",
            "tuned_vs_base": "tuned vs the base model"}


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _f4(x) -> str:
    return "" if x is None else f"{x:.4f}"


def _signed(x) -> str:
    return f"{x:+.4f}"


def _code(text: str) -> str:
    return f"`{text.replace('`', '')}`"


def provenance(path: Path) -> dict:
    """command, commit, date, cpu of a record: its own, else the nearest PROVENANCE.json above it in bench/records."""
    record = _load(path)
    if isinstance(record, dict) and all(k in record for k in PROVENANCE_KEYS):
        return {k: record[k] for k in (*PROVENANCE_KEYS, "note") if k in record} | {"from": _rel(path)}
    folder = path.parent
    while RECORDS in folder.parents or folder == RECORDS:
        prov = folder / "PROVENANCE.json"
        if prov.is_file():
            return {k: v for k, v in _load(prov).items() if k in (*PROVENANCE_KEYS, "note")} | {"from": _rel(prov)}
        folder = folder.parent
    return {"from": None}


def _cpu(cpu) -> str:
    if isinstance(cpu, dict):
        flags = ", ".join(cpu.get("flags") or [])
        return f"{cpu.get('model', '?')}" + (f" ({flags})" if flags else "")
    return str(cpu)


def _provenance_lines(path: Path) -> list[str]:
    p = provenance(path)
    if p["from"] is None:
        return [f"- provenance of {_code(_rel(path))}: none found"]
    lines = [f"- record: {_code(_rel(path))} (provenance from {_code(p['from'])})",
             f"- commit {_code(str(p.get('commit')))}, date {p.get('date')}, CPU {_cpu(p.get('cpu'))}"]
    return lines + ([f"- note: {p['note']}"] if p.get("note") else [])


# ---------------------------------------------------------------- tune


def tune_records() -> list[Path]:
    """bench_tune's per-run records: the JSONs in bench/records/tune/ with "datasets" and "arms"."""
    out = []
    for path in sorted((RECORDS / "tune").glob("*.json")):
        record = _load(path)
        if isinstance(record, dict) and "datasets" in record and "arms" in record:
            out.append(path)
    return out


def _arm_row(name: str, arm: dict, seeds: list) -> str:
    runs = arm.get("runs") or []
    scores = [r.get("ndcg_at_10") for r in runs]
    per_seed = " / ".join(_f4(s) for s in scores)
    mean = arm.get("ndcg_at_10", statistics.fmean(scores) if scores else None)
    sd = arm.get("ndcg_at_10_sd", statistics.stdev(scores) if len(scores) > 1 else None)
    mean_sd = _f4(mean) + (f" +- {_f4(sd)}" if sd is not None else "")
    steps = sorted({r.get("steps") for r in runs if r.get("steps") is not None})
    secs = [r["train_s"] for r in runs if r.get("train_s") is not None]
    time = f"{min(secs):,.0f}-{max(secs):,.0f}" if secs else ""
    return (f"| {ARMS.get(name, name)} | {per_seed} | {mean_sd} | {'/'.join(str(s) for s in steps)} | {time} |")


def _settings(name: str, arm: dict) -> str:
    runs = arm.get("runs") or []
    if not runs:
        return ""
    r = runs[0]
    if "recipe" in r:
        t, loss, mining = r["recipe"]["training"], r["recipe"]["loss"], r["recipe"].get("mining") or {}
        neg = (f", {loss['hard_negatives']} negative(s)" + (f" mined online in {mining.get('range')}"
                                                            if mining.get("online") else "")
               if loss.get("hard_negatives") else ", no negatives")
        return (f"lr {t['lr']:g}, {t['epochs']} epoch(s), batch {t['batch_size']}, temperature {loss['temperature']:g}"
                f"{neg}")
    if "settings" in r:
        s = r["settings"]
        return (f"lr {s.get('learning_rate'):g}, {s.get('num_train_epochs'):g} epoch(s), batch {s.get('batch_size')}, "
                f"sampler {s.get('batch_sampler')}")
    return ""


def _search_lines(path: Path, ds: str, tune: dict) -> list[str]:
    lines = [f"**The search** ({tune.get('budget')} budget): {tune.get('trials')} trials, "
             f"{tune.get('search_seconds', 0) / 60:.1f} min for the whole command; it chose trial "
             f"{tune.get('best_trial')} (dev nDCG@10 {_f4(tune.get('dev'))}): "
             + ", ".join(f"{k} {v}" for k, v in (tune.get("chosen") or {}).items()) + "."]
    report_path = path.parent / f"{ds}-tune" / "tune_report.json"
    if not report_path.is_file():
        return lines
    report = _load(report_path)
    lines += ["", f"Trials ({_code(_rel(report_path))}):", "",
              "| trial | state | dev nDCG@10 | steps | seconds | parameters |", "|---:|---|---:|---:|---:|---|"]
    for t in report.get("trials", []):
        params = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in t["params"].items())
        lines.append(f"| {t['number']} | {t['state']} | {_f4(t.get('value'))} | {t.get('steps')} / "
                     f"{t.get('total_steps')} | {t.get('seconds', 0):,.0f} | {params} |")
    if report.get("stop_reason"):
        lines += ["", f"Stopped: {report['stop_reason']}."]
    return lines


def tune_page() -> str:
    out = ["# Benchmarks: `embedkit tune`", "",
           "Generated from `bench/records/tune/` by `docs/gen_bench.py` on every build of this site: every number "
           "below is read from the records, none is typed in. The narrative, with what the numbers mean and what they "
           "do not show, is on the [Tune](../tune.md) page.", ""]
    for path in tune_records():
        record = _load(path)
        seeds = record.get("seeds", [])
        for ds, d in record["datasets"].items():
            out += [f"## {ds}", "", f"Test task {_code(d.get('task', ''))}; seeds {', '.join(map(str, seeds))}; "
                    f"command {_code(record.get('command', ''))}.", ""]
            out += ["| arm | nDCG@10 per seed (" + " / ".join(map(str, seeds)) + ") | mean +- sd | steps | "
                    "train seconds per seed |", "|---|---|---|---:|---:|"]
            base = (d.get("base") or {}).get("ndcg_at_10")
            if base is not None:
                out.append(f"| base model | {_f4(base)} | | | |")
            for arm in [a for a in ARMS if a in d] + [a for a in record.get("arms", []) if a in d and a not in ARMS]:
                out.append(_arm_row(arm, d[arm], seeds))
            out += ["", "Settings of each arm's first run:", ""]
            out += [f"- {ARMS.get(a, a)}: {_settings(a, d[a])}" for a in ARMS if a in d and _settings(a, d[a])]
            if d.get("verdicts"):
                out += ["", "`embedkit compare` on the per-query nDCG@10 averaged over the seeds:", "",
                        "| comparison | difference | 95% interval | p(improvement) | verdict |", "|---|---:|---|---:|---|"]
                order = [k for k in VERDICTS if k in d["verdicts"]] + [k for k in d["verdicts"] if k not in VERDICTS]
                for key in order:
                    v = d["verdicts"][key]
                    out.append(f"| {VERDICTS.get(key, key)} | {_signed(v['difference'])} | [{_signed(v['ci_low'])}, "
                               f"{_signed(v['ci_high'])}] | {_f4(v['p_improvement'])} | {v['verdict']} "
                               f"(exit {v.get('exit_code')}) |")
            if d.get("tune"):
                out += [""] + _search_lines(path, ds, d["tune"])
            out += ["", *_provenance_lines(path), ""]
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------- eval


def eval_records() -> list[Path]:
    return sorted((RECORDS / "eval").glob("*.json"))


def eval_page() -> str:
    out = ["# Benchmarks: `embedkit eval`", "",
           "Generated from `bench/records/eval/` by `docs/gen_bench.py` on every build of this site. The tasks are "
           "described on the [Evaluate](../eval.md) page.", ""]
    for path in eval_records():
        record = _load(path)
        values = record.get("values", {})
        model = (values.get("model") or {}).get("name", path.stem)
        out += [f"## {model} ({_code(path.name)})", "", f"Command {_code(record.get('command', ''))}.", "",
                "| task | split | size | metric | value |", "|---|---|---|---|---:|"]
        for task, t in (values.get("tasks") or {}).items():
            sizes = ", ".join(f"{v:,} {k}" for k, v in (t.get("sizes") or {}).items())
            for metric, value in (t.get("metrics") or {}).items():
                out.append(f"| {task} | {t.get('split') or ''} | {sizes} | {metric} | {_f4(value)} |")
        out += ["", *_provenance_lines(path), ""]
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------- index and the hook


def index_page() -> str:
    out = ["# Benchmarks", "",
           "These pages are generated from the records under `bench/records/` by `docs/gen_bench.py` (a mkdocs hook) "
           "each time the site is built, so they cannot drift from the records. Figures quoted in the other pages sit "
           "in a record region naming their record (checked by `tests/test_readme_records.py`) or in an unrecorded "
           "region that says so; how records are written is in `bench/README.md`.", "",
           "- [`embedkit tune` against the recipe and sentence-transformers' trainer](tune.md): "
           + ", ".join(_code(_rel(p)) for p in tune_records()),
           "- [`embedkit eval` of the base model](eval.md): " + ", ".join(_code(_rel(p)) for p in eval_records()), ""]
    return "\n".join(out)


def pages() -> dict[str, str]:
    """benchmarks/<name>.md -> its Markdown."""
    return {"benchmarks/index.md": index_page(), "benchmarks/tune.md": tune_page(), "benchmarks/eval.md": eval_page()}


def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, text in pages().items():
        files.append(File.generated(config, uri, content=text))
    return files


def on_serve(server, config, builder):
    server.watch(str(RECORDS))  # `mkdocs serve` rebuilds when a record changes
    return server


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/gen_bench.py OUT_DIR")
    for uri, text in pages().items():
        target = Path(sys.argv[1]) / uri
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        print(target)
