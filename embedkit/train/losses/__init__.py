"""The one loss factory: `build_loss(recipe.loss)` for every training step that has a contrastive term.

    loss: {type: infonce, temperature: 0.05, ...}          the base loss (losses/infonce.py)
          matryoshka_dims: [384, 128]                       -> wrapped in Matryoshka (losses/matryoshka.py)
          distillation: kl | margin_mse                     -> wrapped in Distillation (losses/distillation.py)

Wrapping order: Matryoshka(Distillation(base)), so distillation is applied at every Matryoshka width.
Adding a loss: one file with a ContrastiveObjective subclass, one entry in BASE_LOSSES (and its name in
`LossSection.type`, embedkit/train/config.py).
"""

from __future__ import annotations

from typing import Any, Callable

from embedkit.train.losses.batch import (ContrastiveBatch, ContrastiveObjective, LossOutput, distributed_world,
                                         gather_batch, gather_with_grad, text_keys)
from embedkit.train.losses.distillation import Distillation
from embedkit.train.losses.infonce import InfoNCE
from embedkit.train.losses.matryoshka import Matryoshka


def _infonce(section: Any, gather: bool) -> ContrastiveObjective:
    return InfoNCE(temperature=section.temperature, learn_temperature=section.learn_temperature,
                   symmetric=section.symmetric, mask_false_negatives=section.mask_false_negatives,
                   margin=section.margin, gather=gather)


BASE_LOSSES: dict[str, Callable[[Any, bool], ContrastiveObjective]] = {"infonce": _infonce}


def build_loss(section: Any, *, gather: bool = True) -> ContrastiveObjective:
    """The loss a recipe's `loss` section describes (embedkit.train.config.LossSection)."""
    if section.type not in BASE_LOSSES:
        raise ValueError(f"unknown loss type {section.type!r}; choose one of {', '.join(BASE_LOSSES)}")
    loss = BASE_LOSSES[section.type](section, gather)
    if section.distillation != "none":
        loss = Distillation(loss, kind=section.distillation, weight=section.distillation_weight,
                            temperature=section.distillation_temperature,
                            contrastive_weight=section.contrastive_weight)
    if section.matryoshka_dims:
        loss = Matryoshka(loss, section.matryoshka_dims)
    return loss


__all__ = ["BASE_LOSSES", "ContrastiveBatch", "ContrastiveObjective", "Distillation", "InfoNCE", "LossOutput",
           "Matryoshka", "build_loss", "distributed_world", "gather_batch", "gather_with_grad", "text_keys"]
