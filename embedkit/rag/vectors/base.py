"""The contract of a vector store: what a RAG index asks of the place its vectors live.

Vectors are float32, L2-normalised; scores are inner products (cosine). Ids are the document store's integer ids
(`embedkit.rag.store`), never reused. Every update of an index writes a new folder and swaps it in
(`embedkit.atomic.atomic_dir`): `fork(folder)` gives the handle the update is applied to, and `save()` makes the
new folder's vector part complete. A store whose vectors live in the folder (FAISS, Milvus Lite) forks a copy, so
the swap is atomic for the vectors too; one whose vectors live elsewhere (a Milvus server) is changed in place by
the fork and says so (`in_place`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from embedkit.rag.filters import Filter

Results = list[tuple[np.ndarray, np.ndarray]]  # per query: (ids, scores), best first


class VectorStore(ABC):
    kind: ClassVar[str]
    index_types: ClassVar[tuple[str, ...]]  # the types it builds ("flat" exact; "hnsw", "ivf", "ivfpq" approximate)
    in_place: bool = False  # True: updates change the live vectors before the folder swap (a server)

    @classmethod
    @abstractmethod
    def create(cls, folder: Path, index_type: str, vectors: np.ndarray, ids: np.ndarray,
               metadata: Sequence[Mapping[str, Any] | None], *, documents, options: Mapping[str, Any]
               ) -> tuple["VectorStore", dict[str, Any]]:
        """A new store holding `vectors` under `ids`, written for the index folder being built at `folder`;
        returns it and its manifest record (merged into the manifest's "index" section: params, file, ...)."""

    @classmethod
    @abstractmethod
    def open(cls, folder: Path, info: Mapping[str, Any], documents) -> "VectorStore":
        """The store of the index folder `folder` (`info`: the manifest's "index" section; `documents`: its
        DocumentStore, for a backend that keeps no metadata itself)."""

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Vectors held (tombstoned ones included)."""

    @abstractmethod
    def search(self, query_emb: np.ndarray, k: int, flt: Filter | None = None) -> Results:
        """Top-k per query among live documents passing `flt`."""

    @abstractmethod
    def reconstruct(self, ids: Sequence[int]) -> np.ndarray:
        """The stored vectors of `ids` (live documents), in that order."""

    @abstractmethod
    def fork(self, folder: Path, documents) -> "VectorStore":
        """A handle to apply an update to, for the new index folder `folder` (whose DocumentStore is `documents`)."""

    @abstractmethod
    def add(self, ids: np.ndarray, vectors: np.ndarray, metadata: Sequence[Mapping[str, Any] | None]) -> None:
        """Add vectors (on a fork)."""

    @abstractmethod
    def remove(self, ids: np.ndarray) -> bool:
        """Remove vectors (on a fork); True when they are only tombstoned (the document store keeps the ids)."""

    @abstractmethod
    def save(self) -> dict[str, Any]:
        """Write a fork's state into its folder; returns the manifest record to merge."""

    @classmethod
    def require(cls) -> None:
        """Raise ConfigError (naming the extra to install) when the backend's packages are missing."""

    def check(self, info: Mapping[str, Any], path: Path) -> None:
        """Raise DataError when the store disagrees with the manifest (a folder modified by hand)."""

    def close(self) -> None:
        """Release files and connections."""
