"""Contrastive loss for embedding training: InfoNCE over in-batch and hard negatives, in one place.

Layout. `queries` is [B, dim]; `documents` is [B * (1 + k), dim]: the B positives first (row i is the positive of
query i), then the hard negatives grouped by query (query i's negatives are rows B + i*k ... B + i*k + k - 1).
Every query is scored against every document in the (gathered) batch; its own positive is the label.

Rows short of hard negatives (mined data where a query had fewer than k survivors) are padded: `document_valid`
[B*(1+k)] marks the real documents, and the padded slots are excluded from every softmax (logit -> finfo.min, so
exp() is exactly 0) and from the distillation terms, which makes the loss equal to the one computed without them.

Options: fixed or learned temperature (log-parametrised, so it stays positive); a symmetric document -> query term;
false-negative masking (a candidate with the same text as the positive, another positive of the same query, and,
optionally, any candidate scoring above `positive - margin`); Matryoshka (the loss averaged over nested prefixes of
the embedding); distillation from teacher scores (KL between softmaxes, or margin-MSE); and, when a
torch.distributed process group is up, the batch is gathered across processes (see `gather_with_grad`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MAX_SCALE = 100.0  # a learned inverse temperature is clamped here (CLIP's bound) so it cannot run away


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
    """Concatenate `tensor` from every process (equal shapes); this process's slice keeps its autograd graph.

    Every rank then computes the full-batch loss, and each rank's gradient reaches only its own embeddings; summed
    over ranks that is exactly the full-batch gradient. Data-parallel engines average gradients over ranks, so the
    trainer multiplies the loss by the world size before `backward` (see `ContrastiveLoss.grad_scale`).
    """
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
    masked: int  # candidates masked as false negatives (summed over Matryoshka dims: first dim only)
    scale: float
    padded: int = 0  # padded negative slots (rows short of hard negatives), excluded from the loss


class ContrastiveLoss(nn.Module):
    def __init__(
        self,
        *,
        temperature: float = 0.05,
        learn_temperature: bool = False,
        symmetric: bool = False,
        mask_false_negatives: bool = True,
        margin: float | None = None,
        matryoshka_dims: Sequence[int] | None = None,
        distillation: str | None = None,
        distillation_weight: float = 1.0,
        distillation_temperature: float = 1.0,
        contrastive_weight: float = 1.0,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        if distillation not in (None, "kl", "margin_mse"):
            raise ValueError(f"distillation must be None, 'kl' or 'margin_mse', not {distillation!r}")
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)
        self.symmetric = symmetric
        self.mask_false_negatives = mask_false_negatives
        self.margin = margin
        self.matryoshka_dims = sorted(set(matryoshka_dims), reverse=True) if matryoshka_dims else None
        self.distillation = distillation
        self.distillation_weight = distillation_weight
        self.distillation_temperature = distillation_temperature
        self.contrastive_weight = contrastive_weight
        self.gather = gather

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_SCALE)

    @property
    def grad_scale(self) -> int:
        """Multiply the loss by this before backward under gradient-averaging data parallelism (see gather)."""
        return distributed_world()[1] if self.gather else 1

    def forward(
        self,
        queries: torch.Tensor,
        documents: torch.Tensor,
        *,
        query_keys: torch.Tensor | None = None,
        document_keys: torch.Tensor | None = None,
        teacher_scores: torch.Tensor | None = None,
        document_valid: torch.Tensor | None = None,
    ) -> LossOutput:
        """queries [B, dim], documents [B*(1+k), dim] (layout above); keys from `text_keys` enable text masking;
        teacher_scores [B, 1+k] (positive first) enable distillation; document_valid [B*(1+k)] bool marks real
        documents (False = a padded negative slot, left out of the loss; positives must be real)."""
        b = queries.shape[0]
        if documents.shape[0] % b:
            raise ValueError(f"documents ({documents.shape[0]}) must be B * (1 + k) for B = {b} queries")
        k = documents.shape[0] // b - 1
        if self.distillation and teacher_scores is None:
            raise ValueError("distillation needs teacher_scores")
        dims = self.matryoshka_dims or [queries.shape[1]]
        if dims[0] > queries.shape[1]:
            raise ValueError(f"matryoshka dim {dims[0]} exceeds the embedding size {queries.shape[1]}")

        # Gather once at full width; Matryoshka prefixes are slices of the gathered tensors.
        if self.gather and distributed_world()[1] > 1:
            rank, world = distributed_world()
            all_q, all_d = gather_with_grad(queries), gather_with_grad(documents)
            q_keys = gather_with_grad(query_keys) if query_keys is not None else None
            d_keys = gather_with_grad(document_keys) if document_keys is not None else None
            teacher = gather_with_grad(teacher_scores) if teacher_scores is not None else None
            # all_gather of bool tensors is not supported by every backend: travel as uint8.
            valid = gather_with_grad(document_valid.to(torch.uint8)).bool() if document_valid is not None else None
        else:
            world = 1
            all_q, all_d, q_keys, d_keys, teacher = queries, documents, query_keys, document_keys, teacher_scores
            valid = document_valid
        if valid is not None:
            valid = valid.to(device=queries.device, dtype=torch.bool)
            if valid.shape != (all_d.shape[0],):
                raise ValueError(f"document_valid must have one entry per document ({all_d.shape[0]}), "
                                 f"got {list(valid.shape)}")
            if valid.all():
                valid = None  # nothing padded: the plain path
        n_docs_local = b * (1 + k)
        # Global row of query i's positive: each process contributes a block of B positives then B*k negatives.
        labels = torch.cat([torch.arange(b) + r * n_docs_local for r in range(world)]).to(queries.device)

        static_mask = self._text_mask(q_keys, d_keys, labels, b, k, world) if self.mask_false_negatives else None
        padded = 0
        if valid is not None:
            if not valid[labels].all():
                raise ValueError("a positive is marked as padding in document_valid")
            padded = int((~valid).sum())
        scale = self.scale
        total = queries.new_zeros(())
        contrastive_sum, distill_sum, masked = 0.0, 0.0, 0
        for index, dim in enumerate(dims):
            q = F.normalize(all_q[:, :dim], dim=-1)
            d = F.normalize(all_d[:, :dim], dim=-1)
            sims = q @ d.T  # [B*world, N]
            mask = static_mask.clone() if static_mask is not None else torch.zeros_like(sims, dtype=torch.bool)
            if self.margin is not None:
                # Candidates nearly as close as the positive are likely unlabelled positives: drop them.
                positive = sims.detach().gather(1, labels[:, None])
                mask |= sims.detach() > positive - self.margin
                mask[torch.arange(len(labels)), labels] = False
            if index == 0:
                masked = int(mask.sum())
            if valid is not None:
                mask |= ~valid[None, :]  # padded slots: no query may see them (added after counting)
            logits = (sims * scale).masked_fill(mask, torch.finfo(sims.dtype).min)
            term = F.cross_entropy(logits, labels)
            if self.symmetric:
                # document -> query: each positive against every query; other copies of the same query masked.
                d_pos = d[labels]
                back = (d_pos @ q.T) * scale
                if q_keys is not None and self.mask_false_negatives:
                    same = q_keys[:, None] == q_keys[None, :]
                    same.fill_diagonal_(False)
                    back = back.masked_fill(same, torch.finfo(back.dtype).min)
                term = (term + F.cross_entropy(back, torch.arange(len(labels), device=back.device))) / 2
            loss = self.contrastive_weight * term
            contrastive_sum += float(term.detach())
            if self.distillation:
                distill = self._distill(q, d, teacher, b * world, k, world, valid)
                loss = loss + self.distillation_weight * distill
                distill_sum += float(distill.detach())
            total = total + loss
        n = len(dims)
        return LossOutput(total / n, contrastive_sum / n, distill_sum / n, masked, float(scale.detach()), padded)

    def _text_mask(self, q_keys, d_keys, labels, b, k, world) -> torch.Tensor | None:
        """True where a candidate is a positive of the query in disguise (never the label itself)."""
        if d_keys is None:
            return None
        pos_keys = d_keys[labels]  # [Q]
        if q_keys is not None:
            # Rows with the same query text share their positives: (same-query) @ (candidate is row r's positive).
            same_query = (q_keys[:, None] == q_keys[None, :]).float()  # [Q, Q]
            is_pos_of = (pos_keys[:, None] == d_keys[None, :]).float()  # [Q, N]
            mask = (same_query @ is_pos_of) > 0
        else:
            mask = pos_keys[:, None] == d_keys[None, :]  # duplicates of the own positive
        mask[torch.arange(len(labels)), labels] = False
        return mask

    def _distill(self, q, d, teacher, n_queries, k, world, valid=None) -> torch.Tensor:
        """Student scores over each query's own positive + hard negatives vs the teacher's scores for them
        (padded negative slots, `valid` False, take no part)."""
        if teacher.shape != (n_queries, 1 + k):
            raise ValueError(f"teacher_scores must be [B, 1+k] = [{n_queries}, {1 + k}], got {list(teacher.shape)}")
        b = n_queries // world
        rows = []
        for r in range(world):
            base = r * b * (1 + k)
            own = torch.arange(b)[:, None]
            cols = torch.cat([own + base, base + b + own * k + torch.arange(k)[None, :]], dim=1)  # [b, 1+k]
            rows.append(cols)
        cols = torch.cat(rows).to(q.device)
        student = (q[:, None, :] * d[cols]).sum(-1)  # [Q, 1+k] cosine scores
        teacher = teacher.to(student.dtype)
        real = valid[cols] if valid is not None else None  # [Q, 1+k]
        if self.distillation == "kl":
            t = self.distillation_temperature
            s_logits, t_logits = student * self.scale, teacher / t
            if real is not None:
                # finfo.min, not -inf: exp() is exactly 0, and kl_div's 0 * (t - s) stays finite (no NaN).
                low = torch.finfo(student.dtype).min
                s_logits, t_logits = s_logits.masked_fill(~real, low), t_logits.masked_fill(~real, low)
            return F.kl_div(F.log_softmax(s_logits, dim=-1), F.log_softmax(t_logits, dim=-1),
                            log_target=True, reduction="batchmean")
        if k == 0:
            raise ValueError("margin-MSE distillation needs hard negatives")
        error = ((student[:, :1] - student[:, 1:]) - (teacher[:, :1] - teacher[:, 1:])) ** 2
        if real is None:
            return error.mean()
        keep = real[:, 1:].to(error.dtype)
        return (error * keep).sum() / keep.sum().clamp(min=1)  # the mean over real negatives only
