"""Load models, verify them (fingerprint and probe vectors), build the app, run uvicorn.

uvicorn runs with two additions (`uvicorn_server`): its HTTP protocol enforces a read timeout and a connection limit
(`guarded_protocol`), and its shutdown tells the app how long the grace is (`DrainingServer`), so that in-flight work
finishes or is answered 503 before the grace ends; a SIGTERM then exits 0.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Sequence

from embedkit.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


def load_backends(models: Sequence[str], *, backend: str = "auto", threads: int | None = None,
                  probe_atol: float | None = None, allow_mismatch: bool = False, device: Any = "cpu") -> dict[str, Any]:
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
        log.info(f"loading {spec.name} from {spec.path} ({backend} backend) ...")
        instance = load_backend(spec, backend, threads=threads, device=device)
        where = instance.describe().get("device") or ", ".join(instance.describe().get("providers") or [])
        log.info(f"[{spec.name}] {instance.kind} backend on {where}")
        verify_probes(instance, atol=probe_atol, allow_mismatch=allow_mismatch)
        loaded[spec.name] = instance
    return loaded


def load_adapters(adapters: Sequence[str], backends: dict[str, Any], *, probe_atol: float | None = None,
                  allow_mismatch: bool = False, taken: Sequence[str] = ()) -> dict[str, Any]:
    """{base name: AdapterHost} for `--adapter NAME=DIR` arguments: each LoRA adapter loaded onto the served torch
    base it was trained on (the only one, else the one whose fingerprint it records), then checked against its
    probe vectors like a --model folder. An adapter of another base is a one-line ModelError naming both
    fingerprints (the server does not start)."""
    from embedkit.serve.adapters import AdapterFolder, AdapterHost, AdapterSpec, host_for
    from embedkit.serve.backends import TorchBackend, verify_probes

    if not adapters:
        return {}
    candidates = {name: backend for name, backend in backends.items()
                  if type(backend) is TorchBackend and not backend.encoder.has_adapter}
    if not candidates:
        raise ConfigError("--adapter needs a torch --model to load onto (an ONNX or OpenVINO export has its weights "
                          "fixed in its graph: serve the base model folder with --backend torch)")
    hosts = {name: AdapterHost(backend) for name, backend in candidates.items()}
    names: set[str] = set(backends) | set(taken)
    for text in adapters:
        spec = AdapterSpec.parse(text)
        if spec.name in names:
            raise ConfigError(f"two models would be served as {spec.name!r}: name the adapter with --adapter "
                              "NAME=DIR")
        host = host_for(hosts, AdapterFolder.read(spec.path), None)
        log.info(f"loading adapter {spec.name} from {spec.path} onto {host.base.name} ...")
        instance = host.add(spec.name, spec.path)
        verify_probes(instance, atol=probe_atol, allow_mismatch=allow_mismatch)
        names.add(spec.name)
    return hosts


def load_rerankers(rerank: Sequence[str], *, threads: int | None = None, probe_atol: float | None = None,
                   allow_mismatch: bool = False, device: Any = "cpu", taken: Sequence[str] = ()) -> dict[str, Any]:
    """{served name: TorchRerankBackend} for `--rerank` arguments (PATH or NAME=PATH), each checked against the
    probe scores saved with it (a mismatch refuses to start, as for --model). `taken`: the names --model serves
    already (one name is one model, whatever its kind)."""
    from embedkit.serve.backends import ModelSpec, TorchRerankBackend, verify_probes

    loaded: dict[str, Any] = {}
    for text in rerank:
        spec = ModelSpec.parse(text)
        if spec.name in loaded or spec.name in taken:
            raise ConfigError(f"two models would be served as {spec.name!r}: name them with --model NAME=PATH / "
                              "--rerank NAME=PATH")
        log.info(f"loading reranker {spec.name} from {spec.path} ...")
        instance = TorchRerankBackend.load(spec, threads=threads, device=device)
        log.info(f"[{spec.name}] reranker on {instance.describe()['device']}")
        verify_probes(instance, atol=probe_atol, allow_mismatch=allow_mismatch)
        loaded[spec.name] = instance
    return loaded


def load_generators(models: Sequence[str], backends: dict[str, Any], *, device: Any = "cpu") -> dict[str, Any]:
    """{served name: Generator} for the served model folders that have a generative head (`embedkit llm`)."""
    from embedkit.llm.generate import load_generator
    from embedkit.llm.model import has_generative_head
    from embedkit.serve.backends import ModelSpec

    generators: dict[str, Any] = {}
    for text in models:
        spec = ModelSpec.parse(text)
        backend = backends.get(spec.name)
        folder = getattr(backend, "folder", None)
        if getattr(backend, "serves_chat", False) and folder is not None and has_generative_head(folder):
            log.info(f"[{spec.name}] generative head found: serving /v1/chat/completions too")
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
    rerank: Sequence[str] = (),
    adapters: Sequence[str] = (),
) -> None:
    """Serve `models` (embedding models, /v1/embeddings) and `rerank` (rerankers, /v1/rerank): either may be
    empty, not both; `adapters` (NAME=DIR): LoRA adapters on a torch model of `models`."""
    from embedkit.serve.app import create_app

    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range", field="port")
    if not models and not rerank:
        raise ConfigError("give at least one --model or --rerank")
    serving_environment()
    backends = load_backends(models, backend=backend, threads=threads, probe_atol=probe_atol,
                             allow_mismatch=allow_mismatch, device=device) if models else {}
    rerankers = load_rerankers(rerank, threads=threads, probe_atol=probe_atol, allow_mismatch=allow_mismatch,
                               device=device, taken=list(backends))
    hosts = load_adapters(adapters, backends, probe_atol=probe_atol, allow_mismatch=allow_mismatch,
                          taken=list(rerankers))
    generators = load_generators(models, backends, device=device) if chat else {}
    app = create_app(backends, settings, generators, rerankers=rerankers, adapter_hosts=hosts)
    backends = {**backends, **{name: adapter for host in hosts.values() for name, adapter in host.adapters.items()}}
    keys = "API key required" if settings is not None and settings.api_keys else "no API key"
    endpoints = [f"{', '.join(names)} at http://{host}:{port}{path}"
                 for names, path in ((backends, "/v1/embeddings"), (rerankers, "/v1/rerank")) if names]
    log.info(f"serving {'; '.join(endpoints)} ({keys}; docs at /docs, metrics at /metrics)")
    server = uvicorn_server(app, host=host, port=port, log_level=log_level, graceful_timeout=graceful_timeout)
    # uvicorn re-raises the SIGTERM it drained on once it has shut down, which would end the process "killed by
    # SIGTERM" (exit 143); a drained SIGTERM is a clean stop: exit 0.
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        server.run()
    except OSError as exc:
        raise ModelError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def serving_environment() -> None:
    """Thread settings for a server process; call before torch is imported (they are read when it loads).

    A server shares its cores: with the request threads, with a tokenising thread, often with other processes. By
    default OpenMP threads (torch, MKL) spin at every barrier waiting for each other, and on an oversubscribed
    machine a spinning thread steals the core its partner needs: MiniLM on 2 busy cores embedded 36 texts/s in
    batches of 32 with spinning, 154 without (OMP_WAIT_POLICY=PASSIVE), and a 32-d toy model took 300 ms per call
    instead of 0.6 ms. And tokenising runs beside the model: a second thread pool inside the tokenizer would add to
    the oversubscription. Variables already set are kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _exit_cleanly(signum, frame) -> None:
    """Exit 0 at once: every request has been answered and every connection closed. (The interpreter's own teardown
    of torch and the rest takes 1-2 s more on a busy machine, which would run past the grace.)"""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def uvicorn_server(app, *, host: str, port: int, graceful_timeout: float, log_level: str = "info"):
    """A DrainingServer for `app` with the read timeout and connection limit of its ServeSettings (the defaults
    for an app without them, such as `rag web`'s page)."""
    import uvicorn

    from embedkit.serve.app import ServeSettings

    settings = getattr(app.state, "settings", None) or ServeSettings()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=graceful_timeout,
                            http=guarded_protocol(settings.read_timeout, settings.max_connections))
    return _draining_server_class()(config)


