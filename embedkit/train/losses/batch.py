"""What every contrastive loss works on: one global batch of embeddings, gathered across processes once.

Layout. Locally, `queries` is [B, dim] and `documents` is [B * (1 + k), dim]: the B positives first (row i is the
positive of query i), then the hard negatives grouped by query (query i's negatives are rows B + i*k ... B + i*k +
k - 1). With a torch.distributed process group up, `gather_batch` concatenates every process's block, so each
query is scored against every document of every process, and its own positive is its label.

Rows short of hard negatives (mined data where a query had fewer than k survivors) are padded: `document_valid`
[B*(1+k)] marks the real documents; losses exclude padded slots from every softmax and from distillation.

Why the gather keeps the local slice's graph: every rank computes the full-batch loss, and each rank's gradient
reaches only its own embeddings; summed over ranks that is exactly the full-batch gradient. Data-parallel engines
average gradients over ranks, so the training step multiplies the loss by `grad_scale` (the world size) before
backward; a loss parameter (a learned temperature) gets the same full-batch gradient on every rank, so the engine
divides its gradient by the world size again (embedkit/train/engine.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import nn


def text_keys(texts: Sequence[str]) -> torch.Tensor:
    """Stable 63-bit ids of texts: equal ids <=> identical texts (for false-negative masking across processes)."""
    keys = [int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little") >> 1 for t in texts]
    return torch.tensor(keys, dtype=torch.long)


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of the active process group, or (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every process (equal shapes); this process's slice keeps its autograd graph."""
    rank, world = distributed_world()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(parts, tensor.detach().contiguous())
    parts[rank] = tensor
    return torch.cat(parts, dim=0)


@dataclass
class LossOutput:
    loss: torch.Tensor
    contrastive: float
    distillation: float
    masked: int  # candidates masked as false negatives (Matryoshka: the first, widest dim)
    scale: float
    padded: int = 0  # padded negative slots (rows short of hard negatives), excluded from the loss


@dataclass
class ContrastiveBatch:
    """A global batch in the layout above. `per_rank` queries come from each of `world` processes."""

    queries: torch.Tensor  # [Q, dim], Q = per_rank * world
    documents: torch.Tensor  # [Q * (1 + k), dim]
    labels: torch.Tensor  # [Q]: row of each query's positive in `documents`
    k: int
    per_rank: int
    world: int
    query_keys: torch.Tensor | None = None
    document_keys: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # [Q * (1 + k)] bool, None when nothing is padded
    teacher: torch.Tensor | None = None  # [Q, 1 + k]: teacher scores of each query's positive and own negatives

    def prefix(self, dim: int) -> "ContrastiveBatch":
        """The same batch with embeddings cut to their first `dim` components (Matryoshka)."""
        if dim > self.queries.shape[1]:
            raise ValueError(f"matryoshka dim {dim} exceeds the embedding size {self.queries.shape[1]}")
        return replace(self, queries=self.queries[:, :dim], documents=self.documents[:, :dim])

    @property
    def padded(self) -> int:
        return 0 if self.valid is None else int((~self.valid).sum())

    def own_columns(self) -> torch.Tensor:
        """[Q, 1 + k] document rows of each query's own positive and hard negatives."""
        b, k = self.per_rank, self.k
        blocks = []
        for r in range(self.world):
            base = r * b * (1 + k)
            own = torch.arange(b)[:, None]
            blocks.append(torch.cat([own + base, base + b + own * k + torch.arange(k)[None, :]], dim=1))
        return torch.cat(blocks).to(self.queries.device)


def gather_batch(queries: torch.Tensor, documents: torch.Tensor, *, query_keys: torch.Tensor | None = None,
                 document_keys: torch.Tensor | None = None, teacher_scores: torch.Tensor | None = None,
                 document_valid: torch.Tensor | None = None, gather: bool = True) -> ContrastiveBatch:
    """Check the local layout and gather it across processes (when `gather` and a process group is up)."""
    b = queries.shape[0]
    if documents.shape[0] % b:
        raise ValueError(f"documents ({documents.shape[0]}) must be B * (1 + k) for B = {b} queries")
    k = documents.shape[0] // b - 1
    if gather and distributed_world()[1] > 1:
        world = distributed_world()[1]
        queries, documents = gather_with_grad(queries), gather_with_grad(documents)
        query_keys = gather_with_grad(query_keys) if query_keys is not None else None
        document_keys = gather_with_grad(document_keys) if document_keys is not None else None
        teacher_scores = gather_with_grad(teacher_scores) if teacher_scores is not None else None
        # all_gather of bool tensors is not supported by every backend: travel as uint8.
        if document_valid is not None:
            document_valid = gather_with_grad(document_valid.to(torch.uint8)).bool()
    else:
        world = 1
    n_local = b * (1 + k)
    # Global row of query i's positive: each process contributes a block of B positives then B*k negatives.
    labels = torch.cat([torch.arange(b) + r * n_local for r in range(world)]).to(queries.device)
    valid = None
    if document_valid is not None:
        valid = document_valid.to(device=queries.device, dtype=torch.bool)
        if valid.shape != (documents.shape[0],):
            raise ValueError(f"document_valid must have one entry per document ({documents.shape[0]}), "
                             f"got {list(valid.shape)}")
        if not valid[labels].all():
            raise ValueError("a positive is marked as padding in document_valid")
        if valid.all():
            valid = None  # nothing padded: the plain path
    if teacher_scores is not None and teacher_scores.shape != (b * world, 1 + k):
        raise ValueError(f"teacher_scores must be [B, 1+k] = [{b * world}, {1 + k}], got {list(teacher_scores.shape)}")
    return ContrastiveBatch(queries, documents, labels, k, b, world, query_keys, document_keys, valid, teacher_scores)


class ContrastiveObjective(nn.Module):
    """Base of every contrastive loss: `loss(queries, documents, **keys)` gathers once, then `compute(batch)`.

    Wrappers (Matryoshka, distillation) override `compute` and call their inner loss's `compute`, so the batch is
    gathered once whatever the nesting.
    """

    gather: bool = True

    def forward(self, queries: torch.Tensor, documents: torch.Tensor, *, query_keys=None, document_keys=None,
                teacher_scores=None, document_valid=None) -> LossOutput:
        batch = gather_batch(queries, documents, query_keys=query_keys, document_keys=document_keys,
                             teacher_scores=teacher_scores, document_valid=document_valid, gather=self.gather)
        return self.compute(batch)

    def compute(self, batch: ContrastiveBatch) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def scale(self) -> torch.Tensor:
        """The inverse temperature the similarities are multiplied by."""
        raise NotImplementedError

    @property
    def grad_scale(self) -> int:
        """Multiply the loss by this before backward under gradient-averaging data parallelism (see module doc)."""
        return distributed_world()[1] if self.gather else 1

    def describe(self) -> str:
        """One line for model cards and logs: what this loss computes."""
        raise NotImplementedError
