"""Tune stage: find the recipe that suits the user's data, then prove it (issue #18).

    embedkit tune recipes/minilm-scifact.yaml --budget 30m --test beir:../shared/data/scifact:test

Python API (names load lazily):
    tune(recipe_path, budget="30m"|"20", output=..., test=...)  -> TuneResult (recipe, model, trials, report)
    parse_budget(text) -> Budget
    carve_dev_split(recipe, folder, fraction=, max_queries=, dev_docs=, seed=) -> DevSplit
    build_space(recipe, ...) -> list[Param]   (bounds and why: embedkit/tune/space.py)
"""

from __future__ import annotations

from embedkit._lazy import lazy_exports

_EXPORTS = {
    "tune": "embedkit.tune.run",
    "TuneResult": "embedkit.tune.run",
    "Budget": "embedkit.tune.budget",
    "parse_budget": "embedkit.tune.budget",
    "DevSplit": "embedkit.tune.split",
    "carve_dev_split": "embedkit.tune.split",
    "build_space": "embedkit.tune.space",
    "Param": "embedkit.tune.space",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
