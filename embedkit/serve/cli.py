"""`embedkit serve`: an OpenAI-compatible embedding (and reranking) server on CPU, or vLLM launched and verified on
a GPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from embedkit.device import DEVICE_HELP, resolve_device
from embedkit.errors import ConfigError
from embedkit.serve.backends import backend_help
from embedkit.serve.engines import REMOTE_PROBE_ATOL, run_vllm
from embedkit.serve.server import run_server, serving_environment


def serve_command(
    model: List[str] = typer.Option([], "--model", "-m",
                                    help="A model to serve: a model folder, an ONNX export folder, 'minilm' or "
                                         "'smollm2-135m'. Repeat to serve several; clients pick one with the "
                                         "request's `model` field. NAME=PATH sets the served name (default: the "
                                         "folder's name)."),
    rerank: List[str] = typer.Option([], "--rerank",
                                     help="A reranker (cross-encoder) folder to serve at POST /v1/rerank, beside or "
                                          "instead of --model: one `embedkit train` wrote with task: rerank, or a "
                                          "sentence-transformers CrossEncoder. Repeatable; NAME=PATH sets the "
                                          "served name (default: the folder's name). PyTorch, on --device; its "
                                          "rerank_probes.json is re-scored at start-up like --model's probes."),
    adapter: List[str] = typer.Option([], "--adapter",
                                      help="NAME=DIR: a LoRA adapter (an `embedkit train` output with adapter.save "
                                           "adapter or both) served as NAME on the torch --model it was trained on; "
                                           "one base in memory, a request picks it with \"model\": NAME. "
                                           "Repeatable. An adapter of another base refuses to start."),
    backend: str = typer.Option("auto", "--backend", help=backend_help()),
    engine: str = typer.Option("embedkit", "--engine",
                               help="'embedkit' (this server) or 'vllm': launch `vllm serve --runner pooling` for an "
                                    "`embedkit export --format hf` folder, then check its /v1/embeddings against the "
                                    "folder's probe vectors."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to bind. 127.0.0.1 = this machine only; 0.0.0.0 exposes it (use --api-key)."),
    port: int = typer.Option(8000, "--port", "-p", help="Port to listen on."),
    api_key: List[str] = typer.Option([], "--api-key",
                                      help="Require 'Authorization: Bearer KEY' on /v1/* (401 otherwise). Repeatable; "
                                           "also read from EMBEDKIT_API_KEY."),
    max_inputs: int = typer.Option(2048, "--max-inputs", min=1,
                                   help="Texts per request, and documents per rerank request (400 above)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens-per-input", min=1,
                                             help="Tokens per text, prompt included (400 above), and per rerank "
                                                  "(query, document) pair. Default and ceiling: the model's max "
                                                  "length."),
    max_chars: Optional[int] = typer.Option(None, "--max-chars-per-input", min=1,
                                            help="Characters per text, checked before tokenising (400 above, or cut "
                                                 "with --truncate). Default: 20 x the token limit."),
    truncate: bool = typer.Option(False, "--truncate/--no-truncate",
                                  help="Cut over-long texts to the limit instead of answering 400 (a request's "
                                       "`truncate` field overrides it). /v1/rerank cuts over-long pairs unless the "
                                       "request says truncate=false."),
    max_body_mb: float = typer.Option(8.0, "--max-body-mb", min=0.001, help="Request body size limit (413 above)."),
    max_batch_tokens: int = typer.Option(16384, "--max-batch-tokens", min=1,
                                         help="Micro-batching token budget: padded tokens per model call, summed "
                                              "over the concurrent requests merged into it."),
    max_batch_size: int = typer.Option(128, "--max-batch-size", min=1, help="Texts per model call."),
    call_seconds: float = typer.Option(0.1, "--call-seconds", min=0.01,
                                       help="Model calls are sized (from the measured speed) to take about this "
                                            "long: a new request waits for at most the call in progress."),
    read_timeout: float = typer.Option(30.0, "--read-timeout", min=0.1,
                                       help="Seconds for a request's headers, and then its body, to arrive (408 "
                                            "and the connection closed after)."),
    max_connections: int = typer.Option(512, "--max-connections", min=1,
                                        help="Open connections; more get 503 (Retry-After) and are closed."),
    graceful_timeout: float = typer.Option(30.0, "--graceful-timeout", min=0.0,
                                           help="SIGTERM/SIGINT: seconds in-flight requests get to finish; work "
                                                "that cannot is answered 503 (Retry-After) before they end."),
    input_type: str = typer.Option("document", "--default-input-type",
                                   help="Prompt used when a request has no `input_type`: 'document' or 'query'."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads per model call (onnxruntime intra-op / OpenVINO INFERENCE_NUM_THREADS / torch). Default: all cores; on a busy machine fewer threads avoid stalls."),
    probe_atol: Optional[float] = typer.Option(None, "--probe-atol",
                                               help="Tolerance of the start-up probe check (default: the one recorded "
                                                    "in probe_vectors.json; 1e-3 for --engine vllm)."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch",
                                        help="Serve even if the model does not reproduce its probe_vectors.json "
                                             "or its weights differ from the fingerprint recorded at training/export "
                                             "(prints a loud warning). Without it the server refuses to start."),
    vllm_bin: str = typer.Option("vllm", "--vllm-bin", help="--engine vllm: the vllm executable (its own venv)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="--engine vllm: print the command, launch nothing."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
    chat: bool = typer.Option(True, "--chat/--no-chat",
                              help="Also serve POST /v1/chat/completions for model folders with a generative head "
                                   "(`embedkit llm sft|dpo|joint` outputs; torch backend). Non-streaming."),
    device: str = typer.Option("auto", "--device",
                               help=f"Where the torch backend (and chat) runs: {DEVICE_HELP} ONNX runs on the CPU "
                                    "unless the installed onnxruntime has the CUDA provider (onnxruntime-gpu); "
                                    "OpenVINO on the CPU."),
) -> None:
    """Serve embeddings over HTTP: OpenAI-compatible POST /v1/embeddings, GET /v1/models, /health, /metrics; and
    POST /v1/rerank (Cohere's / Jina's shape) for the rerankers given with --rerank.

    Concurrent requests are merged into token-budgeted batches (one worker thread per model), so throughput under
    load approaches in-process batched encoding. At start-up each model's probe_vectors.json (if present) is
    re-embedded (a reranker's rerank_probes.json re-scored) and the recorded weights fingerprint compared; a mismatch
    refuses to start. SIGINT/SIGTERM finish in-flight requests (or answer them 503) within --graceful-timeout, then
    exit (0 after SIGTERM).

    Examples:

      embedkit serve --model runs/medquad/onnx --port 8000

      embedkit serve --model base=minilm --model tuned=runs/medquad/onnx --api-key secret

      embedkit serve --model base=minilm --adapter legal=runs/legal-lora --adapter med=runs/med-lora --api-key s

      embedkit serve --engine vllm --model runs/medquad/hf --port 8001   (GPU machine with vLLM)

      embedkit serve --model runs/smollm2-joint   (embeddings and chat completions from one model)

      embedkit serve --model runs/medquad/onnx --rerank runs/medquad-rerank/model   (first and second stage)

    Then: curl -s localhost:8000/v1/embeddings -H 'Content-Type: application/json'
    -d '{"input": ["what causes asthma?"], "input_type": "query"}'
    """
    keys = tuple(api_key) or tuple(k for k in [os.environ.get("EMBEDKIT_API_KEY")] if k)
    if input_type not in ("query", "document"):
        raise ConfigError(f"--default-input-type must be 'query' or 'document', not {input_type!r}")
    if not model and not rerank:
        raise ConfigError("give at least one --model or --rerank")
    if adapter and not model:
        raise ConfigError("--adapter needs the --model it goes on")
    if engine == "vllm":
        if adapter:
            raise ConfigError("--engine vllm: serve --adapter with --engine embedkit")
        if rerank:
            raise ConfigError("--engine vllm serves embeddings only: serve --rerank with --engine embedkit")
        if len(model) != 1:
            raise ConfigError("--engine vllm serves one model per process")
        name, _, path = model[0].partition("=") if "=" in model[0] else (None, "", model[0])
        launched = run_vllm(Path(path), served_name=name, host=host, port=port, vllm_bin=vllm_bin, dry_run=dry_run,
                            atol=probe_atol or REMOTE_PROBE_ATOL, allow_mismatch=allow_mismatch,
                            api_key=keys[0] if keys else None)
        if dry_run:
            typer.echo(launched["command_line"])  # the result of a dry run: the command, for a shell
        return
    if engine != "embedkit":
        raise ConfigError(f"unknown engine {engine!r}; choose 'embedkit' or 'vllm'")
    if dry_run:
        raise ConfigError("--dry-run applies to --engine vllm only")
    serving_environment()  # before anything imports torch
    from embedkit.serve.app import ServeSettings

    target = resolve_device(device)

    settings = ServeSettings(api_keys=keys, max_inputs=max_inputs, max_tokens_per_input=max_tokens,
                             max_chars_per_input=max_chars, truncate=truncate,
                             max_body_bytes=int(max_body_mb * 1024 * 1024), max_batch_tokens=max_batch_tokens,
                             max_batch_size=max_batch_size, call_seconds=call_seconds, read_timeout=read_timeout,
                             max_connections=max_connections, default_input_type=input_type)  # type: ignore[arg-type]
    run_server(model, backend=backend, host=host, port=port, settings=settings, threads=threads,
               probe_atol=probe_atol, allow_mismatch=allow_mismatch, graceful_timeout=graceful_timeout,
               log_level=log_level, chat=chat, device=target, rerank=rerank, adapters=adapter)
