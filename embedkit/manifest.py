"""Reproducibility manifests: what produced a model or a report (inputs, hashes, versions, command line)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from embedkit.device import describe_device

MANIFEST_NAME = "embedkit_manifest.json"

_TRACKED_LIBRARIES = (
    "embedkit",
    "torch",
    "transformers",
    "sentence-transformers",
    "peft",
    "bitsandbytes",
    "faiss-cpu",
    "mteb",
    "numpy",
    "onnxruntime",
    "openvino",
    "nncf",
    "deepspeed",
    "trl",
)

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: Iterable[str | Path], root: str | Path | None = None) -> str:
    """One hash over several files, names included (relative to `root`), in sorted order."""
    h = hashlib.sha256()
    items = sorted(Path(p) for p in paths)
    for p in items:
        name = str(p.relative_to(root)) if root is not None else p.name
        h.update(name.encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def sha256_dir(path: str | Path, patterns: tuple[str, ...] = ("*",)) -> str:
    """Hash of every file under a folder (recursive), excluding manifests and hidden files."""
    root = Path(path)
    files = [
        p
        for pattern in patterns
        for p in root.rglob(pattern)
        if p.is_file() and p.name != MANIFEST_NAME and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sha256_files(sorted(set(files)), root=root)


def sha256_texts(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def command_line() -> list[str]:
    argv = list(sys.argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return argv


def device_fields(device: Any = None) -> dict[str, Any]:
    """{"device": "cuda:0 (NVIDIA H200, 139 GiB)", "processes": N} for a manifest: where the model ran, and over
    how many processes (torch.distributed) it was spread; {"device": None} when unknown (e.g. no torch model)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(device, torch.device):
        return {"device": None}
    fields: dict[str, Any] = {"device": describe_device(device)}
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        fields["processes"] = dist.get_world_size()
    return fields


def base_manifest(kind: str, **fields: Any) -> dict[str, Any]:
    """The fields every manifest carries; callers add their own (model, data, seed, ...)."""
    return {
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command_line": command_line(),
        "library_versions": library_versions(),
        "platform": {"system": platform.system(), "machine": platform.machine()},
        **fields,
    }
