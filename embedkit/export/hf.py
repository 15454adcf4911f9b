"""Hugging Face / sentence-transformers export for GPU servers (vLLM, Text Embeddings Inference).

`export_hf(model, out)` merges a LoRA adapter, saves the sentence-transformers layout with the explicit pooling
config (vLLM mis-pools the compact form, vLLM issue 45995), checks the saved folder reloads to the same vectors,
writes probe vectors, and writes the exact launch commands to `launch.txt` and `launch.json`.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.atomic import atomic_dir, write_json, write_text
from embedkit.errors import ModelError
from embedkit.export.onnx import ExportError, refuse_changed_source
from embedkit.manifest import MANIFEST_NAME
from embedkit.models.adapters import merge_adapter
from embedkit.models.probes import DEFAULT_PROBES, check_probes, has_probes, write_probes

log = logging.getLogger(__name__)

LAUNCH_TXT = "launch.txt"
LAUNCH_JSON = "launch.json"
HF_RELOAD_MAX_ABS_DIFF = 1e-5


def _served_pooling(pooling: str, server: str) -> str | None:
    """vLLM's pooling_type / TEI's --pooling value for an embedkit pooling (the registry's `vllm` / `tei`), or
    None when that server cannot pool that way (vLLM has no max pooling)."""
    from embedkit.models.pooling import POOLINGS  # deferred: the registry's modes are torch functions

    spec = POOLINGS.get(pooling)
    return getattr(spec, server) if spec is not None else None


def vllm_command(folder: str | Path, *, served_name: str, pooling: str, normalize: bool, max_length: int,
                 host: str = "0.0.0.0", port: int = 8000, dtype: str = "float32",
                 extra: list[str] | None = None) -> list[str]:
    """`vllm serve` for an embedding model: pooling runner, pooling and normalisation stated explicitly."""
    pooling_type = _served_pooling(pooling, "vllm")
    if pooling_type is None:
        from embedkit.models.pooling import POOLINGS

        served = ", ".join(name for name, spec in POOLINGS.items() if spec.vllm)
        raise ModelError(f"vLLM cannot pool with {pooling!r}; export a model with one of these poolings: {served}")
    pooler = json.dumps({"pooling_type": pooling_type, "normalize": bool(normalize)},
                        separators=(",", ":"))
    return ["vllm", "serve", str(folder), "--runner", "pooling", "--served-model-name", served_name,
            "--pooler-config", pooler, "--max-model-len", str(max_length), "--dtype", dtype,
            "--host", host, "--port", str(port), *(extra or [])]


def tei_command(folder: str | Path, *, served_name: str, pooling: str, port: int = 8080) -> list[str]:
    """Text Embeddings Inference's router (GPU image `ghcr.io/huggingface/text-embeddings-inference`)."""
    tei_pooling = _served_pooling(pooling, "tei")
    if tei_pooling is None:
        raise ModelError(f"TEI cannot pool with {pooling!r}")
    return ["text-embeddings-router", "--model-id", str(folder), "--served-model-name", served_name,
            "--pooling", tei_pooling, "--port", str(port)]


def launch_spec(folder: Path, encoder_info: dict[str, Any], *, served_name: str) -> dict[str, Any]:
    pooling, prompts = encoder_info["pooling"], encoder_info.get("prompts") or {}
    spec: dict[str, Any] = {"model_dir": str(folder), "served_model_name": served_name, "pooling": pooling,
                            "normalize": encoder_info["normalize"], "max_length": encoder_info["max_length"],
                            "prompts": prompts, "commands": {}}
    if _served_pooling(pooling, "vllm"):
        spec["commands"]["vllm"] = vllm_command(folder, served_name=served_name, pooling=pooling,
                                                normalize=encoder_info["normalize"],
                                                max_length=encoder_info["max_length"])
    if _served_pooling(pooling, "tei"):
        spec["commands"]["tei"] = tei_command(folder, served_name=served_name, pooling=pooling)
    spec["commands"]["embedkit"] = ["embedkit", "serve", "--model", str(folder), "--backend", "torch"]
    spec["commands"]["embedkit_vllm_check"] = ["embedkit", "serve", "--engine", "vllm", "--model", str(folder)]
    spec["notes"] = [
        "vLLM and TEI do not add embedkit's prompts: prepend them to the input text yourself"
        + (f" ({json.dumps(prompts)})" if prompts else " (this model has none)"),
        "`embedkit serve --engine vllm` launches vLLM and checks its /v1/embeddings against probe_vectors.json",
    ]
    return spec


def render_launch_txt(spec: dict[str, Any]) -> str:
    lines = [f"# Launch commands for {spec['model_dir']} (pooling {spec['pooling']}, "
             f"normalize {spec['normalize']}, max length {spec['max_length']})"]
    titles = {"vllm": "vLLM (GPU; OpenAI-compatible /v1/embeddings)",
              "tei": "Text Embeddings Inference (GPU or CPU image)",
              "embedkit": "embedkit's own server (CPU)",
              "embedkit_vllm_check": "vLLM launched by embedkit, with the probe-vector parity check"}
    for key, argv in spec["commands"].items():
        lines += ["", f"# {titles.get(key, key)}", shlex.join(argv)]
    lines += [""] + [f"# note: {n}" for n in spec["notes"]]
    return "\n".join(lines) + "\n"


def export_hf(model: str | Path, output: str | Path, *, adapter: str | Path | None = None,
              served_name: str | None = None, allow_probe_mismatch: bool = False) -> dict[str, Any]:
    """Merge, save, verify the reload, write probes and launch files. Returns the launch spec."""
    import torch

    from embedkit.models import load_model

    started = time.time()
    encoder = load_model(model, adapter=adapter)
    if encoder.has_adapter:
        encoder = merge_adapter(encoder)
        log.info("merged the LoRA adapter into the base weights")
    encoder.eval()
    source_probes = None
    if encoder.source_path and has_probes(encoder.source_path) and adapter is None:
        result = check_probes(lambda t, k: encoder.encode(list(t), kind=k), encoder.source_path)
        source_probes = result.to_dict()
        log.info(f"source model: {result.summary()}")
        refuse_changed_source(result.ok, f"probe vectors ({result.summary()})", result.path, allow_probe_mismatch)
    texts = [t for t, _ in DEFAULT_PROBES]
    with torch.inference_mode():
        before = encoder.encode(texts, kind="document")
    output = Path(output)
    name = served_name or output.name
    with atomic_dir(output) as tmp:
        encoder.save(tmp)
        reloaded = load_model(tmp)
        with torch.inference_mode():
            after = reloaded.encode(texts, kind="document")
        diff = float(np.abs(after - before).max())
        log.info(f"reload check: max |diff| {diff:.2e} (bound {HF_RELOAD_MAX_ABS_DIFF:.0e})")
        if not diff < HF_RELOAD_MAX_ABS_DIFF:
            raise ExportError(f"the saved folder reloads to different vectors (max |diff| {diff:.2e}); "
                              "nothing was written", path=output)
        write_probes(reloaded, tmp, created_by="export")
        spec = launch_spec(output.resolve(), reloaded.describe(), served_name=name)
        write_json(tmp / LAUNCH_JSON, spec)
        write_text(tmp / LAUNCH_TXT, render_launch_txt(spec))
        manifest_path = tmp / MANIFEST_NAME
        manifest = json.loads(manifest_path.read_text())
        manifest["model"]["path"] = str(output)
        manifest["export"] = {"format": "hf", "adapter": str(adapter) if adapter else None,
                              "reload_max_abs_diff": diff, "seconds": round(time.time() - started, 1)}
        manifest["source_probes"] = source_probes
        write_json(manifest_path, manifest)
    log.info(f"wrote {output} in {time.time() - started:.1f}s")
    log.info(render_launch_txt(spec).rstrip())
    return spec
