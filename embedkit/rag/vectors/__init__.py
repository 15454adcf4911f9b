"""Vector stores behind a RAG index: one small module per backend, behind `base.VectorStore`.

    faiss   (default) FAISS in the index folder (index.faiss): embedded, nothing to run
    milvus  Milvus through pymilvus' MilvusClient: a Milvus Lite file in the index folder by default, or a Milvus
            server (`--milvus-uri http://host:19530`) in production

The index (`embedkit.rag.index`) keeps documents, metadata and BM25 itself and asks the store only for vectors:
add, remove, search (with a metadata filter, `embedkit.rag.filters`) and reconstruct. A backend is one module
here and one line in `STORES`.
"""

from __future__ import annotations

import importlib

from embedkit.errors import ConfigError
from embedkit.rag.vectors.base import VectorStore

STORES = {"faiss": "embedkit.rag.vectors.faiss_store.FaissVectors",
          "milvus": "embedkit.rag.vectors.milvus_store.MilvusVectors"}
DEFAULT_STORE = "faiss"


def store_class(kind: str) -> type[VectorStore]:
    """The VectorStore class of a kind ("faiss", "milvus"); its module is imported only now (faiss, pymilvus)."""
    if kind not in STORES:
        raise ConfigError(f"unknown vector store {kind!r} (use {', '.join(STORES)})", field="store")
    module, _, name = STORES[kind].rpartition(".")
    return getattr(importlib.import_module(module), name)
