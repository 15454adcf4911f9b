"""Line-oriented readers shared by the data loaders: they stream, and every error names file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from embedkit.errors import DataError


def require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} not found", path=path)
    if not path.is_file():
        raise DataError(f"{what} must be a file, found a folder", path=path)


def iter_text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its line ending); decoding errors name the line.

    Decoding line by line (instead of opening in text mode) is what lets a bad byte report its line.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})", path=path, line=number) from None
            yield number, line.rstrip("\r\n")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a JSON Lines file."""
    for number, line in iter_text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON ({exc.msg} at column {exc.colno})", path=path, line=number) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object per line, got {type(obj).__name__}", path=path, line=number)
        yield number, obj


def string_field(
    obj: dict[str, Any], name: str, path: Path, line: int, *, required: bool = True, allow_number: bool = False
) -> str:
    """A text field as str. `allow_number` is for ids, which some BEIR exports write as JSON numbers."""
    if name not in obj or obj[name] is None:
        if required:
            raise DataError("missing field", path=path, line=line, field=name)
        return ""
    value = obj[name]
    if isinstance(value, str):
        return value
    if not allow_number or isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"expected a string, got {type(value).__name__}", path=path, line=line, field=name)
    return str(value)
