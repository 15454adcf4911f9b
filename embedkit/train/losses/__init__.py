"""The one loss factory: `build_loss(recipe.loss)` for every training step that has a contrastive term.

    loss: {type: infonce, temperature: 0.05, ...}          the base loss (a registered one: losses/infonce.py)
          matryoshka_dims: [384, 128]                       -> wrapped in Matryoshka (losses/matryoshka.py)
          distillation: kl | margin_mse                     -> wrapped in Distillation (losses/distillation.py)

Wrapping order: Matryoshka(Distillation(base)), so distillation is applied at every Matryoshka width.
A reranker's losses (recipe `task: rerank`; losses/rerank.py) come from the same factory: `build_loss(section,
task="rerank")`, the base loss with the same distillation settings added.
Base losses are a registry: `@register_loss("name")` on a builder `(loss section, gather) -> ContrastiveObjective`.
The recipes' `loss.type` accepts exactly the registered names (embedkit/train/config.py asks `loss_names`), so a
new loss is one module here with its class and its registered builder, plus its import line below
(docs/extending.md walks through one).
"""

from __future__ import annotations

from typing import Any

from embedkit.train.losses.batch import (ContrastiveBatch, ContrastiveObjective, LossOutput, distributed_world,
                                         gather_batch, gather_with_grad, text_keys)
from embedkit.train.losses.distillation import Distillation
from embedkit.train.losses.matryoshka import Matryoshka
from embedkit.train.losses.registry import BASE_LOSSES, RERANK_LOSSES, loss_names, register_loss

# Base losses register themselves when their module is imported: one line per loss module.
from embedkit.train.losses.infonce import InfoNCE
from embedkit.train.losses.rerank import RerankObjective, wrap_rerank_distillation


def build_loss(section: Any, *, gather: bool = True, task: str = "embed") -> ContrastiveObjective | RerankObjective:
    """The loss a recipe's `loss` section describes (embedkit.train.config.LossSection), for the recipe's task."""
    if task == "rerank":
        if section.type not in RERANK_LOSSES:
            raise ValueError(f"unknown reranker loss {section.type!r}; choose one of {', '.join(RERANK_LOSSES)}")
        return wrap_rerank_distillation(RERANK_LOSSES[section.type](section, gather), section)
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


__all__ = ["BASE_LOSSES", "RERANK_LOSSES", "RerankObjective", "ContrastiveBatch", "ContrastiveObjective", "Distillation", "InfoNCE", "LossOutput",
           "Matryoshka", "build_loss", "distributed_world", "gather_batch", "gather_with_grad", "loss_names",
           "register_loss", "text_keys"]
