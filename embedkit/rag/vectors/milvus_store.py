"""Milvus, through pymilvus' MilvusClient: a Milvus Lite file inside the index folder, or a Milvus server.

Lite (the default, `rag index --store milvus`): the collection lives in `<index>/vectors.milvus.db`, so the folder
stays self-contained, and an update copies that file into the new folder, changes the copy and swaps the folder in
(copy-on-write, like index.faiss: a crash leaves the old index or the new one). Milvus Lite lets one handle hold
a file (a lock in it), so each loaded index starts its own Lite server on its file (`start_server_in_thread`, the call
pymilvus' shared per-path server makes; shared per path, a reader would go on searching the folder a writer swapped
out), only when it first searches; a writer never opens the live file (it copies it), and a second reader of a
held file (`rag query` while `rag web` runs) searches a private copy of it.

A server (`--milvus-uri http://host:19530`, token from $MILVUS_TOKEN): the collection cannot be swapped with the
folder, so `rag add` / `rag delete` change it in place (insert / delete by id, Strong consistency) before the folder
with the documents and the manifest is swapped in. A crash between the two leaves vectors of documents the store
does not have (never shown: hits are read from the document store) or deleted vectors of documents it still has
(no longer found by search); running the same add / delete again repairs either.

Index types: "flat" is Milvus's FLAT with metric IP (exact: `rag eval` equals `embedkit eval`, as with FAISS) and
"hnsw" is HNSW with FAISS's parameters. "ivf" and "ivfpq" are refused: Milvus Lite trains one IVF (and codebook) per
segment (an added batch is a segment of its own, clustered alone) and probes each, so its results would not be the
ones FAISS's IVF gives.
Milvus deletes for real, so there are no tombstones.
Metadata is a JSON field, and filters become Milvus expressions over it (`Filter.to_milvus`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from embedkit.errors import ConfigError, DataError
from embedkit.rag.filters import Filter
from embedkit.rag.vectors.base import Results, VectorStore
from embedkit.rag.vectors.faiss_store import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M

log = logging.getLogger(__name__)

DB_FILE = "vectors.milvus.db"  # Milvus Lite wants a name ending in .db
LITE_COLLECTION = "embedkit_rag"
DESCRIPTION = "embedkit rag index"  # marks collections this module made, the only ones a rebuild may drop
INSERT_BATCH = 1000
MAX_LIMIT = 16384  # Milvus's largest top-k
_INDEX = {"flat": "FLAT", "hnsw": "HNSW"}


def _pymilvus():
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC's C core logs every closed Lite connection otherwise
    try:
        import pymilvus
    except ImportError:
        raise ConfigError("the milvus store needs pymilvus and milvus-lite: pip install 'embedkit[milvus]'",
                          field="store") from None
    return pymilvus


def default_collection(folder: Path) -> str:
    """A server collection name from the index folder's name (letters, digits and underscores)."""
    return "embedkit_rag_" + (re.sub(r"[^A-Za-z0-9_]", "_", Path(folder).name) or "index")


