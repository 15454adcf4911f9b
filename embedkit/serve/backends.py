"""What the server runs: a model behind two calls, `token_ids` (cheap, in the request) and `embed_ids` (the batch).

`TorchBackend` wraps an `Encoder` (any model folder or embedded name); `OnnxBackend` wraps an `OnnxEncoder` (an
`embedkit export --format onnx` folder). Both compute exactly what `encode` computes, so the server's vectors equal
the in-process ones.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from embedkit.errors import ModelError


class Backend(Protocol):
    name: str
    dim: int
    max_length: int
    normalize: bool

    def token_ids(self, texts: Sequence[str], kind: str, *, truncate: bool) -> list[list[int]]: ...

    def embed_ids(self, id_lists: Sequence[Sequence[int]]) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


class _EncodeMixin:
    def encode(self, texts: Sequence[str], kind: str = "document", batch_size: int = 32) -> np.ndarray:
        """Length-sorted batched encode through the same two calls the server uses."""
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        ids = self.token_ids(texts, kind, truncate=True)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = self.embed_ids([ids[i] for i in rows])
        return out


class TorchBackend(_EncodeMixin):
    kind = "torch"

    def __init__(self, encoder, *, name: str | None = None) -> None:
        self.encoder = encoder.eval()
        self.name = name or encoder.name
        self.dim = encoder.dim
        self.max_length = encoder.max_length
        self.normalize = bool(encoder.normalize)
        self.folder = Path(encoder.source_path) if encoder.source_path else None

    def token_ids(self, texts: Sequence[str], kind: str, *, truncate: bool = True) -> list[list[int]]:
        from embedkit.models.prompts import apply_prompt

        enc = self.encoder
        kwargs = {"truncation": True, "max_length": enc.max_length} if truncate else {"truncation": False}
        return enc.tokenizer(apply_prompt(list(texts), enc.prompts, kind), padding=False,
                             return_attention_mask=False, return_token_type_ids=False, verbose=False,
                             **kwargs)["input_ids"]

    def embed_ids(self, id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.encoder.forward(self.encoder.collate(id_lists)).cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {**self.encoder.describe(), "backend": "torch", "device": str(self.encoder.device)}


class OnnxBackend(_EncodeMixin):
    kind = "onnx"

    def __init__(self, onnx_encoder, *, name: str | None = None) -> None:
        self.encoder = onnx_encoder
        self.name = name or onnx_encoder.name
        self.dim = onnx_encoder.dim
        self.max_length = onnx_encoder.max_length
        self.normalize = onnx_encoder.normalize
        self.folder = onnx_encoder.folder

    def token_ids(self, texts: Sequence[str], kind: str, *, truncate: bool = True) -> list[list[int]]:
        return self.encoder.token_ids(texts, kind, truncate=truncate)

    def embed_ids(self, id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        return self.encoder.embed_ids(id_lists)

    def describe(self) -> dict[str, Any]:
        return self.encoder.describe()


@dataclass
class ModelSpec:
    """One `--model` argument: `PATH`, an embedded name, or `NAME=PATH` to choose the served name."""

    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        if "=" in text:
            name, _, path = text.partition("=")
            if not name or not path:
                raise ModelError(f"--model {text!r}: expected PATH or NAME=PATH")
            return cls(name, path)
        path = Path(text)
        name = path.name if path.exists() else text
        if path.exists() and name in ("model", "onnx", "hf", ""):  # runs/x/model -> x-model reads better
            name = f"{path.resolve().parent.name}-{name}".strip("-")
        return cls(name, text)


def is_onnx_folder(path: str | Path) -> bool:
    from embedkit.export.onnx import ONNX_CONFIG_NAME

    return (Path(path) / ONNX_CONFIG_NAME).is_file()


def load_backend(spec: ModelSpec, backend: str = "auto", *, threads: int | None = None, device: Any = "cpu"):
    """`auto` -> onnx for an ONNX export folder, torch otherwise. `device` (cpu, cuda:N, a torch.device): where the
    torch backend runs; ONNX uses onnxruntime's CUDA provider there only when the installed onnxruntime has one,
    else the CPU."""
    if backend not in ("auto", "onnx", "torch"):
        raise ModelError(f"unknown backend {backend!r}; choose auto, onnx or torch")
    onnx_folder = Path(spec.path).is_dir() and is_onnx_folder(spec.path)
    if backend == "onnx" or (backend == "auto" and onnx_folder):
        if not onnx_folder:
            raise ModelError("--backend onnx needs an ONNX export folder; make one with "
                             f"`embedkit export --model {spec.path} --format onnx --output DIR`", path=spec.path)
        from embedkit.export.onnx import OnnxEncoder

        return OnnxBackend(OnnxEncoder(spec.path, threads=threads, device=device), name=spec.name)
    if onnx_folder:
        raise ModelError("this is an ONNX export folder: serve it with --backend onnx (or auto)", path=spec.path)
    from embedkit.models import load_model

    if threads:
        import torch

        torch.set_num_threads(int(threads))
    return TorchBackend(load_model(spec.path, device=device), name=spec.name)


def verify_probes(backend, *, atol: float | None = None, allow_mismatch: bool = False, log=None) -> dict | None:
    """Check the model folder's probe_vectors.json (if any) against what this backend computes now.

    Raises ModelError on a mismatch unless `allow_mismatch`, which only prints a loud warning.
    """
    from embedkit.export.probes import check_probes, has_probes

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    folder = getattr(backend, "folder", None)
    if folder is None or not has_probes(folder):
        log(f"[{backend.name}] no probe_vectors.json: serving without a parity check")
        return None
    result = check_probes(lambda texts, kind: backend.encode(texts, kind), folder, atol=atol)
    if result.ok:
        log(f"[{backend.name}] {result.summary()}")
        return result.to_dict()
    if not allow_mismatch:
        raise ModelError(f"refusing to serve {backend.name}: {result.summary()}; the model differs from the one its "
                         "probes were written for (pass --allow-mismatch to serve it anyway)", path=result.path)
    banner = "!" * 100
    log(f"{banner}\nWARNING [{backend.name}]: {result.summary()}\nWARNING: serving anyway because of "
        f"--allow-mismatch: its vectors differ from the model the probes were written for.\n{banner}")
    return result.to_dict()
