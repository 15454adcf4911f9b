"""The document store beside the FAISS index: one SQLite file mapping FAISS ids to documents.

SQLite rather than JSONL so a query reads only its k hits (no corpus held in memory) and a delete is one
statement. HNSW graphs cannot drop vectors, so ids deleted from an HNSW index are kept in `tombstones` and
filtered out at search time (see `vectors/faiss_store.py`). A document's metadata is a JSON text (NULL when it has
none); an index written before metadata existed has no such column and reads as documents without metadata.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from embedkit.data.documents import Document
from embedkit.errors import DataError

STORE_NAME = "documents.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,          -- the FAISS id of the document's vector
    doc_id TEXT NOT NULL UNIQUE,     -- the corpus id
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT                    -- JSON object, or NULL
);
CREATE TABLE IF NOT EXISTS tombstones (id INTEGER PRIMARY KEY);
"""


class DocumentStore:
    """Thread-safe (one lock) access to documents.sqlite; the web app searches from several threads."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly and not self.path.is_file():
            raise DataError("document store not found (not a RAG index folder?)", path=self.path)
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._lock = threading.Lock()
        if not readonly:
            self._conn.executescript(_SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(documents)")}
        self._has_metadata = "metadata" in columns
        if not readonly and not self._has_metadata:  # a store from before metadata: the column is added
            with self._conn:
                self._conn.execute("ALTER TABLE documents ADD COLUMN metadata TEXT")
            self._has_metadata = True
        self._meta = "metadata" if self._has_metadata else "NULL"

    def close(self) -> None:
        self._conn.close()

    def add(self, rows: Iterable[tuple[int, Document]]) -> None:
        with self._lock, self._conn:
            try:
                self._conn.executemany(
                    "INSERT INTO documents (id, doc_id, title, text, metadata) VALUES (?, ?, ?, ?, ?)",
                    ((i, d.doc_id, d.title, d.text, _dump(d.metadata)) for i, d in rows))
            except sqlite3.IntegrityError as exc:
                raise DataError(f"duplicate document id ({exc})", field="_id") from None

    def delete(self, ids: Iterable[int], *, tombstone: bool) -> None:
        ids = [(int(i),) for i in ids]
        with self._lock, self._conn:
            self._conn.executemany("DELETE FROM documents WHERE id = ?", ids)
            if tombstone:
                self._conn.executemany("INSERT OR IGNORE INTO tombstones (id) VALUES (?)", ids)

    def ids_for(self, doc_ids: Iterable[str]) -> dict[str, int]:
        """FAISS ids of the given corpus ids that exist (unknown ids are absent from the result)."""
        out: dict[str, int] = {}
        with self._lock:
            for doc_id in doc_ids:
                row = self._conn.execute("SELECT id FROM documents WHERE doc_id = ?", (doc_id,)).fetchone()
                if row is not None:
                    out[doc_id] = int(row[0])
        return out

    def get(self, ids: Iterable[int]) -> dict[int, Document]:
        ids = [int(i) for i in ids]
        out: dict[int, Document] = {}
        with self._lock:
            for start in range(0, len(ids), 500):  # SQLite caps the number of bound parameters
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for i, doc_id, title, text, meta in self._conn.execute(
                        f"SELECT id, doc_id, title, text, {self._meta} FROM documents WHERE id IN ({marks})", chunk):
                    out[int(i)] = Document(doc_id, title, text, _load(meta))
        return out

    def doc_ids(self, ids: Iterable[int]) -> dict[int, str]:
        """FAISS id -> corpus id, without reading the texts (evaluation needs only the ids)."""
        ids = [int(i) for i in ids]
        out: dict[int, str] = {}
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                out.update((int(i), d) for i, d in self._conn.execute(
                    f"SELECT id, doc_id FROM documents WHERE id IN ({marks})", chunk))
        return out

    def iter_documents(self) -> Iterator[tuple[int, Document]]:
        """All documents in FAISS-id order (read fully under the lock, so a concurrent writer cannot interleave)."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT id, doc_id, title, text, {self._meta} FROM documents ORDER BY id").fetchall()
        for i, doc_id, title, text, meta in rows:
            yield int(i), Document(doc_id, title, text, _load(meta))

    def iter_metadata(self) -> Iterator[tuple[int, Mapping[str, Any] | None]]:
        """(id, metadata) of every document (what a filter is evaluated over)."""
        with self._lock:
            rows = self._conn.execute(f"SELECT id, {self._meta} FROM documents ORDER BY id").fetchall()
        for i, meta in rows:
            yield int(i), _load(meta)

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    def tombstones(self) -> list[int]:
        with self._lock:
            return [int(r[0]) for r in self._conn.execute("SELECT id FROM tombstones ORDER BY id")]

    def all_doc_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._conn.execute("SELECT doc_id FROM documents")}

    def backup_to(self, target: str | Path) -> None:
        """Copy the whole database (consistent snapshot) to `target`, e.g. into the folder of an update."""
        dest = sqlite3.connect(str(target))
        try:
            with self._lock:
                self._conn.backup(dest)
        finally:
            dest.close()


def _dump(metadata: Mapping[str, Any] | None) -> str | None:
    return None if metadata is None else json.dumps(dict(metadata), ensure_ascii=False, sort_keys=True)


def _load(text: str | None) -> dict[str, Any] | None:
    return None if text is None else json.loads(text)
