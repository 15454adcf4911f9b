"""Encoders shared by every pipeline stage: loading, pooling, prompts, adapters, the embedded defaults,
and the probe vectors that tie a saved model to what training, export and serving compute.

Names are imported lazily so that `embedkit models` and `--help` do not pay for importing torch.
"""

from __future__ import annotations

from embedkit._lazy import lazy_exports

_EXPORTS = {
    "Encoder": "embedkit.models.encoder",
    "load_model": "embedkit.models.encoder",
    "Reranker": "embedkit.models.reranker",
    "load_reranker": "embedkit.models.reranker",
    "EMBEDDED_MODELS": "embedkit.models.registry",
    "embedkit_home": "embedkit.models.registry",
    "resolve_model_path": "embedkit.models.registry",
    "write_probes": "embedkit.models.probes",
    "check_probes": "embedkit.models.probes",
    "read_probes": "embedkit.models.probes",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
