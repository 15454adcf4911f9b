"""Encoders shared by every pipeline stage: loading, pooling, prompts, adapters, the embedded defaults.

Names are imported lazily so that `embedkit models` and `--help` do not pay for importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Encoder": "embedkit.models.encoder",
    "load_model": "embedkit.models.encoder",
    "EMBEDDED_MODELS": "embedkit.models.registry",
    "embedkit_home": "embedkit.models.registry",
    "resolve_model_path": "embedkit.models.registry",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'embedkit.models' has no attribute {name!r}")
