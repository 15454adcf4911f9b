"""Export folders as encoders: `embedkit eval -m EXPORT_DIR` evaluates an ONNX or OpenVINO export with its own runtime.

Which runtime loads a folder is read from the folder's manifest ("export": {"format": ...}, written by every
export), else from the config file only that format writes. The runtimes live in embedkit.export, a layer above
this one (it uses eval's metrics for its checks), so they register here (`register_export_runtime`, done by
embedkit.export.formats, which embedkit.cli imports) and this layer names none of them.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedkit.errors import ModelError
from embedkit.manifest import MANIFEST_NAME


@dataclass(frozen=True)
class ExportRuntime:
    """One export format that can encode in-process: the config file only its folders hold, and its encoder class
    as "module:class" (`cls(folder, threads=None)`, with `encode(texts, kind, batch_size, normalize)`, `describe()`,
    `fingerprint`), imported when a folder is loaded."""

    fmt: str
    config_file: str
    encoder: str


EXPORT_RUNTIMES: dict[str, ExportRuntime] = {}


def register_export_runtime(fmt: str, config_file: str, encoder: str) -> None:
    EXPORT_RUNTIMES[fmt] = ExportRuntime(fmt, config_file, encoder)


def export_format(folder: str | Path) -> str | None:
    """The registered export format of `folder`, or None (a model folder, an embedded name, a hub id)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    try:
        recorded = (json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8")).get("export") or {}).get("format")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded in EXPORT_RUNTIMES and (folder / EXPORT_RUNTIMES[recorded].config_file).is_file():
        return recorded
    return next((fmt for fmt, runtime in EXPORT_RUNTIMES.items() if (folder / runtime.config_file).is_file()), None)


def load_exported_encoder(folder: str | Path, *, threads: int | None = None) -> Any:
    """The in-process encoder of an export folder (its default variant), by the runtime its format registered."""
    fmt = export_format(folder)
    if fmt is None:
        raise ModelError("not an export folder with an in-process runtime "
                         f"({', '.join(EXPORT_RUNTIMES) or 'none registered'})", path=folder)
    module, _, name = EXPORT_RUNTIMES[fmt].encoder.partition(":")
    return getattr(importlib.import_module(module), name)(folder, threads=threads)
