"""`embedkit data check`: tell what a path holds, validate all of it, and summarise it.

Kinds: a BEIR folder (corpus.jsonl + queries.jsonl + qrels/*.tsv), an STS file (sentence1, sentence2, score)
or a training tuples file (query, positive, negatives...). Invalid data raises `DataError` naming file,
line and field; a valid path returns a summary dict (JSON-serialisable).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embedkit.data.beir import (CORPUS_FILE, QRELS_DIR, QUERIES_FILE, available_splits, is_beir_folder, read_corpus,
                                read_qrels, read_queries)
from embedkit.data.sts import load_sts
from embedkit.data.tuples import infer_format, json_rows, read_examples
from embedkit.errors import DataError

KINDS = ("beir", "sts", "tuples")
STS_OPTIONS = ("sentence1", "sentence2", "score")
TUPLE_OPTIONS = ("query", "positive", "negatives", "scores", "format")


def check_path(path: str | Path, kind: str | None = None, **column_mapping: Any) -> dict[str, Any]:
    """Detect what `path` is, validate it fully and return a summary.

    column_mapping: `sentence1=`, `sentence2=`, `score=` for STS files; `query=`, `positive=`, `negatives=`,
    `scores=`, `format=` for training tuples (see `read_examples`). Options left at None are not passed on.
    """
    path = Path(path)
    mapping = {k: v for k, v in column_mapping.items() if v is not None}
    unknown = set(mapping) - set(STS_OPTIONS) - set(TUPLE_OPTIONS)
    if unknown:
        raise DataError(f"unknown column option(s): {', '.join(sorted(unknown))}")
    if kind is not None and kind not in KINDS:
        raise DataError(f"unknown kind '{kind}' (choose one of: {', '.join(KINDS)})", field="kind")
    if not path.exists():
        raise DataError("path not found", path=path)
    kind = kind or _detect_kind(path, mapping)
    if kind == "beir":
        return check_beir(path)
    if kind == "sts":
        return check_sts(path, **{k: v for k, v in mapping.items() if k in STS_OPTIONS})
    return check_tuples(path, **{k: v for k, v in mapping.items() if k in TUPLE_OPTIONS})


def check_beir(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise DataError(f"expected a BEIR folder ({CORPUS_FILE}, {QUERIES_FILE}, {QRELS_DIR}/<split>.tsv)", path=path)
    corpus = read_corpus(path / CORPUS_FILE)  # read once, shared by every split
    queries = read_queries(path / QUERIES_FILE)
    splits = available_splits(path)
    if not splits:
        raise DataError(f"no qrels files (expected {QRELS_DIR}/<split>.tsv, e.g. {QRELS_DIR}/test.tsv)", path=path / QRELS_DIR)
    summary: dict[str, Any] = {
        "kind": "beir",
        "path": str(path),
        "documents": len(corpus),
        "documents_with_title": sum(1 for row in corpus.values() if row["title"].strip()),
        "empty_documents": sum(1 for row in corpus.values() if not (row["title"] + row["text"]).strip()),
        "queries": len(queries),
        "empty_queries": sum(1 for text in queries.values() if not text.strip()),
        "splits": {},
    }
    for split in splits:
        qrels = read_qrels(path / QRELS_DIR / f"{split}.tsv", corpus, queries)
        judgments = [score for judged in qrels.values() for score in judged.values()]
        summary["splits"][split] = {
            "judged_queries": len(qrels),
            "judgments": len(judgments),
            "relevant_judgments": sum(1 for s in judgments if s > 0),
            "judged_documents": len({doc for judged in qrels.values() for doc in judged}),
        }
    return summary


def check_sts(path: Path, **columns: str) -> dict[str, Any]:
    ds = load_sts(path, **columns)
    return {
        "kind": "sts",
        "path": str(path),
        "pairs": len(ds),
        "score_min": float(ds.scores.min()),
        "score_max": float(ds.scores.max()),
        "score_mean": round(float(ds.scores.mean()), 4),
        "empty_sentences": sum(1 for s in ds.sentences1 + ds.sentences2 if not s.strip()),
    }


def check_tuples(path: Path, **options: Any) -> dict[str, Any]:
    rows = with_negatives = negatives_total = max_negatives = empty_texts = with_scores = 0
    for example in read_examples(path, **options):
        rows += 1
        count = len(example.negatives)
        with_negatives += count > 0
        negatives_total += count
        max_negatives = max(max_negatives, count)
        empty_texts += sum(1 for t in (example.query, example.positive, *example.negatives) if not t.strip())
        with_scores += example.scores is not None
    return {
        "kind": "tuples",
        "path": str(path),
        "rows": rows,
        "rows_with_negatives": with_negatives,
        "mean_negatives": round(negatives_total / rows, 4),
        "max_negatives": max_negatives,
        "rows_with_scores": with_scores,
        "empty_texts": empty_texts,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Readable lines: `key: value`, numbers with thousands separators, splits indented."""
    titles = {"beir": "BEIR retrieval data set", "sts": "STS pairs", "tuples": "training tuples"}
    lines = [f"{summary['path']}: valid {titles.get(summary['kind'], summary['kind'])}"]
    for key, value in summary.items():
        if key in ("kind", "path"):
            continue
        if isinstance(value, dict):
            for name, inner in value.items():
                details = ", ".join(f"{_label(k)} {_number(v)}" for k, v in inner.items())
                lines.append(f"  split {name}: {details}")
        else:
            lines.append(f"  {_label(key)}: {_number(value)}")
    return "\n".join(lines)


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2)


def _label(key: str) -> str:
    return key.replace("_", " ")


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def _detect_kind(path: Path, mapping: dict[str, Any]) -> str:
    if path.is_dir():
        if is_beir_folder(path):
            return "beir"
        raise DataError("folder is not a BEIR data set (it needs corpus.jsonl and queries.jsonl)", path=path)
    if any(k in mapping for k in STS_OPTIONS):
        return "sts"
    if any(k in mapping for k in TUPLE_OPTIONS):
        return "tuples"
    columns = _first_columns(path)
    return "sts" if {"sentence1", "sentence2"} <= set(columns) else "tuples"


def _first_columns(path: Path) -> list[str]:
    """Column names of a file: the header of CSV/TSV/Parquet, the keys of the first JSON record."""
    fmt = infer_format(path)
    if fmt in ("csv", "tsv"):
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            header = f.readline().rstrip("\r\n")
        return [c.strip().strip('"') for c in header.split("\t" if fmt == "tsv" else ",")]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.ParquetFile(path).schema_arrow.names)
        except Exception as exc:  # pyarrow raises several types for a non-Parquet file
            raise DataError(f"not a readable Parquet file ({exc})", path=path) from None
    for _line, row in json_rows(path):
        return list(row)
    raise DataError("empty file", path=path)
