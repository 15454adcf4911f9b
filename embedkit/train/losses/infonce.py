"""InfoNCE over in-batch and hard negatives: the contrastive loss every embedding recipe starts from.

Each query is scored (cosine x scale) against every document of the gathered batch; its own positive is the label.
Options: fixed or learned temperature (log-parametrised, so it stays positive; clamped at CLIP's bound); a symmetric
document -> query term; false-negative masking (a candidate with the same text as the positive, another positive of
the same query, and, optionally, any candidate scoring above `positive - margin`). Padded negative slots take part
in no softmax (logit -> finfo.min, so exp() is exactly 0), which makes the loss equal to the one without them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from embedkit.train.losses.batch import ContrastiveBatch, ContrastiveObjective, LossOutput
from embedkit.train.losses.registry import register_loss

MAX_SCALE = 100.0  # a learned inverse temperature is clamped here (CLIP's bound) so it cannot run away


class InfoNCE(ContrastiveObjective):
    def __init__(self, *, temperature: float = 0.05, learn_temperature: bool = False, symmetric: bool = False,
                 mask_false_negatives: bool = True, margin: float | None = None, gather: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)
        self.temperature = temperature
        self.learn_temperature = learn_temperature
        self.symmetric = symmetric
        self.mask_false_negatives = mask_false_negatives
        self.margin = margin
        self.gather = gather

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_SCALE)

    def describe(self) -> str:
        parts = [f"temperature {self.temperature}" + (" (learned)" if self.learn_temperature else "")]
        if self.symmetric:
            parts.append("symmetric")
        if self.mask_false_negatives:
            parts.append("false negatives masked" + (f", margin {self.margin}" if self.margin is not None else ""))
        return f"InfoNCE ({', '.join(parts)})"

    def compute(self, batch: ContrastiveBatch) -> LossOutput:
        q = F.normalize(batch.queries, dim=-1)
        d = F.normalize(batch.documents, dim=-1)
        labels = batch.labels
        sims = q @ d.T  # [Q, N]
        mask = self._text_mask(batch) if self.mask_false_negatives else None
        if mask is None:
            mask = torch.zeros_like(sims, dtype=torch.bool)
        if self.margin is not None:
            # Candidates nearly as close as the positive are likely unlabelled positives: drop them.
            positive = sims.detach().gather(1, labels[:, None])
            mask |= sims.detach() > positive - self.margin
            mask[torch.arange(len(labels)), labels] = False
        masked = int(mask.sum())
        if batch.valid is not None:
            mask |= ~batch.valid[None, :]  # padded slots: no query may see them (added after counting)
        scale = self.scale
        logits = (sims * scale).masked_fill(mask, torch.finfo(sims.dtype).min)
        term = F.cross_entropy(logits, labels)
        if self.symmetric:
            # document -> query: each positive against every query; other copies of the same query masked.
            back = (d[labels] @ q.T) * scale
            if batch.query_keys is not None and self.mask_false_negatives:
                same = batch.query_keys[:, None] == batch.query_keys[None, :]
                same.fill_diagonal_(False)
                back = back.masked_fill(same.to(back.device), torch.finfo(back.dtype).min)
            term = (term + F.cross_entropy(back, torch.arange(len(labels), device=back.device))) / 2
        return LossOutput(term, float(term.detach()), 0.0, masked, float(scale.detach()), batch.padded)

    @staticmethod
    def _text_mask(batch: ContrastiveBatch) -> torch.Tensor | None:
        """True where a candidate is a positive of the query in disguise (never the label itself)."""
        d_keys, q_keys, labels = batch.document_keys, batch.query_keys, batch.labels
        if d_keys is None:
            return None
        d_keys = d_keys.to(labels.device)
        pos_keys = d_keys[labels]  # [Q]
        if q_keys is not None:
            q_keys = q_keys.to(labels.device)
            # Rows with the same query text share their positives: (same-query) @ (candidate is row r's positive).
            same_query = (q_keys[:, None] == q_keys[None, :]).float()  # [Q, Q]
            is_pos_of = (pos_keys[:, None] == d_keys[None, :]).float()  # [Q, N]
            mask = (same_query @ is_pos_of) > 0
        else:
            mask = pos_keys[:, None] == d_keys[None, :]  # duplicates of the own positive
        mask[torch.arange(len(labels)), labels] = False
        return mask


@register_loss("infonce")
def build_infonce(section, gather: bool) -> InfoNCE:
    return InfoNCE(temperature=section.temperature, learn_temperature=section.learn_temperature,
                   symmetric=section.symmetric, mask_false_negatives=section.mask_false_negatives,
                   margin=section.margin, gather=gather)
