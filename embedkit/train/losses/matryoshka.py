"""Matryoshka representation learning (Kusupati et al., 2022): the inner loss averaged over nested prefixes.

A model trained this way can be truncated to any listed size (384 -> 128 -> 64 dims) and still retrieve well.
The batch is gathered once at full width; each prefix is a slice of it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from embedkit.train.losses.batch import ContrastiveBatch, ContrastiveObjective, LossOutput


class Matryoshka(ContrastiveObjective):
    def __init__(self, inner: ContrastiveObjective, dims: Sequence[int]) -> None:
        super().__init__()
        if not dims or any(d <= 0 for d in dims):
            raise ValueError("matryoshka dims must be a non-empty list of positive sizes")
        self.inner = inner
        self.dims = sorted(set(int(d) for d in dims), reverse=True)
        self.gather = inner.gather

    @property
    def scale(self) -> torch.Tensor:
        return self.inner.scale

    def describe(self) -> str:
        return f"{self.inner.describe()}, Matryoshka over dims {self.dims}"

    def compute(self, batch: ContrastiveBatch) -> LossOutput:
        outs = [self.inner.compute(batch.prefix(dim)) for dim in self.dims]
        n = len(outs)
        return LossOutput(sum(o.loss for o in outs) / n, sum(o.contrastive for o in outs) / n,
                          sum(o.distillation for o in outs) / n, outs[0].masked, outs[0].scale, outs[0].padded)
