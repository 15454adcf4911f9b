"""Corpus vectors read in chunks, from memory or from a .npy file, so mining memory does not grow with the corpus.

A .npy file is read with plain file reads (no memory map): mapped pages of a 1.5 GB file would count towards the
process's resident memory as they are touched, reads into one reusable chunk do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Iterator, Protocol

import numpy as np

from embedkit.errors import DataError


class VectorSource(Protocol):
    n: int
    dim: int

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first row, float32 C-contiguous [m, dim] array) covering all rows in order. The array is only
        valid until the next step (a file source reuses one buffer)."""
        ...


class ArraySource:
    """Vectors already in memory."""

    def __init__(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.ndim != 2:
            raise DataError(f"expected a 2-d array of vectors, got shape {array.shape}")
        self.array = np.ascontiguousarray(array, dtype=np.float32)
        self.n, self.dim = self.array.shape

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.n, rows):
            yield start, self.array[start:start + rows]


class NpyFileSource:
    """A float32 [n, dim] .npy file read chunk by chunk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError("embeddings file not found", path=self.path)
        with open(self.path, "rb") as f:
            self.offset, shape, dtype, fortran = _read_header(f, self.path)
        if len(shape) != 2 or fortran or dtype != np.dtype("<f4"):
            raise DataError(f"expected a C-ordered float32 array [documents, dim], got {dtype} shape {shape}"
                            f"{' (Fortran order)' if fortran else ''}", path=self.path)
        self.n, self.dim = int(shape[0]), int(shape[1])
        expected = self.offset + self.n * self.dim * 4
        if self.path.stat().st_size < expected:
            raise DataError(f"file is truncated: {self.path.stat().st_size} bytes, the header promises {expected}",
                            path=self.path)

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """One buffer is reused for every chunk: a caller that keeps a chunk past the next step must copy it.

        (Allocating a fresh chunk each step would hold two chunks at once while the generator fills the next.)
        """
        buffer = np.empty((min(rows, self.n), self.dim), dtype=np.float32)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for start in range(0, self.n, rows):
                chunk = buffer[: min(rows, self.n - start)]
                view = memoryview(chunk).cast("B")
                got = f.readinto(view)
                if got != view.nbytes:
                    raise DataError(f"file ended early while reading rows from {start}", path=self.path)
                yield start, chunk


def _read_header(f: BinaryIO, path: Path) -> tuple[int, tuple, np.dtype, bool]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
    except ValueError as exc:
        raise DataError(f"not a .npy file ({exc})".splitlines()[0], path=path) from None
    if dtype.hasobject:
        raise DataError("the .npy file holds Python objects; only float32 vectors are read (no pickle)", path=path)
    return f.tell(), shape, dtype, fortran


class NpyWriter:
    """Write a float32 [n, dim] .npy file chunk by chunk (n known in advance); memory stays at one chunk."""

    def __init__(self, f: BinaryIO, n: int, dim: int) -> None:
        self.f, self.n, self.dim, self.written = f, n, dim, 0
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": (n, dim)}
        np.lib.format.write_array_header_1_0(f, header)

    def write(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype="<f4")
        if chunk.ndim != 2 or chunk.shape[1] != self.dim:
            raise ValueError(f"chunk shape {chunk.shape} does not match dim {self.dim}")
        self.f.write(memoryview(chunk).cast("B"))
        self.written += chunk.shape[0]

    def close(self) -> None:
        if self.written != self.n:
            raise ValueError(f"wrote {self.written} rows, promised {self.n}")
        self.f.flush()
