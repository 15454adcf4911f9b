"""Write a benchmark record under bench/records/: the figures a README may quote, with their provenance.

A record is one JSON object:

    {"command": "...", "commit": "<git rev-parse HEAD>[+dirty]", "date": "<UTC ISO 8601>",
     "cpu": {"model": "...", "flags": [...int8 instruction sets present...]}, "values": {...}}

`values` holds what the benchmark measured (per-seed values, not only means). `tests/test_readme_records.py`
checks that every figure a README quotes inside a `<!-- record: PATH -->` region is found in PATH.

In a bench script:

    from record import write_record            # bench/ is on sys.path when a bench script runs
    write_record("bench/records/eval/minilm-base.json", values, command=" ".join(sys.argv))

From the shell (values from a JSON file, or from an `embedkit eval` report's metrics with --eval-report):

    .venv/bin/python bench/record.py OUT.json --command "CMD" --values values.json
    .venv/bin/python bench/record.py OUT.json --command "CMD" --eval-report report.json

Standard library only, so any bench (or its own venv) can import it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")
REPO = Path(__file__).resolve().parent.parent


def cpu_info(cpuinfo: str | None = None) -> dict:
    """{"model": the CPU's model name, "flags": the INT8_FLAGS present, in that order}."""
    model, flags = "unknown", set()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {"model": model, "flags": [f for f in INT8_FLAGS if f in flags]}


def git_commit(repo: Path | str = REPO) -> str:
    """`git rev-parse HEAD`, with "+dirty" when the work tree has uncommitted changes; "unknown" without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def make_record(values, command: str, *, commit: str | None = None, date: str | None = None,
                cpu: dict | None = None) -> dict:
    if not command or not isinstance(command, str):
        raise ValueError("a record needs the command that produced it")
    return {
        "command": command,
        "commit": commit if commit is not None else git_commit(),
        "date": date or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "cpu": cpu if cpu is not None else cpu_info(),
        "values": values,
    }


def write_record(path, values, command: str, **provenance) -> dict:
    """Write {command, commit, date, cpu, values} to `path` atomically (temporary file, fsync, rename; 0644)."""
    record = make_record(values, command, **provenance)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return record


def eval_report_values(report: dict) -> dict:
    """An `embedkit eval` report's figures without its per-query / per-pair scores: per task its metrics,
    data hash and sizes, plus the model's name and fingerprint."""
    out = {"model": {k: report.get("manifest", {}).get("model", {}).get(k) for k in ("name", "fingerprint")},
           "tasks": {}}
    for name, result in report.get("results", {}).items():
        task = result.get("task", {})
        out["tasks"][name] = {"metrics": result.get("metrics", {}),
                              **{k: task[k] for k in ("data_hash", "sizes", "split") if k in task}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("output")
    ap.add_argument("--command", required=True, help="the command that produced the values, as run")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--values", help="a JSON file: the values, as they are")
    src.add_argument("--eval-report", help="an `embedkit eval` report: its metrics per task")
    args = ap.parse_args(argv)
    if args.values:
        values = json.loads(Path(args.values).read_text())
    else:
        values = eval_report_values(json.loads(Path(args.eval_report).read_text()))
    record = write_record(args.output, values, command=args.command)
    print(f"{args.output}: commit {record['commit']}, {record['date']}, {record['cpu']['model']} "
          f"({', '.join(record['cpu']['flags']) or 'no int8 flags'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
