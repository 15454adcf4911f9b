"""Export: trained model -> ONNX graph (fp32 / int8), OpenVINO IR (fp32 / int8) or merged HF folder, each verified
by a parity check.

Embedding models: embedkit.export.onnx (OnnxEncoder), .openvino (OpenVinoEncoder) and .hf; rerankers
(cross-encoders): .onnx_rerank (OnnxReranker).

Probe vectors (written at training, checked by every export and server) live in embedkit.models.probes.
Names are imported lazily so that importing the package does not import torch, onnxruntime or openvino.
"""

from __future__ import annotations

from embedkit._lazy import lazy_exports

_EXPORTS = {
    "export_onnx": "embedkit.export.onnx",
    "OnnxEncoder": "embedkit.export.onnx",
    "ExportError": "embedkit.export.onnx",
    "export_onnx_reranker": "embedkit.export.onnx_rerank",
    "OnnxReranker": "embedkit.export.onnx_rerank",
    "export_openvino": "embedkit.export.openvino",
    "OpenVinoEncoder": "embedkit.export.openvino",
    "export_hf": "embedkit.export.hf",
    "load_check_set": "embedkit.export.checkset",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
