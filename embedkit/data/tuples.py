"""Training tuples: (query, positive, negatives...) read from JSONL, JSON, CSV, TSV or Parquet, streaming.

A row without negatives is a pair, with one a triplet, with more an n-tuple. Column names are mapped with
keyword arguments, so files from other tools can be read as they are:

    read_examples("pairs.jsonl")                                    # query, positive[, negatives list]
    read_examples("t.csv", query="anchor", negatives="negative")    # a single negative column holding a JSON list
    read_examples("t.parquet", negatives=["neg_a", "neg_b"])        # several negative columns
    read_examples("t.tsv", negatives="negative_*")                  # every column matching a pattern, in natural order

Every bad row raises `DataError` naming the file, the line (for Parquet: the 1-based row) and the field.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from embedkit.data.beir import mteb_document_text
from embedkit.data.lines import iter_jsonl, require_file
from embedkit.errors import DataError

if TYPE_CHECKING:
    from embedkit.data.beir import BeirDataset

TUPLE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
DEFAULT_NEGATIVES_COLUMN = "negatives"
DEFAULT_SCORES_COLUMN = "scores"
_PARQUET_BATCH_ROWS = 1024


@dataclass
class TrainingExample:
    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    scores: list[float] | None = None  # teacher scores: positive first, then each negative (for distillation)
    grade: int | None = None  # relevance grade of the positive (BEIR qrels score); mining reads it, training not


def infer_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in TUPLE_FORMATS:
        raise DataError(
            f"cannot tell the format from suffix '{suffix}' (use one of {', '.join(TUPLE_FORMATS)} or give the format: format= / --format)",
            path=path,
        )
    return TUPLE_FORMATS[suffix]


def read_examples(
    path: str | Path,
    *,
    query: str = "query",
    positive: str = "positive",
    negatives: str | Sequence[str] | None = None,
    scores: str | None = None,
    format: str | None = None,
) -> Iterator[TrainingExample]:
    """Stream training examples from `path`.

    negatives: None reads the list column "negatives" when the file has one (else rows are pairs); a column name
    reads that list column (it must exist); a list of names reads one negative from each column (empty cells are
    skipped); a pattern with "*" ("negative_*") reads every matching column in natural order ("_2" before "_10").
    An empty list means "no negatives". scores: None reads a "scores" list column when present; a name requires it.
    In CSV/TSV a list column holds JSON text such as ["a", "b"].
    """
    path = Path(path)
    require_file(path, "training file")
    fmt = (format or infer_format(path)).lower()
    if fmt not in TUPLE_FORMATS.values():
        raise DataError(f"unknown format '{fmt}' (choose one of {', '.join(sorted(set(TUPLE_FORMATS.values())))})", path=path)
    spec = _ColumnSpec(path, query, positive, negatives, scores)
    if fmt == "jsonl":
        rows = _jsonl_rows(path)
    elif fmt == "json":
        rows = json_rows(path)
    elif fmt in ("csv", "tsv"):
        rows = _delimited_rows(path, spec, "\t" if fmt == "tsv" else ",")
    else:
        rows = _parquet_rows(path, spec)
    count = 0
    for line, row in rows:
        yield spec.example(row, line)
        count += 1
    if count == 0:
        raise DataError("no training examples in file (it is empty)", path=path)


def pairs_from_beir(ds: BeirDataset) -> list[TrainingExample]:
    """One (query, relevant document) pair per judgment with score > 0 of `ds.split` (its score as `.grade`).

    Order is deterministic: queries in queries-file order, documents in qrels-file order. The document text is
    joined the way the evaluation encodes it (title + " " + text), so training and evaluation see the same string.
    """
    examples = []
    for qid, doc_id, score in ds.relevant_pairs():
        row = ds.corpus[doc_id]
        examples.append(TrainingExample(query=ds.queries[qid], positive=mteb_document_text(row["title"], row["text"]),
                                        grade=score))
    return examples


class _ColumnSpec:
    """Which columns hold what, resolved against the columns a file (or, for JSON, a row) has."""

    def __init__(self, path: Path, query: str, positive: str, negatives: str | Sequence[str] | None, scores: str | None):
        self.path = path
        self.query = query
        self.positive = positive
        self.scores = scores
        self.negatives_list: str | None = None  # one column holding a list
        self.negatives_columns: list[str] = []  # several columns holding one text each
        self.negatives_pattern: str | None = None
        self.negatives_required = negatives is not None
        if negatives is None:
            self.negatives_list = DEFAULT_NEGATIVES_COLUMN
        elif isinstance(negatives, str):
            if "*" in negatives:
                self.negatives_pattern = negatives
            elif "," in negatives:  # "neg1,neg2" from the command line
                self.negatives_columns = [c.strip() for c in negatives.split(",") if c.strip()]
            else:
                self.negatives_list = negatives
        else:
            self.negatives_columns = list(negatives)

    def required_columns(self) -> list[str]:
        columns = [self.query, self.positive, *self.negatives_columns]
        if self.negatives_required and self.negatives_list:
            columns.append(self.negatives_list)
        if self.scores:
            columns.append(self.scores)
        return columns

    def check_header(self, columns: Sequence[str], line: int | None) -> list[str]:
        """Fail early on a missing column; return the columns to read."""
        for name in self.required_columns():
            if name not in columns:
                raise DataError(f"missing column (found: {', '.join(columns)})", path=self.path, line=line, field=name)
        wanted = [self.query, self.positive, *self.negatives_columns]
        if self.negatives_list and self.negatives_list in columns:
            wanted.append(self.negatives_list)
        if self.negatives_pattern:
            matched = self.matching(columns)
            if not matched:
                raise DataError(f"no column matches the pattern (found: {', '.join(columns)})", path=self.path, line=line, field=self.negatives_pattern)
            wanted.extend(matched)
        scores = self.scores or DEFAULT_SCORES_COLUMN
        if scores in columns:
            wanted.append(scores)
        return list(dict.fromkeys(wanted))

    def matching(self, columns: Sequence[str]) -> list[str]:
        matched = [c for c in columns if fnmatch.fnmatchcase(c, self.negatives_pattern or "")]
        return sorted(matched, key=_natural_key)

    def example(self, row: dict[str, Any], line: int) -> TrainingExample:
        query = self._text(row, self.query, line)
        positive = self._text(row, self.positive, line)
        negatives: list[str] = []
        if self.negatives_list is not None:
            if self.negatives_list in row:
                negatives = self._text_list(row[self.negatives_list], self.negatives_list, line)
            elif self.negatives_required:
                raise DataError("missing field", path=self.path, line=line, field=self.negatives_list)
        columns = self.negatives_columns or (self.matching(list(row)) if self.negatives_pattern else [])
        for name in columns:
            if name not in row:
                raise DataError("missing field", path=self.path, line=line, field=name)
            value = row[name]
            if value is None or value == "":  # rows may carry fewer negatives than there are columns
                continue
            negatives.append(self._text(row, name, line))
        scores = self._scores(row, line, 1 + len(negatives))
        return TrainingExample(query=query, positive=positive, negatives=negatives, scores=scores)

    def _text(self, row: dict[str, Any], name: str, line: int) -> str:
        if name not in row or row[name] is None:
            raise DataError("missing field", path=self.path, line=line, field=name)
        value = row[name]
        if not isinstance(value, str):
            raise DataError(f"expected text, got {type(value).__name__}", path=self.path, line=line, field=name)
        return value

    def _list(self, value: Any, name: str, line: int) -> list | None:
        if value is None or value == "":
            return None
        if isinstance(value, str):  # CSV / TSV cell holding JSON
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise DataError('expected a JSON list such as ["a", "b"]', path=self.path, line=line, field=name) from None
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise DataError(f"expected a list, got {type(value).__name__}", path=self.path, line=line, field=name)
        return value

    def _text_list(self, value: Any, name: str, line: int) -> list[str]:
        items = self._list(value, name, line) or []
        for item in items:
            if not isinstance(item, str):
                raise DataError(f"expected a list of texts, found {type(item).__name__}", path=self.path, line=line, field=name)
        return items

    def _scores(self, row: dict[str, Any], line: int, expected: int) -> list[float] | None:
        name = self.scores or DEFAULT_SCORES_COLUMN
        if name not in row:
            if self.scores:
                raise DataError("missing field", path=self.path, line=line, field=name)
            return None
        items = self._list(row[name], name, line)
        if items is None:
            return None
        values = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                raise DataError(f"expected a list of finite numbers, found {item!r}", path=self.path, line=line, field=name)
            values.append(float(item))
        if len(values) != expected:
            raise DataError(
                f"expected {expected} scores (positive + {expected - 1} negatives), got {len(values)}",
                path=self.path, line=line, field=name,
            )
        return values


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    yield from iter_jsonl(path)


def json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """A .json file is either JSON Lines or one array of objects (the array must be loaded whole)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        yield from iter_jsonl(path)
        return
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = getattr(exc, "lineno", None)
        raise DataError(f"invalid JSON ({getattr(exc, 'msg', exc)})", path=path, line=line) from None
    for number, item in enumerate(items, start=1):  # "line" is the element number here
        if not isinstance(item, dict):
            raise DataError(f"array element {number} is not an object", path=path, line=number)
        yield number, item


def _delimited_rows(path: Path, spec: _ColumnSpec, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    # TSV is split on tabs only (texts contain stray quotes); CSV uses standard quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    csv.field_size_limit(1 << 30)  # passages can exceed the 128 KiB default
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            wanted = spec.check_header(header, line=1)
            positions = {name: header.index(name) for name in wanted}
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    raise DataError(f"row has {len(cells)} cells, header has {len(header)}", path=path, line=reader.line_num)
                yield reader.line_num, {name: cells[pos] for name, pos in positions.items()}
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 ({exc.reason})", path=path) from None
    except csv.Error as exc:
        raise DataError(f"malformed {delimiter == ',' and 'CSV' or 'TSV'} ({exc})", path=path) from None


def _parquet_rows(path: Path, spec: _ColumnSpec) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise DataError(f"not a readable Parquet file ({exc})", path=path) from None
    wanted = spec.check_header(parquet.schema_arrow.names, line=None)
    row_number = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=wanted):
        for row in batch.to_pylist():
            row_number += 1
            yield row_number, row
