"""The export folders that encode in-process, by format: their config file names, and their registration with
embedkit.models.exported so that `embedkit eval -m EXPORT_DIR` picks the folder's runtime from its manifest.

Imported by embedkit.cli (the wiring) and by the exporters (the names). Light on purpose: `embedkit --help` imports
it, so each runtime is registered by name ("module:class") and imported only when a folder is loaded (the runtime
modules import numpy, and import this one for their config names).
"""

from __future__ import annotations

from embedkit.models.exported import register_export_runtime

ONNX_CONFIG_NAME = "embedkit_onnx.json"
OPENVINO_CONFIG_NAME = "embedkit_openvino.json"

register_export_runtime("onnx", ONNX_CONFIG_NAME, "embedkit.export.onnx:OnnxEncoder")
register_export_runtime("openvino", OPENVINO_CONFIG_NAME, "embedkit.export.openvino:OpenVinoEncoder")