@functools.cache
def _draining_server_class():
    """Made on first use, so that importing this module does not import uvicorn."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server whose shutdown first tells the app its grace period (`app.state.begin_shutdown`), so that
        work which could not finish in time is answered 503 by the app instead of being cancelled by uvicorn."""

        async def shutdown(self, sockets=None) -> None:
            begin = getattr(getattr(self.config.app, "state", None), "begin_shutdown", None)
            grace = self.config.timeout_graceful_shutdown  # None: uvicorn waits as long as it takes
            if begin is not None and grace is not None:
                begin(float(grace))
            await super().shutdown(sockets)

    return DrainingServer


def guarded_protocol(read_timeout: float, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with the two limits uvicorn lacks (it waits forever for a slow client's request).

    - Read timeout: a request's headers must arrive within `read_timeout` seconds of its first byte (or of the
      connection opening), else 408 JSON and the connection is closed; the app bounds the body the same way
      (embedkit.serve.app). Idle keep-alive connections close after uvicorn's keep-alive timeout (5 s).
    - Connection limit: a connection beyond `max_connections` open ones gets 503 JSON (Retry-After) for its request
      and is closed.

    The one place that relies on uvicorn's internals (checked against uvicorn 0.54.0, the version the serve extra
    pins). uvicorn offers no public way to do either: `limit_concurrency` counts tasks as well as connections and
    answers in plain text without Retry-After, and nothing bounds the wait for a request's headers. So its HTTP
    protocol class is subclassed (`Config(http=...)` takes one), using attributes that both of its implementations
    (H11Protocol, HttpToolsProtocol) set: `connections` (the server's open connections), `cycle` and
    `cycle.response_complete` (the request in progress), `app`, `loop` and `transport`.
    """
    import orjson
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from embedkit.serve.app import RETRY_AFTER_SECONDS, error_body

    class GuardedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _read_timer: asyncio.TimerHandle | None = None
        _reading_after: Any = None  # the request/response cycle that preceded the request being read

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self.app = _too_many_connections  # answers this connection's request, then it closes
            self._start_reading()

        def data_received(self, data: bytes) -> None:
            if self._read_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._start_reading()  # the first bytes of the next request on a keep-alive connection
            super().data_received(data)
            if self._read_timer is not None and self.cycle is not None and self.cycle is not self._reading_after:
                self._stop_reading()  # headers complete: the app takes over (and bounds the body)

        def connection_lost(self, exc) -> None:
            self._stop_reading()
            super().connection_lost(exc)

        def _start_reading(self) -> None:
            self._reading_after = self.cycle
            self._read_timer = self.loop.call_later(read_timeout, self._read_timed_out)

        def _stop_reading(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if self.transport.is_closing():
                return
            body = orjson.dumps(error_body(f"the request headers did not arrive within {read_timeout:g} s",
                                           code="read_timeout"))
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    async def _too_many_connections(scope, receive, send) -> None:
        body = orjson.dumps(error_body(f"the server has {max_connections} connections open, its limit: retry later",
                                       type="server_error", code="too_many_connections"))
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                                (b"retry-after", str(RETRY_AFTER_SECONDS).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    return GuardedHTTPProtocol


class BackgroundServer:
    """Run an app with uvicorn in a thread on 127.0.0.1 and a free port (tests, benchmarks, notebooks).

    `with BackgroundServer(app) as server: server.url` ... ; leaving the block shuts it down gracefully
    (in-flight requests finish). `stop()` may also be called early.
    """

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60.0,
                 graceful_timeout: float = 30.0) -> None:
        self.server = uvicorn_server(app, host=host, port=port, log_level="warning", graceful_timeout=graceful_timeout)
        self.config = self.server.config
        self.startup_timeout = startup_timeout
        self.thread = None
        self.url = ""

    def start(self) -> "BackgroundServer":
        # The listening socket is made here and handed to uvicorn, so its port is known without reading the server's
        # internals.
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.config.host, self.config.port))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, name="embedkit-server",
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise ModelError("the server thread exited during start-up")
            if time.monotonic() > deadline:
                raise ModelError(f"the server did not start within {self.startup_timeout:.0f}s")
            time.sleep(0.02)
        host, port = listener.getsockname()[:2]
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
