"""Serve: an OpenAI-compatible embedding server (FastAPI + uvicorn) with dynamic micro-batching, and vLLM launching.

Names are imported lazily so that importing the package does not import torch, onnxruntime or fastapi.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "create_app": "embedkit.serve.app",
    "ServeSettings": "embedkit.serve.app",
    "MicroBatcher": "embedkit.serve.batcher",
    "load_backends": "embedkit.serve.server",
    "run_server": "embedkit.serve.server",
    "TorchBackend": "embedkit.serve.backends",
    "OnnxBackend": "embedkit.serve.backends",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'embedkit.serve' has no attribute {name!r}")
