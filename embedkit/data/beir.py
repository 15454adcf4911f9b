"""BEIR-layout retrieval data: `corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`.

    corpus.jsonl    {"_id": "d1", "title": "...", "text": "..."}   (title optional)
    queries.jsonl   {"_id": "q1", "text": "..."}
    qrels/test.tsv  query-id <TAB> corpus-id <TAB> score           (header line optional)
    synthetic.json  optional: the queries were generated (`embedkit synth --eval`), not written by people; eval
                    reports that use the folder carry its content

Everything is validated while reading; a problem raises `DataError` naming file, line and field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from embedkit.data.lines import iter_jsonl, iter_text_lines, require_file, string_field
from embedkit.errors import DataError
from embedkit.manifest import sha256_texts

CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
QRELS_DIR = "qrels"
SYNTHETIC_FILE = "synthetic.json"


def mteb_document_text(title: str, text: str) -> str:
    """The string mteb 2.26 encodes for a corpus row (`mteb._create_dataloaders._corpus_to_dict`).

    Title and text joined by one space and stripped; without a title, the text stripped. Reproducing this
    exactly is what lets our evaluation match mteb's published numbers.
    """
    return (title + " " + text).strip() if title else text.strip()


@dataclass
class BeirDataset:
    """A retrieval data set. `queries` holds every query (judged or not); `qrels` only the chosen split."""

    corpus: dict[str, dict]  # doc id -> {"title": str, "text": str}
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}
    path: Path
    split: str

    def document_texts(self, ids: Iterable[str] | None = None) -> list[str]:
        """The text a model encodes for each document (corpus order by default), joined as mteb joins it."""
        doc_ids = self.corpus.keys() if ids is None else ids
        texts = []
        for doc_id in doc_ids:
            row = self.corpus[doc_id]
            texts.append(mteb_document_text(row["title"], row["text"]))
        return texts

    def judged_query_ids(self) -> list[str]:
        """Queries with at least one judgment in this split, in queries-file order."""
        return [qid for qid in self.queries if qid in self.qrels]

    def relevant_pairs(self) -> Iterator[tuple[str, str, int]]:
        """(query id, doc id, score) for every judgment with score > 0, in a deterministic order."""
        for qid in self.judged_query_ids():
            for doc_id, score in self.qrels[qid].items():
                if score > 0:
                    yield qid, doc_id, score

    def data_hash(self) -> str:
        """sha256 over corpus, queries and this split's qrels: a cache / manifest key for this exact data."""
        def parts() -> Iterator[str]:
            yield "corpus"
            for doc_id, row in self.corpus.items():
                yield from (doc_id, row["title"], row["text"])
            yield "queries"
            for qid, text in self.queries.items():
                yield from (qid, text)
            yield "qrels"
            for qid in sorted(self.qrels):
                for doc_id in sorted(self.qrels[qid]):
                    yield from (qid, doc_id, str(self.qrels[qid][doc_id]))

        return sha256_texts(parts())


def read_corpus(path: Path) -> dict[str, dict]:
    require_file(path, "corpus file")
    corpus: dict[str, dict] = {}
    for line, obj in iter_jsonl(path):
        doc_id = _read_id(obj, path, line)
        if doc_id in corpus:
            raise DataError(f"duplicate document id '{doc_id}'", path=path, line=line, field="_id")
        corpus[doc_id] = {
            "title": string_field(obj, "title", path, line, required=False),
            "text": string_field(obj, "text", path, line),
        }
        if obj.get("metadata") is not None:  # optional; `rag` stores it and filters on it (--filter)
            if not isinstance(obj["metadata"], dict):
                raise DataError("'metadata' must be an object ({\"key\": value, ...})", path=path, line=line,
                                field="metadata")
            corpus[doc_id]["metadata"] = obj["metadata"]
    return corpus


def read_queries(path: Path) -> dict[str, str]:
    require_file(path, "queries file")
    queries: dict[str, str] = {}
    for line, obj in iter_jsonl(path):
        qid = _read_id(obj, path, line)
        if qid in queries:
            raise DataError(f"duplicate query id '{qid}'", path=path, line=line, field="_id")
        queries[qid] = string_field(obj, "text", path, line)
    return queries


