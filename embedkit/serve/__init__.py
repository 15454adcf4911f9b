"""Serve: an OpenAI-compatible embedding server (FastAPI + uvicorn) with dynamic micro-batching, /v1/rerank for
rerankers, and vLLM launching.

Names are imported lazily so that importing the package does not import torch, onnxruntime or fastapi.
"""

from __future__ import annotations

from embedkit._lazy import lazy_exports

_EXPORTS = {
    "create_app": "embedkit.serve.app",
    "ServeSettings": "embedkit.serve.app",
    "MicroBatcher": "embedkit.serve.batcher",
    "load_backends": "embedkit.serve.server",
    "run_server": "embedkit.serve.server",
    "TorchBackend": "embedkit.serve.backends",
    "OnnxBackend": "embedkit.serve.backends",
    "TorchRerankBackend": "embedkit.serve.backends",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
