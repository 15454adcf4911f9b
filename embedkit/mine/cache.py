"""Corpus embeddings for mining, encoded in chunks straight to a .npy file and cached on disk.

The cache is the evaluation's (`embedkit.eval.runner.embedding_cache_path`): same folder, same key (model
fingerprint + embedding settings + corpus ids and texts), same file format, so `embedkit eval` and `embedkit mine`
reuse each other's corpus embeddings. What differs is only how a missing entry is written: here it is encoded
`ENCODE_CHUNK` texts at a time and appended to the file, so a corpus of millions never sits in memory as one array.

Row reuse (`embedkit.eval.rowcache`, shared with eval): on a miss, the vectors of texts that an earlier entry of the
same model key (fingerprint, pooling, prompts, max length, dtype, kind) holds are copied from it, chunk by chunk, and
only the other texts of each chunk are encoded; the entry written is the same file it would be without reuse. So
mining synth's output corpus after `embedkit synth --round-trip-k` encoded its documents, or a corpus with a few
documents added, encodes only the new texts (one INFO line with `progress` says how many were reused). A reused
vector may differ from a fresh encode by the float rounding of batch padding (~1e-7), far below anything a ranking
sees. Every entry written here (Ray's too) gets its row-digest sidecar, `<entry-key>.<model-tag>.rows`; an entry
without one (written before row reuse) or a damaged one is simply not reused. Row reuse is in-process only: under
sharded encoding (several processes) and with `ray` a miss is encoded whole, as before.

With `ray` (`embedkit mine --ray`) a missing entry is encoded on Ray Data (embedkit.models.ray_encode) into a
folder of vector shards beside the entry (`<entry>.shards/`), which is joined into the entry and removed at the
end: an interrupted run resumes from the shards it finished.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from embedkit.atomic import atomic_path
from embedkit.eval.rowcache import ReuseMismatch, RowReuse, text_digests
from embedkit.eval.runner import (default_cache_dir, embedding_cache_path, plan_row_reuse, ranks_agree,
                                  write_row_digests)
from embedkit.mine.vectors import NpyFileSource, NpyWriter
from embedkit.models.ray_encode import RaySettings, encode_to_npy_on_ray

log = logging.getLogger(__name__)

ENCODE_CHUNK = 16384


def encode_to_npy(encoder, texts: list[str], target: Path, *, kind: str, batch_size: int,
                  progress: bool = False, reuse: RowReuse | None = None) -> None:
    """Encode `texts` chunk by chunk into a float32 .npy at `target` (written atomically). reuse: rows to copy
    from earlier cache entries (`plan_row_reuse`); each chunk then encodes only its other texts, in one call, and
    a chunk that is all reused calls no encoder. Raises ReuseMismatch (nothing written) when the encoder's width is
    not the reused rows'."""
    level = logging.INFO if progress else logging.DEBUG
    dim = None
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        writer = None
        for start in range(0, len(texts), ENCODE_CHUNK):
            stop = min(start + ENCODE_CHUNK, len(texts))
            if reuse is None:
                chunk = encoder.encode(texts[start:stop], kind=kind, batch_size=batch_size, normalize=True)
            else:
                chunk = reuse.rows(encoder, texts, start, stop, kind=kind, batch_size=batch_size)
            chunk = np.ascontiguousarray(chunk, dtype=np.float32)
            if writer is None:
                dim = chunk.shape[1]
                writer = NpyWriter(f, len(texts), dim)
            writer.write(chunk)
            if len(texts) > ENCODE_CHUNK:
                log.log(level, f"encoded {min(start + ENCODE_CHUNK, len(texts)):,}/{len(texts):,} documents")
        if writer is None:
            raise ValueError("cannot encode an empty corpus")
        writer.close()


@contextlib.contextmanager
def corpus_vectors(encoder, ids: list[str], texts: list[str], *, batch_size: int = 32,
                   cache_dir: str | Path | None = None, use_cache: bool = True,
                   progress: bool = False,
                   write_cache: bool = True,
                   ray: RaySettings | None = None) -> Iterator[tuple[NpyFileSource, dict]]:
    """Yield (vector source, info) for the corpus; info = {"cached": bool, "path": str | None}.

    With the cache on, a hit is read from disk (streamed) and a miss is encoded into the cache. With it off, the
    vectors go to a temporary file that is removed afterwards. Under sharded encoding (several processes) a hit
    counts only when every process has it (else all encode together); write_cache=False (the processes other
    than rank 0) reads the cache but encodes a miss into a temporary file. ray: encode a miss on Ray Data (without
    the cache into a temporary folder, so there is nothing to resume from).
    """
    if use_cache:
        path = embedding_cache_path(Path(cache_dir) if cache_dir else default_cache_dir(), encoder, ids, texts,
                                    "document")
        hit = None
        if path.is_file():
            try:
                hit = NpyFileSource(path)
            except Exception:  # a damaged cache entry (truncated, wrong dtype) is re-encoded below
                hit = None
        if ranks_agree(encoder, hit is not None and hit.n == len(texts)):
            yield hit, {"cached": True, "path": str(path)}
            return
        if write_cache:
            _encode_entry(encoder, ids, texts, path, batch_size=batch_size, progress=progress, ray=ray)
            yield NpyFileSource(path), {"cached": False, "path": str(path)}
            return
    with tempfile.TemporaryDirectory(prefix="embedkit-mine-") as tmp:
        path = Path(tmp) / "corpus.npy"
        _encode(encoder, ids, texts, path, batch_size=batch_size, progress=progress, ray=ray)
        yield NpyFileSource(path), {"cached": False, "path": None}


def _encode_entry(encoder, ids: list[str], texts: list[str], path: Path, *, batch_size: int, progress: bool,
                  ray: RaySettings | None) -> None:
    """Write the missing cache entry `path` and its row-digest sidecar, reusing rows of earlier entries (not on
    Ray, and not under sharded encoding: `plan_row_reuse`)."""
    level = logging.INFO if progress else logging.DEBUG
    if ray is not None:
        _encode(encoder, ids, texts, path, batch_size=batch_size, progress=progress, ray=ray)
        write_row_digests(encoder, path, text_digests(texts), kind="document")
        return
    digests, reuse = plan_row_reuse(encoder, path, texts, kind="document", level=level)
    try:
        encode_to_npy(encoder, texts, path, kind="document", batch_size=batch_size, progress=progress, reuse=reuse)
    except ReuseMismatch as exc:
        log.warning("not reusing cached rows (%s); encoding all %d texts", exc, len(texts))
        encode_to_npy(encoder, texts, path, kind="document", batch_size=batch_size, progress=progress)
    finally:
        if reuse is not None:
            reuse.close()
    write_row_digests(encoder, path, digests, kind="document")


def _encode(encoder, ids: list[str], texts: list[str], target: Path, *, batch_size: int, progress: bool,
            ray: RaySettings | None) -> None:
    if ray is None:
        encode_to_npy(encoder, texts, target, kind="document", batch_size=batch_size, progress=progress)
        return
    encode_to_npy_on_ray(encoder, ids, texts, target, kind="document", batch_size=batch_size, normalize=True,
                         settings=ray, progress=progress)
