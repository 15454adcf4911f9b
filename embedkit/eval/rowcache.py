"""Row-level reuse for the corpus embedding cache: on a miss, copy the vectors an earlier entry already holds.

An entry of the cache (`embedkit.eval.runner.embedding_cache_path`) is keyed by the model AND the whole corpus, so a
corpus that differs from a cached one in a few documents misses it. Every entry written also gets a sidecar beside it,
`<entry-key>.<model-tag>.rows`: a plain .npy (read with allow_pickle=False) of one little-endian uint64 per row, the
first 8 bytes of the blake2b digest of the row's text (ids do not change a vector, so they are not in it). The
model tag is the first 16 hex digits of the SHA-256 of the entry's model key (fingerprint, pooling, prompts, max
length, dtype, kind), so one glob (`*.<model-tag>.rows`) lists exactly the entries of the same model key: the
candidates. The name does not end in `.npy`, so `embeddings/*.npy` still lists the entries alone.

On a miss, `find_reuse` reads the candidates' sidecars newest first and maps each needed text to (candidate, row);
`RowReuse.rows` then copies the found rows from the candidates' .npy files (memory-mapped, read-only) and encodes the
others in one `encoder.encode` call per range (the whole corpus for eval, one chunk at a time for mine). Anything
wrong with a candidate (sidecar or entry unreadable or missing, not uint64 / float32, row counts that disagree, a
dimension other than the other candidates') skips that candidate; it is never fatal. An entry without a sidecar
(written before row reuse existed) is not a candidate. A false match needs two different texts with the same 64-bit
digest: about n_needed x n_cached / 2^64, 5e-6 for ten million texts against ten million cached ones.

A reused vector was encoded in another batch than a fresh encode would put it in, so it may differ from one by the
float rounding of batch padding (~1e-7 on a unit vector), far below anything a ranking sees.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from embedkit.atomic import atomic_path

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".rows"
_COPY_BLOCK = 65536  # rows copied per step: bounds the temporary a fancy index makes


class ReuseMismatch(ValueError):
    """The encoder's vectors are not the candidates' width: the caller encodes everything instead."""


def text_digests(texts: Sequence[str]) -> np.ndarray:
    """One uint64 per text: the first 8 bytes (little-endian) of blake2b(text as UTF-8)."""
    blob = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest() for t in texts)
    return np.frombuffer(blob, dtype="<u8").astype(np.uint64, copy=True)


def sidecar_path(entry: Path, model_tag: str) -> Path:
    """`<entry-key>.<model-tag>.rows` beside the entry `<entry-key>.npy`."""
    entry = Path(entry)
    return entry.with_name(f"{entry.stem}.{model_tag}{SIDECAR_SUFFIX}")


def write_sidecar(entry: Path, model_tag: str, digests: np.ndarray) -> None:
    """Write the row digests of `entry` (atomically; after the entry, so a crash leaves no sidecar of a missing
    entry). A failure is logged, never raised: without its sidecar the entry is only not a candidate."""
    try:
        with atomic_path(sidecar_path(entry, model_tag)) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(digests, dtype="<u8"), allow_pickle=False)
    except OSError as exc:
        log.warning("could not write the row digests of %s (%s); later corpora will not reuse its rows", entry, exc)


class RowReuse:
    """Where each row of a new entry comes from: `source[i]` (index into the open candidates, -1: encode it) and
    `row[i]` (its row there)."""

    def __init__(self, maps: list[np.ndarray], source: np.ndarray, row: np.ndarray) -> None:
        self.maps, self.source, self.row = maps, source, row
        self.n = int(source.shape[0])
        self.dim = int(maps[0].shape[1])
        self.reused = int(np.count_nonzero(source >= 0))

    def missing(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Indices (into the whole corpus) of the rows in [start, stop) that no candidate holds."""
        stop = self.n if stop is None else stop
        return start + np.flatnonzero(self.source[start:stop] < 0)

    def rows(self, encoder: Any, texts: Sequence[str], start: int, stop: int, *, kind: str,
             batch_size: int) -> np.ndarray:
        """float32 [stop - start, dim]: the found rows copied, the others encoded in one `encoder.encode` call.
        Raises ReuseMismatch when the encoder's width is not the candidates'."""
        out = np.empty((stop - start, self.dim), dtype=np.float32)
        missing = self.missing(start, stop)
        if missing.size:
            fresh = np.asarray(encoder.encode([texts[i] for i in missing], kind=kind, batch_size=batch_size,
                                              normalize=True), dtype=np.float32)
            if fresh.ndim != 2 or fresh.shape != (missing.size, self.dim):
                raise ReuseMismatch(f"encoded vectors of shape {fresh.shape}, the cached entries hold {self.dim}-d")
            out[missing - start] = fresh
        source = self.source[start:stop]
        for k, array in enumerate(self.maps):
            local = np.flatnonzero(source == k)
            for b in range(0, local.size, _COPY_BLOCK):
                dst = local[b:b + _COPY_BLOCK]
                out[dst] = array[self.row[start + dst]]
        self._release()
        return out

    def _release(self) -> None:
        """Drop the mapped pages read so far from this process's resident set (they stay in the page cache), so
        copying a million rows does not show as 1.5 GB of resident memory; Linux only, elsewhere a no-op."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        for array in self.maps:
            mapped = getattr(array, "_mmap", None)
            if advice is not None and mapped is not None and hasattr(mapped, "madvise"):
                try:
                    mapped.madvise(advice)
                except (OSError, ValueError):
                    pass

    def close(self) -> None:
        self.maps = []


def find_reuse(entry: Path, model_tag: str, digests: np.ndarray) -> RowReuse | None:
    """The rows of the missing `entry` that earlier entries of the same model key hold, or None when there are
    none. Candidates are read newest first; a text found in several takes the newest's row."""
    entry = Path(entry)
    n = int(digests.shape[0])
    if n == 0 or not entry.parent.is_dir():
        return None
    own = sidecar_path(entry, model_tag)
    sidecars = []
    for path in entry.parent.glob(f"*.{model_tag}{SIDECAR_SUFFIX}"):
        if path == own:  # the entry being written: missing or damaged
            continue
        try:
            sidecars.append((path.stat().st_mtime_ns, path))
        except OSError:
            continue
    source = np.full(n, -1, dtype=np.int32)
    row = np.zeros(n, dtype=np.int64)
    maps: list[np.ndarray] = []
    dim = None
    for _, sidecar in sorted(sidecars, key=lambda item: item[0], reverse=True):
        wanted = np.flatnonzero(source < 0)
        if not wanted.size:
            break
        candidate = sidecar.with_name(sidecar.name[: -len(f".{model_tag}{SIDECAR_SUFFIX}")] + ".npy")
        loaded = _load_candidate(sidecar, candidate, dim)
        if loaded is None:
            continue
        have, array = loaded
        order = np.argsort(have, kind="stable")
        sorted_have = have[order]
        pos = np.searchsorted(sorted_have, digests[wanted])
        pos_ok = np.minimum(pos, sorted_have.size - 1)
        hit = sorted_have[pos_ok] == digests[wanted]
        if not hit.any():
            continue
        source[wanted[hit]] = len(maps)
        row[wanted[hit]] = order[pos_ok[hit]]
        maps.append(array)
        dim = int(array.shape[1])
    if not maps:
        return None
    return RowReuse(maps, source, row)


def _load_candidate(sidecar: Path, candidate: Path, dim: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(digests, read-only memory map of the entry), or None (logged at DEBUG) when anything is wrong."""
    try:
        with open(sidecar, "rb") as f:
            have = np.load(f, allow_pickle=False)
        if have.ndim != 1 or have.dtype != np.dtype("<u8") or have.size == 0:
            raise ValueError(f"row digests of dtype {have.dtype} shape {have.shape}")
        array = np.load(candidate, mmap_mode="r", allow_pickle=False)  # a file cut short fails here
        if array.ndim != 2 or array.dtype != np.dtype("<f4") or array.shape[1] == 0:
            raise ValueError(f"vectors of dtype {array.dtype} shape {array.shape}")
        if array.shape[0] != have.size:
            raise ValueError(f"{array.shape[0]} vectors but {have.size} row digests")
        if dim is not None and array.shape[1] != dim:
            raise ValueError(f"{array.shape[1]}-d vectors, the newer candidates hold {dim}-d")
    except Exception as exc:  # noqa: BLE001 - a damaged candidate is skipped, whatever is wrong with it
        log.debug("not reusing rows of %s: %s", candidate, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return np.asarray(have, dtype=np.uint64), array
