"""Load models, verify their probe vectors, build the app, run uvicorn (graceful shutdown on SIGINT/SIGTERM)."""

from __future__ import annotations

import sys
from typing import Any, Sequence

from embedkit.errors import ConfigError, ModelError


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_backends(models: Sequence[str], *, backend: str = "auto", threads: int | None = None,
                  probe_atol: float | None = None, allow_mismatch: bool = False, log=_log,
                  device: Any = "cpu") -> dict[str, Any]:
    """{served name: backend} for `--model` arguments, each checked against its probe vectors. `device`: where
    torch backends run (ONNX: the GPU only with an onnxruntime that has the CUDA provider)."""
    from embedkit.serve.backends import ModelSpec, load_backend, verify_probes

    if not models:
        raise ConfigError("give at least one --model")
    loaded: dict[str, Any] = {}
    for text in models:
        spec = ModelSpec.parse(text)
        if spec.name in loaded:
            raise ConfigError(f"two models would be served as {spec.name!r}: name them with --model NAME=PATH")
        log(f"loading {spec.name} from {spec.path} ({backend} backend) ...")
        instance = load_backend(spec, backend, threads=threads, device=device)
        where = instance.describe().get("device") or ", ".join(instance.describe().get("providers") or [])
        log(f"[{spec.name}] {instance.kind} backend on {where}")
        verify_probes(instance, atol=probe_atol, allow_mismatch=allow_mismatch, log=log)
        loaded[spec.name] = instance
    return loaded


def load_generators(models: Sequence[str], backends: dict[str, Any], *, log=_log,
                    device: Any = "cpu") -> dict[str, Any]:
    """{served name: Generator} for the served model folders that have a generative head (`embedkit llm`)."""
    from embedkit.llm.generate import has_generative_head, load_generator
    from embedkit.serve.backends import ModelSpec

    generators: dict[str, Any] = {}
    for text in models:
        spec = ModelSpec.parse(text)
        backend = backends.get(spec.name)
        folder = getattr(backend, "folder", None)
        if getattr(backend, "kind", None) == "torch" and folder is not None and has_generative_head(folder):
            log(f"[{spec.name}] generative head found: serving /v1/chat/completions too")
            generators[spec.name] = load_generator(folder, name=spec.name, device=str(device))
    return generators


def run_server(
    models: Sequence[str],
    *,
    backend: str = "auto",
    host: str = "127.0.0.1",
    port: int = 8000,
    settings=None,
    threads: int | None = None,
    probe_atol: float | None = None,
    allow_mismatch: bool = False,
    graceful_timeout: float = 30.0,
    log_level: str = "info",
    chat: bool = True,
    device: Any = "cpu",
) -> None:
    import uvicorn

    from embedkit.serve.app import create_app

    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range", field="port")
    backends = load_backends(models, backend=backend, threads=threads, probe_atol=probe_atol,
                             allow_mismatch=allow_mismatch, device=device)
    generators = load_generators(models, backends, device=device) if chat else {}
    app = create_app(backends, settings, generators)
    keys = "API key required" if settings is not None and settings.api_keys else "no API key"
    _log(f"serving {', '.join(backends)} at http://{host}:{port}/v1/embeddings ({keys}; docs at /docs, "
         f"metrics at /metrics)")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout,
                            access_log=False)
    try:
        uvicorn.Server(config).run()
    except OSError as exc:
        raise ModelError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


class BackgroundServer:
    """Run an app with uvicorn in a thread on 127.0.0.1 and a free port (tests, benchmarks, notebooks).

    `with BackgroundServer(app) as server: server.url` ... ; leaving the block shuts it down gracefully
    (in-flight requests finish). `stop()` may also be called early.
    """

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60.0,
                 graceful_timeout: float = 30.0) -> None:
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                     timeout_graceful_shutdown=graceful_timeout, lifespan="on")
        self.server = uvicorn.Server(self.config)
        self.startup_timeout = startup_timeout
        self.thread = None
        self.url = ""

    def start(self) -> "BackgroundServer":
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, name="embedkit-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise ModelError("the server thread exited during start-up")
            if time.monotonic() > deadline:
                raise ModelError(f"the server did not start within {self.startup_timeout:.0f}s")
            time.sleep(0.02)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self, timeout: float = 60.0) -> None:
        if self.thread is None:
            return
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise ModelError(f"the server did not shut down within {timeout:.0f}s")
        self.thread = None

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