def read_qrels(path: Path, corpus: dict[str, dict], queries: dict[str, str]) -> dict[str, dict[str, int]]:
    """Read a qrels file: 3 columns (BEIR) or 4 (TREC: query, iteration, doc, score); a header line is skipped."""
    require_file(path, "qrels file")
    qrels: dict[str, dict[str, int]] = {}
    seen_data = False
    for line, text in iter_text_lines(path):
        if not text.strip():
            continue
        cells = text.split("\t") if "\t" in text else text.split()
        cells = [c.strip() for c in cells]
        if len(cells) not in (3, 4):
            raise DataError(
                f"expected 3 tab-separated columns (query-id, corpus-id, score), found {len(cells)}", path=path, line=line
            )
        qid, doc_id, raw_score = (cells[0], cells[1], cells[2]) if len(cells) == 3 else (cells[0], cells[2], cells[3])
        score = _parse_score(raw_score)
        if score is None:
            if not seen_data and qid not in queries:  # a header such as "query-id corpus-id score"
                seen_data = True
                continue
            raise DataError(f"score must be an integer, got '{raw_score}'", path=path, line=line, field="score")
        seen_data = True
        if qid not in queries:
            raise DataError(f"unknown query id '{qid}' (not in {QUERIES_FILE})", path=path, line=line, field="query-id")
        if doc_id not in corpus:
            raise DataError(f"unknown document id '{doc_id}' (not in {CORPUS_FILE})", path=path, line=line, field="corpus-id")
        judged = qrels.setdefault(qid, {})
        if doc_id in judged and judged[doc_id] != score:
            raise DataError(
                f"query '{qid}' judges document '{doc_id}' twice with different scores", path=path, line=line, field="score"
            )
        judged[doc_id] = score
    if not qrels:
        raise DataError("no judgments in qrels file", path=path)
    return qrels


def synthetic_marker(path: str | Path | None) -> dict | None:
    """The content of a BEIR folder's synthetic.json (generated queries), or None for human-written queries."""
    if path is None:
        return None
    marker = Path(path) / SYNTHETIC_FILE
    if not marker.is_file():
        return None
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        raise DataError("not valid JSON", path=marker) from None
    return content if isinstance(content, dict) else {"synthetic": True}


def synthetic_note(marker: dict) -> str:
    """One line for a command's output: these queries were generated."""
    return (f"synthetic queries (made by {marker.get('made_by', 'a generator')}, style {marker.get('style')}): "
            "not written by people")


def available_splits(path: str | Path) -> list[str]:
    """Split names that have a qrels file in a BEIR folder (sorted)."""
    qrels_dir = Path(path) / QRELS_DIR
    if not qrels_dir.is_dir():
        return []
    return sorted(p.stem for p in qrels_dir.glob("*.tsv") if p.is_file())


def is_beir_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CORPUS_FILE).exists() and (path / QUERIES_FILE).exists()


def load_beir(path: str | Path, split: str = "test") -> BeirDataset:
    """Load and validate a BEIR folder with the qrels of `split`."""
    path = Path(path)
    if not path.exists():
        raise DataError("BEIR folder not found", path=path)
    if not path.is_dir():
        raise DataError(f"expected a BEIR folder ({CORPUS_FILE}, {QUERIES_FILE}, {QRELS_DIR}/<split>.tsv), got a file", path=path)
    qrels_path = path / QRELS_DIR / f"{split}.tsv"
    if not qrels_path.exists():
        splits = available_splits(path)
        raise DataError(f"no qrels for split '{split}' (available: {', '.join(splits) or 'none'})", path=qrels_path)
    corpus = read_corpus(path / CORPUS_FILE)
    queries = read_queries(path / QUERIES_FILE)
    qrels = read_qrels(qrels_path, corpus, queries)
    return BeirDataset(corpus=corpus, queries=queries, qrels=qrels, path=path, split=split)


def _read_id(obj: dict, path: Path, line: int) -> str:
    value = string_field(obj, "_id", path, line, allow_number=True)
    if not value.strip():
        raise DataError("empty id", path=path, line=line, field="_id")
    return value


def _parse_score(raw: str) -> int | None:
    """An integer relevance; "1.0" is accepted (some exports write floats), "0.5" and words are not."""
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        value = float(raw)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None
