"""The registry of base losses: what `loss.type` in a recipe accepts and what `build_loss` builds from it.

Its own module so that a loss module can register itself (`@register_loss`) without importing the package that
imports it. Two tables, one per recipe task: the embedding losses (`task="embed"`, over embeddings) and the
reranker losses (`task="rerank"`, over a cross-encoder's pair logits: losses/rerank.py).
"""

from __future__ import annotations

from typing import Any, Callable

from embedkit.train.losses.batch import ContrastiveObjective

LossBuilder = Callable[[Any, bool], ContrastiveObjective]  # (the recipe's loss section, gather) -> the loss
BASE_LOSSES: dict[str, LossBuilder] = {}
RERANK_LOSSES: dict[str, LossBuilder] = {}
TASKS = {"embed": BASE_LOSSES, "rerank": RERANK_LOSSES}


def register_loss(name: str, *, task: str = "embed") -> Callable[[LossBuilder], LossBuilder]:
    """Decorator: `builder(section, gather)` builds base loss `name` from a recipe's loss section (it reads the
    section's fields it uses) with `gather` (score against every process's batch) passed to the loss. `task`:
    embed (a bi-encoder's loss) or rerank (a reranker's)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")

    def register(builder: LossBuilder) -> LossBuilder:
        if any(name in table for table in TASKS.values()):
            raise ValueError(f"loss {name!r} is already registered")
        TASKS[task][name] = builder
        return builder

    return register


def loss_names(task: str | None = None) -> list[str]:
    """The registered loss names of `task` (embed | rerank), or of every task."""
    if task is None:
        return [name for table in TASKS.values() for name in table]
    return list(TASKS[task])
