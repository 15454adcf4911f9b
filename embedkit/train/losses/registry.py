"""The registry of base losses: what `loss.type` in a recipe accepts and what `build_loss` builds from it.

Its own module so that a loss module can register itself (`@register_loss`) without importing the package that
imports it.
"""

from __future__ import annotations

from typing import Any, Callable

from embedkit.train.losses.batch import ContrastiveObjective

LossBuilder = Callable[[Any, bool], ContrastiveObjective]  # (the recipe's loss section, gather) -> the loss
BASE_LOSSES: dict[str, LossBuilder] = {}


def register_loss(name: str) -> Callable[[LossBuilder], LossBuilder]:
    """Decorator: `builder(section, gather)` builds base loss `name` from a recipe's loss section (it reads the
    section's fields it uses) with `gather` (score against every process's batch) passed to the loss."""

    def register(builder: LossBuilder) -> LossBuilder:
        if name in BASE_LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        BASE_LOSSES[name] = builder
        return builder

    return register


def loss_names() -> list[str]:
    return list(BASE_LOSSES)
