"""The append-only record of what a run generated (`generated.jsonl`), which is what makes a run resumable.

One JSON object per line: {"doc_id", "index", "query", "positive", "style", "source"}; (doc_id, index) is the key.
Lines are appended a batch at a time, flushed and fsynced before the next batch starts, so a killed run loses at
most the batch in flight. A re-run with the same settings reads the keys already there and generates only the
missing ones: no key is written twice. A last line cut off by the kill (no newline) is dropped when the file is
opened again, and its item is generated anew.

The settings a log was written with live beside it (`settings.json`); a re-run with other settings is refused
rather than mixing two runs' queries in one file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from embedkit.atomic import fsync_dir, write_json
from embedkit.data.lines import iter_jsonl
from embedkit.errors import ConfigError

GENERATED_FILE = "generated.jsonl"
SETTINGS_FILE = "settings.json"


def item_key(doc_id: str, index: int) -> tuple[str, int]:
    return (str(doc_id), int(index))


def check_settings(folder: Path, settings: dict[str, Any], *, restart: bool) -> None:
    """Refuse a re-run whose settings differ from those the folder's log was written with (nothing is written)."""
    path, log = folder / SETTINGS_FILE, folder / GENERATED_FILE
    if restart or not (log.exists() and path.is_file()):
        return
    before = json.loads(path.read_text(encoding="utf-8"))
    changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    if changed:
        what = ", ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in changed[:3])
        raise ConfigError(f"this folder holds queries generated with other settings ({what}); use another "
                          "--output, or --restart to discard them", path=folder)


def record_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Write the settings the folder's log is (being) generated with."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / SETTINGS_FILE, settings)


class GeneratedLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._drop_partial_line()
        self.keys: set[tuple[str, int]] = {item_key(r["doc_id"], r["index"]) for r in self.records()}

    def _drop_partial_line(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def records(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        for _line, row in iter_jsonl(self.path):
            yield row

    def append(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append the rows whose key is new; durable when this returns. Returns how many were written."""
        fresh = [r for r in rows if item_key(r["doc_id"], r["index"]) not in self.keys]
        if not fresh:
            return 0
        existed = self.path.exists()
        with open(self.path, "a", encoding="utf-8") as f:
            for row in fresh:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if not existed:
            fsync_dir(self.path.parent)
        self.keys.update(item_key(r["doc_id"], r["index"]) for r in fresh)
        return len(fresh)