def _connect(uri: str):
    pymilvus = _pymilvus()
    try:
        return pymilvus.MilvusClient(uri=uri, token=os.environ.get("MILVUS_TOKEN", ""))
    except Exception as exc:  # pymilvus raises its own and gRPC's errors: one line for the user
        raise DataError(f"cannot open Milvus at {uri}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


class _Lite:
    """A Milvus Lite server of this handle's own on one .db folder, and a client of it (closed together)."""

    def __init__(self, path: Path, *, copy_if_held: bool) -> None:
        _pymilvus()  # installed? (and gRPC told to keep quiet)
        try:
            from milvus_lite.adapter.grpc.server import start_server_in_thread
            from milvus_lite.exceptions import DataDirLockedError
        except ImportError:
            raise ConfigError("a Milvus Lite file needs milvus-lite: pip install 'embedkit[milvus]' (or give a "
                              "server with --milvus-uri)", field="store") from None

        self.private: str | None = None
        try:
            self.server, self.db, port = start_server_in_thread(str(path), host="127.0.0.1", port=0)
        except DataDirLockedError:
            if not copy_if_held:
                raise DataError("the Milvus Lite file is open in another handle", path=path) from None
            # another process (or handle) searches this file: search a private copy (the writers never change it)
            self.private = tempfile.mkdtemp(prefix="embedkit-milvus-")
            shutil.copytree(path, Path(self.private) / DB_FILE)
            self.server, self.db, port = start_server_in_thread(str(Path(self.private) / DB_FILE), host="127.0.0.1",
                                                                port=0)
        self.client = _connect(f"http://127.0.0.1:{port}")
        self._finalizer = weakref.finalize(self, _Lite._stop, self.client, self.server, self.db, self.private)

    @staticmethod
    def _stop(client, server, db, private) -> None:
        for step in (client.close, lambda: server.stop(grace=None), db.close):
            try:
                step()
            except Exception:  # closing what a failed start left half open
                pass
        if private:
            shutil.rmtree(private, ignore_errors=True)

    def close(self) -> None:
        self._finalizer()


class MilvusVectors(VectorStore):
    kind = "milvus"
    index_types = tuple(_INDEX)

    def __init__(self, *, uri: str, collection: str, embedded: bool, index_type: str, params: Mapping[str, Any],
                 folder: Path, expected: int | None = None, lite: _Lite | None = None, client=None) -> None:
        self.uri, self.collection, self.embedded = uri, collection, embedded
        self.index_type, self.params, self.folder = index_type, dict(params), Path(folder)
        self.in_place = not embedded
        self._expected = expected  # the manifest's count, checked when a Lite file is first opened
        self._lite, self._client = lite, client if client is not None else (lite.client if lite else None)
        self._lock = threading.Lock()

    @property
    def client(self):
        """The MilvusClient, connected on first use (a loaded index that only writes never opens the live file)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    if self.embedded:
                        self._lite = _Lite(self.folder / self.uri, copy_if_held=True)
                        client = self._lite.client
                    else:
                        client = _connect(self.uri)
                    if not client.has_collection(self.collection):
                        raise DataError(f"Milvus collection {self.collection!r} not found at {self.uri}",
                                        path=self.folder)
                    client.load_collection(self.collection)
                    self._client = client
                    if self._expected is not None:
                        self._check_count(self._expected)
        return self._client

    @classmethod
    def require(cls) -> None:
        _pymilvus()

    # ------------------------------------------------------------------ creating and opening
    @classmethod
    def create(cls, folder, index_type, vectors, ids, metadata, *, documents, options):
        folder = Path(folder)
        if index_type not in _INDEX:
            raise ConfigError(f"the milvus store takes index types {' and '.join(_INDEX)}, not {index_type!r}",
                              field="index-type")
        uri = options.get("uri")
        embedded = not uri
        collection = options.get("collection") or (LITE_COLLECTION if embedded else default_collection(
            options.get("name") or folder))
        lite = _Lite(folder / DB_FILE, copy_if_held=False) if embedded else None
        client = lite.client if lite else _connect(uri)
        pymilvus = _pymilvus()
        if client.has_collection(collection):
            made_here = client.describe_collection(collection).get("description") == DESCRIPTION
            if not made_here:
                client.close()
                raise ConfigError(f"Milvus collection {collection!r} exists at {uri} and was not made by embedkit: "
                                  "refusing to replace it (pick another with --milvus-collection)",
                                  field="milvus-collection")
            client.drop_collection(collection)
        dim = vectors.shape[1]
        params: dict[str, Any] = {}
        build: dict[str, Any] = {}
        if index_type == "hnsw":
            build = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}
            params = {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                                     description=DESCRIPTION)
        schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("metadata", pymilvus.DataType.JSON)
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="vector", index_type=_INDEX[index_type], metric_type="IP", params=build)
        client.create_collection(collection, schema=schema, index_params=index_params, consistency_level="Strong")
        store = cls(uri=DB_FILE if embedded else uri, collection=collection, embedded=embedded,
                    index_type=index_type, params=params, folder=folder, lite=lite, client=client)
        store.add(ids, vectors, metadata)
        return store, store._record()

    def _record(self) -> dict[str, Any]:
        return {"params": self.params, "file": DB_FILE if self.embedded else None,
                "milvus": {"uri": self.uri, "collection": self.collection, "embedded": self.embedded,
                           "index": _INDEX[self.index_type], "metric": "IP"}}

    @classmethod
    def open(cls, folder, info, documents):
        folder = Path(folder)
        record = info.get("milvus") or {}
        embedded = bool(record.get("embedded", True))
        uri = record.get("uri") or DB_FILE
        if embedded and not (folder / uri).exists():
            raise DataError("Milvus Lite file missing", path=folder / uri)
        return cls(uri=uri, collection=record.get("collection") or LITE_COLLECTION, embedded=embedded,
                   index_type=info["type"], params=info.get("params", {}), folder=folder,
                   expected=info.get("vectors"))

    def _check_count(self, expected: int) -> None:
        held = self.ntotal
        if held == expected:
            return
        message = f"Milvus collection {self.collection!r} holds {held} vectors, the manifest says {expected}"
        if self.embedded:
            raise DataError(message + " (folder modified by hand?)", path=self.folder / DB_FILE)
        log.warning("%s (an interrupted rag add / delete? run it again)", message)

    # ------------------------------------------------------------------ reading
    @property
    def ntotal(self) -> int:
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def search(self, query_emb: np.ndarray, k: int, flt: Filter | None = None) -> Results:
        k = max(1, min(int(k), MAX_LIMIT))
        search_params: dict[str, Any] = {"metric_type": "IP"}
        if self.index_type == "hnsw":
            search_params["params"] = {"ef": max(self.params.get("ef_search", HNSW_EF_SEARCH), k)}
        rows = self.client.search(self.collection, data=np.asarray(query_emb, dtype=np.float32).tolist(), limit=k,
                                  filter=flt.to_milvus() if flt is not None else "", output_fields=[],
                                  search_params=search_params)
        return [(np.array([int(h["id"]) for h in row], dtype=np.int64),
                 np.array([float(h["distance"]) for h in row], dtype=np.float32)) for row in rows]

    def reconstruct(self, ids: Sequence[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        rows = self.client.get(self.collection, ids=ids, output_fields=["vector"])
        by_id = {int(r["id"]): r["vector"] for r in rows}
        return np.array([by_id[i] for i in ids], dtype=np.float32)

    # ------------------------------------------------------------------ updating
    def fork(self, folder, documents):
        folder = Path(folder)
        lite = None
        if self.embedded:  # copy-on-write: the live file is never written (writers change only their copy)
            shutil.copytree(self.folder / self.uri, folder / DB_FILE)
            lite = _Lite(folder / DB_FILE, copy_if_held=False)
            client = lite.client
        else:
            client = _connect(self.uri)
        client.load_collection(self.collection)
        return MilvusVectors(uri=self.uri, collection=self.collection, embedded=self.embedded,
                             index_type=self.index_type, params=self.params, folder=folder, lite=lite, client=client)

    def add(self, ids, vectors, metadata):
        rows = [{"id": int(i), "vector": v.tolist(), "metadata": dict(m or {})}
                for i, v, m in zip(ids, vectors, metadata)]
        for start in range(0, len(rows), INSERT_BATCH):
            self.client.insert(self.collection, rows[start:start + INSERT_BATCH])

    def remove(self, ids) -> bool:
        self.client.delete(self.collection, ids=[int(i) for i in ids])
        return False

    def save(self) -> dict[str, Any]:
        self.client.flush(self.collection)
        if self.embedded:
            self.close()  # everything on disk, and the file's lock released, before the folder is swapped in
        return self._record()

    def close(self) -> None:
        with self._lock:
            if self._lite is not None:
                self._lite.close()
            elif self._client is not None:
                self._client.close()
            self._lite = None
            self._client = None
