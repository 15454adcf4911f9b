"""Export: trained model -> ONNX graph (fp32 / int8) or merged HF folder, each verified by a parity check.

Names are imported lazily so that importing the package does not import torch or onnxruntime.
"""

from __future__ import annotations

from embedkit._lazy import lazy_exports

_EXPORTS = {
    "export_onnx": "embedkit.export.onnx",
    "OnnxEncoder": "embedkit.export.onnx",
    "ExportError": "embedkit.export.onnx",
    "export_hf": "embedkit.export.hf",
    "write_probes": "embedkit.export.probes",
    "check_probes": "embedkit.export.probes",
    "batch_invariance": "embedkit.export.probes",
    "load_check_set": "embedkit.export.checkset",
    "read_probes": "embedkit.export.probes",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
