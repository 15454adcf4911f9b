"""Document collections, read the same way by every stage that takes "your documents" (`rag index`, `synth`):
a BEIR folder, a corpus.jsonl, a plain .txt, a folder of .txt / .md files, a BeirDataset or a dict.

Every form becomes an ordered list of `Document`s. The text a model embeds is `mteb_document_text(title, text)`,
the same function `BeirDataset.document_texts` (and so `embedkit eval`) uses: that is what makes `rag eval` on an
exact index give the same nDCG@10 as `embedkit eval`.

A folder of .txt / .md files (a folder without corpus.jsonl) is cut into passages by `chunk_paragraphs`: whole
paragraphs (blank-line separated) packed up to `CHUNK_WORDS` words, a longer paragraph cut into word windows, so a
passage stays within what a small encoder reads (MiniLM: 256 tokens, about 190 English words). In a .md file a
heading line (`# ...`) starts a new passage and becomes the title of the passages under it.

A document may carry metadata (a JSON object: the `metadata` of a corpus.jsonl row or of a dict row), which
`rag` stores beside it and filters on (`--filter 'source == "manual"'`); it is not embedded and not part of the
corpus hash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from embedkit.data.beir import CORPUS_FILE, BeirDataset, mteb_document_text, read_corpus
from embedkit.data.lines import iter_jsonl, iter_text_lines, require_file
from embedkit.errors import DataError

CHUNK_WORDS = 200  # passage length for a folder of text files: under MiniLM's 256 tokens for English prose
TEXT_SUFFIXES = (".txt", ".md")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class Document:
    doc_id: str
    title: str
    text: str
    metadata: Mapping[str, Any] | None = field(default=None, hash=False)

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
        return [Document(i, corpus.corpus[i]["title"], corpus.corpus[i]["text"], corpus.corpus[i].get("metadata"))
                for i in ids]
    if isinstance(corpus, (str, Path)):
        return _documents_from_path(Path(corpus))
    if isinstance(corpus, Mapping):
        return [_document_from_row(str(doc_id), row) for doc_id, row in corpus.items()]
    if isinstance(corpus, Iterable):
        docs = [d if isinstance(d, Document) else _document_from_row(None, d) for d in corpus]
        _check_unique(docs)
        return docs
    raise DataError(f"unsupported corpus type {type(corpus).__name__} (use a path, a BeirDataset or a dict)")


def chunk_paragraphs(paragraphs: Iterable[str], max_words: int = CHUNK_WORDS) -> list[str]:
    """Pack paragraphs into passages of at most `max_words` words, never splitting a paragraph that fits."""
    passages: list[str] = []
    current: list[str] = []
    for paragraph in paragraphs:
        words = paragraph.split()
        if not words:
            continue
        if len(current) + len(words) > max_words and current:
            passages.append(" ".join(current))
            current = []
        while len(words) > max_words:  # one paragraph longer than a passage: word windows
            passages.append(" ".join(words[:max_words]))
            words = words[max_words:]
        current.extend(words)
    if current:
        passages.append(" ".join(current))
    return passages


def _sections(path: Path) -> Iterable[tuple[str, list[str]]]:
    """(heading, paragraphs) of a text file: .md headings start sections; blank lines separate paragraphs."""
    heading, paragraphs, lines = "", [], []
    markdown = path.suffix.lower() == ".md"
    for _number, line in iter_text_lines(path):
        match = _HEADING.match(line) if markdown else None
        if match or not line.strip():
            if lines:
                paragraphs.append(" ".join(lines))
                lines = []
            if match:
                if paragraphs:
                    yield heading, paragraphs
                heading, paragraphs = match.group(1), []
            continue
        lines.append(line.strip())
    if lines:
        paragraphs.append(" ".join(lines))
    if paragraphs:
        yield heading, paragraphs


def read_text_folder(folder: Path, max_words: int = CHUNK_WORDS) -> list[Document]:
    """Every .txt / .md file under `folder` (sorted by path) cut into passages; ids are `<relative path>#<n>`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"a corpus folder must hold {CORPUS_FILE} (BEIR layout) or .txt / .md files", path=folder)
    docs: list[Document] = []
    for file in files:
        name = file.relative_to(folder).as_posix()
        number = 0
        for heading, paragraphs in _sections(file):
            for passage in chunk_paragraphs(paragraphs, max_words):
                number += 1
                docs.append(Document(f"{name}#{number}", heading, passage))
    if not docs:
        raise DataError("no text in the .txt / .md files of this folder", path=folder)
    return docs


def empty_document_error(docs: list[Document], source: Any) -> DataError | None:
    """A DataError naming the first document without text (file and line when it came from a .jsonl), or None.

    Readers accept empty texts (a BEIR corpus may hold them, and an index can store them); a stage that needs text
    from every document (`synth`) asks for this error."""
    empty = next((d for d in docs if not d.text.strip()), None)
    if empty is None:
        return None
    path = Path(source) if isinstance(source, (str, Path)) else None
    if path is not None and path.is_dir():
        path = path / CORPUS_FILE
    if path is not None and path.suffix == ".jsonl" and path.is_file():
        for number, row in iter_jsonl(path):
            if str(row.get("_id")) == empty.doc_id:
                return DataError(f"document '{empty.doc_id}' has no text", path=path, line=number, field="text")
    return DataError(f"document '{empty.doc_id}' has no text", path=path, field="text")


def _documents_from_path(path: Path) -> list[Document]:
    if not path.exists():
        raise DataError("corpus not found", path=path)
    if path.is_dir():
        file = path / CORPUS_FILE
        if not file.is_file():
            return read_text_folder(path)
        path = file
    if path.suffix == ".jsonl":
        rows = read_corpus(path)  # validates ids, duplicates and fields, naming file and line
        if not rows:
            raise DataError("no documents in corpus file", path=path)
        return [Document(doc_id, row["title"], row["text"], row.get("metadata")) for doc_id, row in rows.items()]
    if path.suffix == ".txt":
        return read_txt_corpus(path)
    raise DataError("unsupported corpus file: use a BEIR folder, a .jsonl ({\"_id\", \"title\", \"text\"}), a "
                    ".txt (one passage per line) or a folder of .txt / .md files", path=path)


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
    metadata = row.get("metadata")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise DataError(f"document {doc_id!r}: 'metadata' must be a dict", field="metadata")
    return Document(str(doc_id), title, text, dict(metadata) if metadata is not None else None)


def _check_unique(docs: list[Document]) -> None:
    seen: set[str] = set()
    for doc in docs:
        if doc.doc_id in seen:
            raise DataError(f"duplicate document id '{doc.doc_id}'", field="_id")
        seen.add(doc.doc_id)
