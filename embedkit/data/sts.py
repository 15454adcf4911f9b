"""Semantic textual similarity pairs: two sentences and a gold score per row.

Accepted files: JSON Lines (`{"sentence1": ..., "sentence2": ..., "score": ...}`) and CSV / TSV with a
header row naming the same columns. Other column names can be mapped with the keyword arguments.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from embedkit.data.lines import iter_jsonl, require_file, string_field
from embedkit.errors import DataError
from embedkit.manifest import sha256_texts

STS_SUFFIXES = (".jsonl", ".csv", ".tsv")


@dataclass
class StsDataset:
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray  # float64, one gold score per pair
    path: str
    name: str

    def __len__(self) -> int:
        return len(self.scores)

    def data_hash(self) -> str:
        """sha256 over both sentence lists and the scores (repr keeps every float digit)."""
        def parts() -> Iterator[str]:
            for s1, s2, score in zip(self.sentences1, self.sentences2, self.scores.tolist()):
                yield from (s1, s2, repr(float(score)))

        return sha256_texts(parts())


def load_sts(
    path: str | Path,
    *,
    sentence1: str = "sentence1",
    sentence2: str = "sentence2",
    score: str = "score",
    name: str | None = None,
) -> StsDataset:
    """Load an STS file (.jsonl, .csv or .tsv with header). Every row needs both sentences and a numeric score."""
    path = Path(path)
    require_file(path, "STS file")
    suffix = path.suffix.lower()
    columns = (sentence1, sentence2, score)
    if suffix == ".jsonl" or suffix == ".json":
        rows = _jsonl_rows(path, columns)
    elif suffix in (".csv", ".tsv"):
        rows = _delimited_rows(path, columns, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(f"unsupported STS file type '{suffix}' (use .jsonl, .csv or .tsv)", path=path)
    firsts: list[str] = []
    seconds: list[str] = []
    scores: list[float] = []
    for line, s1, s2, raw_score in rows:
        firsts.append(s1)
        seconds.append(s2)
        scores.append(_parse_score(raw_score, path, line, score))
    if not scores:
        raise DataError("no STS pairs in file", path=path)
    return StsDataset(
        sentences1=firsts,
        sentences2=seconds,
        scores=np.asarray(scores, dtype=np.float64),
        path=str(path),
        name=name or f"{path.parent.name}/{path.stem}",
    )


def _jsonl_rows(path: Path, columns: tuple[str, str, str]) -> Iterator[tuple[int, str, str, Any]]:
    sentence1, sentence2, score = columns
    for line, obj in iter_jsonl(path):
        s1 = string_field(obj, sentence1, path, line)
        s2 = string_field(obj, sentence2, path, line)
        if score not in obj or obj[score] is None:
            raise DataError("missing gold score (an STS file needs a score on every row)", path=path, line=line, field=score)
        yield line, s1, s2, obj[score]


def _delimited_rows(path: Path, columns: tuple[str, str, str], delimiter: str) -> Iterator[tuple[int, str, str, Any]]:
    # TSV cells are split on tabs only: STS sentences contain stray quote characters that csv quoting would eat.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            header = next(reader, None)
            if header is None:
                raise DataError("empty file (expected a header row)", path=path)
            header = [h.strip() for h in header]
            positions = {}
            for column in columns:
                if column not in header:
                    raise DataError(
                        f"missing column in header (found: {', '.join(header)})", path=path, line=1, field=column
                    )
                positions[column] = header.index(column)
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue
                line = reader.line_num
                values = []
                for column in columns:
                    pos = positions[column]
                    if pos >= len(cells):
                        raise DataError(f"row has {len(cells)} cells, header has {len(header)}", path=path, line=line, field=column)
                    values.append(cells[pos])
                yield line, values[0], values[1], values[2]
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 ({exc.reason})", path=path) from None
    except csv.Error as exc:
        raise DataError(f"malformed {path.suffix[1:].upper()} ({exc})", path=path) from None


def _parse_score(raw: Any, path: Path, line: int, field: str) -> float:
    if isinstance(raw, bool):
        raise DataError("score must be a number, got a boolean", path=path, line=line, field=field)
    if isinstance(raw, str) and not raw.strip():
        raise DataError("missing gold score (empty cell)", path=path, line=line, field=field)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise DataError(f"score must be a number, got {raw!r}", path=path, line=line, field=field) from None
    if not math.isfinite(value):
        raise DataError(f"score must be finite, got {raw!r}", path=path, line=line, field=field)
    return value
