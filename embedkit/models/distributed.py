"""Encoding spread over the processes of a torch.distributed group: an explicit opt-in, never implicit.

    with encoder.sharded():                     # same as: with sharded_encoding(encoder):
        vectors = encoder.encode(texts)         # on every rank: the full float32 [n, dim] array, in input order

Inside the block, when a process group with more than one process is initialised, `Encoder.encode` length-sorts
the texts as usual, deals the batches round-robin over the ranks (batch b runs on rank b % world, so every rank
gets a similar mix of long and short batches), and all-gathers the vectors (on the GPU for nccl, on the CPU for
gloo). Each text is embedded in exactly the batch a single process would use, so the result equals the
single-process one (bit-equal on the same device).

Rules for callers:
  - every rank calls `encode` with the same texts in the same order (each call is a collective), and the same
    number of `encode` calls; a rank that skips one deadlocks the others;
  - every rank makes the same number of forward calls per `encode` (a rank with a batch fewer runs a one-text dummy
    batch), so a model partitioned by DeepSpeed ZeRO-3, whose every forward gathers parameters, keeps in step;
  - outside the block (or without a process group, or with one process) `encode` is the plain single-process one:
    code that encodes on rank 0 only must not enter the block.

Helpers for the code around an encode: `rank_and_world()`, `is_main_process()` (write files and print only there)
and `all_agree(flag)` (e.g. "the embedding cache has this corpus": skip encoding only if every rank can).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from embedkit import logs
from embedkit.models.tokenization import length_sorted_batches

log = logging.getLogger(__name__)

_ATTRIBUTE = "_embedkit_shard_group"  # set on the encoder while sharding is on: {"group": ProcessGroup | None}


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """(rank, world size) in `group` (default: the whole world); (0, 1) without a process group."""
    dist = _dist()
    if dist is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_main_process() -> bool:
    """True on global rank 0, and in a process without a process group."""
    return rank_and_world()[0] == 0


def collective_device(group: Any = None, preferred: torch.device | None = None) -> torch.device:
    """Where a tensor must be for a collective of `group`: a GPU for nccl, the CPU otherwise (gloo)."""
    dist = _dist()
    if dist is not None and dist.get_backend(group) == "nccl":
        if preferred is not None and preferred.type == "cuda":
            return preferred
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_agree(flag: bool, group: Any = None) -> bool:
    """True when `flag` is true on every rank of `group` (a collective: every rank must call it); `flag` alone
    without a process group."""
    dist = _dist()
    if dist is None or dist.get_world_size(group) == 1:
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device(group))
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value.item())


@contextlib.contextmanager
def sharded_encoding(encoder: Any, group: Any = None) -> Iterator[Any]:
    """Within the block, `encoder.encode` spreads its batches over the ranks of `group` (default: the world) and
    returns the gathered result on every rank. Without a process group (or with one process) nothing changes.
    Nests; the previous state is restored on exit. Yields the encoder."""
    previous = getattr(encoder, _ATTRIBUTE, None)
    setattr(encoder, _ATTRIBUTE, {"group": group})
    try:
        yield encoder
    finally:
        setattr(encoder, _ATTRIBUTE, previous)


def sharding_group(encoder: Any) -> tuple[bool, Any]:
    """(True, group) when `encoder.encode` should shard now: sharding switched on and more than one process."""
    state = getattr(encoder, _ATTRIBUTE, None)
    if state is None or _dist() is None:
        return False, None
    group = state["group"]
    return rank_and_world(group)[1] > 1, group


def _check_same_count(n: int, group: Any, device: torch.device) -> None:
    dist = _dist()
    counts = torch.tensor([n, -n], dtype=torch.int64, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
    most, least = int(counts[0]), -int(counts[1])
    if most != least:  # every rank sees the same reduced values, so every rank raises: nobody is left waiting
        raise RuntimeError(f"sharded encode: the ranks were given different numbers of texts ({least} to {most}); "
                           "every rank must encode the same texts")


def encode_sharded(encoder: Any, texts: Sequence[str], *, kind: str, batch_size: int, normalize: bool | None,
                   show_progress: bool | None, group: Any = None, sort_chunk: int = 16384) -> np.ndarray:
    """The sharded body of `Encoder.encode` (called by it inside `sharded_encoding`, under no_grad and eval
    mode)."""
    dist = _dist()
    rank, world = rank_and_world(group)
    device = collective_device(group, encoder.device)
    texts = list(texts)
    _check_same_count(len(texts), group, device)
    dim = encoder.dim
    out = np.empty((len(texts), dim), dtype=np.float32)
    wanted = show_progress if show_progress is not None else len(texts) >= 2048
    progress = logs.progress(total=len(texts), desc=f"encode {kind}s (x{world} processes)", unit="text",
                             logger=log, enabled=rank == 0 and wanted)
    try:
        for start in range(0, len(texts), sort_chunk):
            ids = encoder.token_ids(texts[start:start + sort_chunk], kind)
            batches = list(length_sorted_batches(ids, batch_size))
            shares = [batches[r::world] for r in range(world)]
            rounds = len(shares[0])  # rank 0 has the most batches (round-robin)
            local = []
            for rows in shares[rank]:
                local.append(encoder(encoder.collate([ids[i] for i in rows]), normalize=normalize).float())
            for _ in range(rounds - len(shares[rank])):
                # A dummy forward (the shortest text) so that every rank makes `rounds` forward calls.
                encoder(encoder.collate([ids[batches[-1][-1]]]), normalize=normalize)
            rows_of = [[i for rows in share for i in rows] for share in shares]
            width = max(len(rows) for rows in rows_of)
            mine = torch.zeros((width, dim), dtype=torch.float32, device=device)
            if local:
                vectors = torch.cat(local).to(device)
                mine[:vectors.shape[0]] = vectors
            gathered = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine, group=group)
            for rows, part in zip(rows_of, gathered):
                if rows:
                    out[[start + i for i in rows]] = part[:len(rows)].cpu().numpy()
            progress.update(len(ids))
    finally:
        progress.close()
    return out
