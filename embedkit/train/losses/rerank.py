"""Reranker losses: a cross-encoder's relevance logits of each query's positive and its k negatives.

Layout: `logits` [Q, 1 + k], column 0 the query's positive, then its negatives (from embedkit's miner); `valid`
[Q, 1 + k] marks the real slots (rows short of negatives are padded; padded slots take part in nothing). Unlike the
contrastive losses, nothing is gathered across processes: a pair's logit depends only on that pair, so each process
scores its own rows and data parallelism averages the gradients as for any loss.

- `listwise` (the default): softmax cross-entropy over the positive and its negatives (FlagEmbedding's and
  Tevatron's reranker loss; sentence-transformers' MultipleNegativesRanking for cross-encoders without in-batch
  pairs). It learns an order within a query's candidates, which is what reranking uses.
- `bce`: pointwise binary cross-entropy, positive 1, negatives 0 (sentence-transformers' BinaryCrossEntropyLoss);
  calibrated scores, but k negatives outweigh the one positive (`pos_weight` = k by default keeps them even).
- distillation from teacher scores (`loss.distillation`, the mined rows' scores, e.g. from a stronger
  cross-encoder via `embedkit mine --teacher`): `margin_mse` on positive - negative margins (Hofstaetter et
  al.), `kl` between the teacher's softmax (scores / distillation_temperature) and the student's; added to the
  base loss with `contrastive_weight` and `distillation_weight`, as for the bi-encoder.

Registered with `@register_loss(name, task="rerank")`: a rerank recipe's `loss.type` accepts these names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embedkit.train.losses.batch import LossOutput
from embedkit.train.losses.registry import register_loss

_LOW = -1e4  # a padded slot's logit in a softmax: exp() underflows to exactly 0 in fp32, without inf - inf NaNs


class RerankObjective(nn.Module):
    """Base of the reranker losses: `forward(logits, valid, teacher=None) -> LossOutput`."""

    name = "rerank"

    def describe(self) -> str:
        return self.name

    def base(self, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, valid: torch.Tensor, teacher: torch.Tensor | None = None) -> LossOutput:
        valid = valid.to(logits.device)
        loss = self.base(logits, valid)
        padded = int((~valid).sum())
        return LossOutput(loss, float(loss.detach()), 0.0, 0, 1.0, padded)


class Listwise(RerankObjective):
    name = "listwise softmax cross-entropy over the positive and its negatives"

    def base(self, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        masked = logits.masked_fill(~valid, _LOW)
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(masked, target)


class PointwiseBCE(RerankObjective):
    def __init__(self, pos_weight: float | None = None) -> None:
        super().__init__()
        self.pos_weight = pos_weight

    @property
    def name(self) -> str:  # type: ignore[override]
        return "pointwise binary cross-entropy (positive 1, negatives 0)"

    def base(self, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        k = logits.shape[1] - 1
        weight = torch.ones_like(logits)
        weight[:, 0] = float(self.pos_weight if self.pos_weight is not None else max(k, 1))
        weight = weight * valid.to(logits.dtype)
        losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weight
        return losses.sum() / weight.sum().clamp(min=1.0)


class RerankDistillation(RerankObjective):
    """The base loss plus distillation from teacher scores of the same slots."""

    def __init__(self, inner: RerankObjective, *, kind: str, weight: float = 1.0, temperature: float = 1.0,
                 base_weight: float = 1.0) -> None:
        super().__init__()
        if kind not in ("kl", "margin_mse"):
            raise ValueError(f"distillation must be kl or margin_mse, not {kind!r}")
        self.inner, self.kind, self.weight, self.temperature, self.base_weight = inner, kind, weight, temperature, \
            base_weight

    def describe(self) -> str:
        return f"{self.base_weight} x {self.inner.describe()} + {self.weight} x {self.kind} distillation"

    def forward(self, logits: torch.Tensor, valid: torch.Tensor, teacher: torch.Tensor | None = None) -> LossOutput:
        if teacher is None:
            raise ValueError("distillation needs teacher scores")
        valid = valid.to(logits.device)
        base = self.inner.base(logits, valid)
        teacher = teacher.to(device=logits.device, dtype=logits.dtype)
        if self.kind == "kl":
            student = F.log_softmax(logits.masked_fill(~valid, _LOW), dim=-1)
            target = F.log_softmax((teacher / self.temperature).masked_fill(~valid, _LOW), dim=-1)
            distill = F.kl_div(student, target, log_target=True, reduction="batchmean")
        else:
            error = ((logits[:, :1] - logits[:, 1:]) - (teacher[:, :1] - teacher[:, 1:])) ** 2
            keep = valid[:, 1:].to(error.dtype)
            distill = (error * keep).sum() / keep.sum().clamp(min=1.0)
        loss = self.base_weight * base + self.weight * distill
        return LossOutput(loss, float(base.detach()), float(distill.detach()), 0, 1.0, int((~valid).sum()))


@register_loss("listwise", task="rerank")
def build_listwise(section, gather: bool) -> Listwise:
    return Listwise()


@register_loss("bce", task="rerank")
def build_bce(section, gather: bool) -> PointwiseBCE:
    return PointwiseBCE()


def wrap_rerank_distillation(loss: RerankObjective, section) -> RerankObjective:
    """`loss` with the recipe's distillation added (itself when loss.distillation is none)."""
    if section.distillation == "none":
        return loss
    return RerankDistillation(loss, kind=section.distillation, weight=section.distillation_weight,
                              temperature=section.distillation_temperature, base_weight=section.contrastive_weight)
