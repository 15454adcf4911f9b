"""Distillation from teacher scores, added to the inner contrastive loss.

loss = contrastive_weight x inner + weight x distill, where distill compares the student's cosine scores of each
query's own positive and hard negatives with the teacher's scores for them (mined tuples carry them):
- `kl`: KL(teacher softmax (scores / temperature) || student softmax (cosine x the inner loss's scale));
- `margin_mse` (Hofstaetter et al.): MSE between student and teacher margins positive - negative.
Padded negative slots (rows short of negatives) take no part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from embedkit.train.losses.batch import ContrastiveBatch, ContrastiveObjective, LossOutput

KINDS = ("kl", "margin_mse")


class Distillation(ContrastiveObjective):
    def __init__(self, inner: ContrastiveObjective, *, kind: str = "kl", weight: float = 1.0,
                 temperature: float = 1.0, contrastive_weight: float = 1.0) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"distillation must be one of {', '.join(KINDS)}, not {kind!r}")
        self.inner = inner
        self.kind = kind
        self.weight = weight
        self.temperature = temperature
        self.contrastive_weight = contrastive_weight
        self.gather = inner.gather

    @property
    def scale(self) -> torch.Tensor:
        return self.inner.scale

    def describe(self) -> str:
        return (f"{self.contrastive_weight} x {self.inner.describe()} + {self.weight} x {self.kind} distillation "
                "from teacher scores")

    def compute(self, batch: ContrastiveBatch) -> LossOutput:
        if batch.teacher is None:
            raise ValueError("distillation needs teacher_scores")
        out = self.inner.compute(batch)
        distill = self._distill(batch)
        loss = self.contrastive_weight * out.loss + self.weight * distill
        return LossOutput(loss, out.contrastive, float(distill.detach()), out.masked, out.scale, out.padded)

    def _distill(self, batch: ContrastiveBatch) -> torch.Tensor:
        q = F.normalize(batch.queries, dim=-1)
        d = F.normalize(batch.documents, dim=-1)
        cols = batch.own_columns()
        student = (q[:, None, :] * d[cols]).sum(-1)  # [Q, 1+k] cosine scores
        teacher = batch.teacher.to(device=student.device, dtype=student.dtype)
        real = batch.valid[cols] if batch.valid is not None else None  # [Q, 1+k]
        if self.kind == "kl":
            s_logits, t_logits = student * self.scale, teacher / self.temperature
            if real is not None:
                # finfo.min, not -inf: exp() is exactly 0, and kl_div's 0 * (t - s) stays finite (no NaN).
                low = torch.finfo(student.dtype).min
                s_logits, t_logits = s_logits.masked_fill(~real, low), t_logits.masked_fill(~real, low)
            return F.kl_div(F.log_softmax(s_logits, dim=-1), F.log_softmax(t_logits, dim=-1),
                            log_target=True, reduction="batchmean")
        if batch.k == 0:
            raise ValueError("margin-MSE distillation needs hard negatives")
        error = ((student[:, :1] - student[:, 1:]) - (teacher[:, :1] - teacher[:, 1:])) ** 2
        if real is None:
            return error.mean()
        keep = real[:, 1:].to(error.dtype)
        return (error * keep).sum() / keep.sum().clamp(min=1)  # the mean over real negatives only
