"""Corpus inputs for a RAG index: a BEIR folder, a corpus.jsonl, a plain .txt, a BeirDataset or a dict.

Every form becomes an ordered list of `Document`s. The text a model embeds is `mteb_document_text(title, text)`,
the same function `BeirDataset.document_texts` (and so `embedkit eval`) uses: that is what makes `rag eval` on an
exact index give the same nDCG@10 as `embedkit eval`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from embedkit.data.lines import iter_text_lines, require_file
from embedkit.data.beir import CORPUS_FILE, BeirDataset, mteb_document_text, read_corpus
from embedkit.errors import DataError


@dataclass(frozen=True)
class Document:
    doc_id: str
    title: str
    text: str

    @property
    def embed_text(self) -> str:
        """What the model encodes (and BM25 indexes): title and text joined as the eval runner joins them."""
        return mteb_document_text(self.title, self.text)


def read_txt_corpus(path: Path) -> list[Document]:
    """One passage per non-blank line; the id is `<file name>:<line number>` so ids from two files never clash."""
    require_file(path, "corpus file")
    docs = [Document(f"{path.name}:{number}", "", line.strip())
            for number, line in iter_text_lines(path) if line.strip()]
    if not docs:
        raise DataError("no passages in file (one passage per line expected)", path=path)
    return docs


def load_documents(corpus: Any) -> list[Document]:
    """Documents from a path (BEIR folder, .jsonl, .txt), a BeirDataset, a mapping id -> {title, text} or a list.

    Ids must be unique; a mapping row may be a plain string (the text).
    """
    if isinstance(corpus, BeirDataset):
        ids = list(corpus.corpus)
        return [Document(i, corpus.corpus[i]["title"], corpus.corpus[i]["text"]) for i in ids]
    if isinstance(corpus, (str, Path)):
        return _documents_from_path(Path(corpus))
    if isinstance(corpus, Mapping):
        return [_document_from_row(str(doc_id), row) for doc_id, row in corpus.items()]
    if isinstance(corpus, Iterable):
        docs = [d if isinstance(d, Document) else _document_from_row(None, d) for d in corpus]
        _check_unique(docs)
        return docs
    raise DataError(f"unsupported corpus type {type(corpus).__name__} (use a path, a BeirDataset or a dict)")


def _documents_from_path(path: Path) -> list[Document]:
    if not path.exists():
        raise DataError("corpus not found", path=path)
    if path.is_dir():
        file = path / CORPUS_FILE
        if not file.is_file():
            raise DataError(f"a corpus folder must hold {CORPUS_FILE} (BEIR layout)", path=path)
        path = file
    if path.suffix == ".jsonl":
        rows = read_corpus(path)  # validates ids, duplicates and fields, naming file and line
        if not rows:
            raise DataError("no documents in corpus file", path=path)
        return [Document(doc_id, row["title"], row["text"]) for doc_id, row in rows.items()]
    if path.suffix == ".txt":
        return read_txt_corpus(path)
    raise DataError("unsupported corpus file: use a BEIR folder, a .jsonl ({\"_id\", \"title\", \"text\"}) or a "
                    ".txt (one passage per line)", path=path)


def _document_from_row(doc_id: str | None, row: Any) -> Document:
    if isinstance(row, str):
        if doc_id is None:
            raise DataError("a document list needs ids: pass {id: text} or rows with '_id'")
        return Document(doc_id, "", row)
    if not isinstance(row, Mapping):
        raise DataError(f"document {doc_id!r}: expected a dict with 'text', got {type(row).__name__}")
    doc_id = doc_id if doc_id is not None else row.get("_id", row.get("doc_id"))
    if doc_id is None or not str(doc_id).strip():
        raise DataError("document without an id", field="_id")
    text, title = row.get("text"), row.get("title") or ""
    if not isinstance(text, str):
        raise DataError(f"document {doc_id!r}: 'text' must be a string", field="text")
    if not isinstance(title, str):
        raise DataError(f"document {doc_id!r}: 'title' must be a string", field="title")
    return Document(str(doc_id), title, text)


def _check_unique(docs: list[Document]) -> None:
    seen: set[str] = set()
    for doc in docs:
        if doc.doc_id in seen:
            raise DataError(f"duplicate document id '{doc.doc_id}'", field="_id")
        seen.add(doc.doc_id)
