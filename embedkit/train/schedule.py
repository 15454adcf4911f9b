"""How long a run trains: its epochs and optimizer steps, from the recipe's `training.epochs`, `max_steps` (a cap) and
`min_steps` (a floor). Plain arithmetic, shared by the engine (embedkit/train/engine.py) and `embedkit tune`'s time
estimates (embedkit/tune/search.py), which must agree on a run's length."""

from __future__ import annotations

import math


def epochs_for(steps_per_epoch: int, epochs: int, min_steps: int | None) -> int:
    """`epochs`, raised to the whole passes that give at least `min_steps` optimizer steps. Whole passes, so that
    every example is seen equally often."""
    if not min_steps:
        return epochs
    return max(epochs, math.ceil(min_steps / max(1, steps_per_epoch)))


def count_steps(n_batches: int, accumulation: int, epochs: int, max_steps: int | None,
                min_steps: int | None = None) -> int:
    per_epoch = math.ceil(n_batches / accumulation)
    total = per_epoch * epochs_for(per_epoch, epochs, min_steps)
    return min(total, max_steps) if max_steps else total
