"""External engines: build the vLLM command for an exported model, launch it, and check its vectors.

`embedkit serve --engine vllm --model DIR` (DIR from `embedkit export --format hf`):
  1. builds `vllm serve DIR --runner pooling ...` with the model's pooling and normalisation stated explicitly,
  2. launches it (`--dry-run`: only prints it),
  3. waits for its /health, then embeds DIR/probe_vectors.json through its /v1/embeddings (adding embedkit's
     prompts client-side, since vLLM does not know them) and compares with the stored vectors,
  4. on a mismatch stops vLLM and fails (unless --allow-mismatch); else keeps it running in the foreground.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from embedkit.errors import ModelError
from embedkit.export.hf import LAUNCH_JSON, vllm_command
from embedkit.models.probes import check_probes, has_probes

log = logging.getLogger(__name__)

REMOTE_PROBE_ATOL = 1e-3  # a GPU's fp32 kernels differ from the CPU's by more than in-process runs do


def model_settings(folder: str | Path) -> dict[str, Any]:
    """Pooling, normalisation, prompts and max length of a sentence-transformers folder, without loading weights."""
    from embedkit.models.pooling import mode_from_st_config

    root = Path(folder)
    launch = root / LAUNCH_JSON
    if launch.is_file():
        spec = json.loads(launch.read_text())
        return {k: spec[k] for k in ("pooling", "normalize", "max_length", "prompts")}
    modules_path = root / "modules.json"
    if not modules_path.is_file():
        raise ModelError("not a sentence-transformers folder (no modules.json): export it with "
                         "`embedkit export --format hf` first", path=root)
    modules = json.loads(modules_path.read_text())
    settings: dict[str, Any] = {"pooling": "mean", "normalize": False, "max_length": 512, "prompts": {}}
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Pooling":
            config_path = root / module.get("path", "") / "config.json"
            settings["pooling"] = mode_from_st_config(json.loads(config_path.read_text()))
        elif kind == "Normalize":
            settings["normalize"] = True
    sbert = root / "sentence_bert_config.json"
    if sbert.is_file():
        settings["max_length"] = int(json.loads(sbert.read_text()).get("max_seq_length") or 512)
    st_config = root / "config_sentence_transformers.json"
    if st_config.is_file():
        settings["prompts"] = {k: v for k, v in (json.loads(st_config.read_text()).get("prompts") or {}).items() if v}
    return settings


def build_vllm_command(folder: str | Path, *, served_name: str, host: str = "127.0.0.1", port: int = 8000,
                       dtype: str = "float32", vllm_bin: str = "vllm", extra: Sequence[str] = ()) -> list[str]:
    settings = model_settings(folder)
    argv = vllm_command(Path(folder).resolve(), served_name=served_name, pooling=settings["pooling"],
                        normalize=settings["normalize"], max_length=settings["max_length"], host=host, port=port,
                        dtype=dtype, extra=list(extra))
    argv[0] = vllm_bin
    return argv


def remote_vectors_fn(base_url: str, model: str, *, prompts: dict[str, str] | None = None,
                      api_key: str | None = None, timeout: float = 60.0):
    """An embedding function over an OpenAI-compatible /v1/embeddings; embedkit's prompts are added here."""
    url = base_url.rstrip("/") + "/v1/embeddings"
    prompts = prompts or {}

    def embed(texts: Sequence[str], kind: str) -> np.ndarray:
        prefix = prompts.get(kind, "")
        body = json.dumps({"model": model, "input": [prefix + t for t in texts], "encoding_format": "float"})
        request = urllib.request.Request(url, data=body.encode(), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            raise ModelError(f"{url} answered HTTP {exc.code}: {' '.join(detail.split())}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ModelError(f"cannot reach {url}: {exc}") from None
        try:
            rows = sorted(payload["data"], key=lambda row: row["index"])
            return np.asarray([row["embedding"] for row in rows], dtype=np.float32)
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{url} did not answer in the OpenAI embeddings format") from None

    return embed


def check_remote(base_url: str, model: str, folder: str | Path, *, atol: float = REMOTE_PROBE_ATOL,
                 api_key: str | None = None, prompts: dict[str, str] | None = None):
    """Compare a running server's vectors with `folder`/probe_vectors.json. Returns a ProbeCheck."""
    if prompts is None:
        prompts = model_settings(folder)["prompts"]
    return check_probes(remote_vectors_fn(base_url, model, prompts=prompts, api_key=api_key), folder, atol=atol)


def wait_healthy(base_url: str, *, timeout: float, process: subprocess.Popen | None = None,
                 interval: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    url = base_url.rstrip("/") + "/health"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ModelError(f"the engine exited with code {process.returncode} before it became healthy")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(interval)
    raise ModelError(f"{url} was not healthy within {timeout:.0f}s")


def run_vllm(folder: str | Path, *, served_name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
             vllm_bin: str = "vllm", extra: Sequence[str] = (), dry_run: bool = False, startup_timeout: float = 900,
             atol: float = REMOTE_PROBE_ATOL, allow_mismatch: bool = False, api_key: str | None = None,
             foreground: bool = True) -> dict[str, Any]:
    """Launch vLLM for an HF export and verify it; see the module docstring. With `dry_run`, launch nothing: the
    result's "command_line" is the command, for the caller to show (the API key masked)."""
    folder = Path(folder)
    name = served_name or folder.resolve().name
    extra = list(extra) + (["--api-key", api_key] if api_key else [])
    argv = build_vllm_command(folder, served_name=name, host=host, port=port, vllm_bin=vllm_bin, extra=extra)
    shown = shlex.join(argv if not api_key else argv[:-1] + ["<api-key>"])
    if dry_run:
        return {"command": argv, "command_line": shown, "launched": False}
    log.info("launching: %s", shown)
    try:
        process = subprocess.Popen(argv, start_new_session=True)
    except FileNotFoundError:
        raise ModelError(f"{vllm_bin!r} is not installed here: install vLLM in its own environment on a GPU machine "
                         "(pip install vllm) and pass --vllm-bin PATH, or run the command above yourself") from None
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        wait_healthy(base_url, timeout=startup_timeout, process=process)
        result = None
        if has_probes(folder):
            result = check_remote(base_url, name, folder, atol=atol, api_key=api_key)
            log.info(f"vLLM at {base_url}: {result.summary()}")
            if not result.ok and not allow_mismatch:
                raise ModelError(f"vLLM's vectors differ from the model's probe vectors ({result.summary()}); "
                                 "stopped it (pass --allow-mismatch to keep it running)", path=result.path)
        else:
            log.warning("no probe_vectors.json in %s: vLLM runs unchecked (export with `embedkit export --format hf`)",
                        folder)
        if not foreground:
            return {"command": argv, "launched": True, "process": process, "check": result}
        log.info(f"vLLM serving {name} at {base_url}/v1/embeddings; Ctrl-C stops it")
        process.wait()
        return {"command": argv, "launched": True, "returncode": process.returncode, "check": result}
    except BaseException:
        stop_process(process)
        raise


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
