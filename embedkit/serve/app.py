"""The OpenAI-compatible embedding server (FastAPI): /v1/embeddings, /v1/models, /health, /metrics,
/v1/chat/completions for models whose folder has a generative head (`embedkit llm`), and /v1/rerank (Cohere's,
Jina's request shape) for rerankers served with `--rerank`.

Errors follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with 4xx for everything a client
can get wrong (400 bad input, 401 key, 404 model, 408 read timeout, 413 body size, 422 schema) and 503 (with
Retry-After) for work the server's shutdown cut off; any other 5xx means a bug in the server.

A request's texts are checked by characters and tokenised off the event loop (a 7 MB body does not stall other
clients), then embedded by the model's MicroBatcher, which interleaves requests fairly. A rerank request's
(query, document) pairs take the same path through their reranker's own MicroBatcher.

Every served name is one model of one kind, an embedding model or a reranker; a request to the other kind's
endpoint is a 400 naming both kinds (`wrong_model_kind`).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedkit import __version__
from embedkit.errors import EmbedkitError
from embedkit.serve.adapters import AdapterBackend, AdapterFolder, AdapterHost, HostedBaseBackend, host_for
from embedkit.serve.backends import TorchBackend, verify_probes
from embedkit.serve.batcher import BatcherClosed, BatcherLane, MicroBatcher
from embedkit.serve.metrics import ServerMetrics


@dataclass
class ServeSettings:
    """Limits and behaviour of one server; every limit answers with a clear JSON error (4xx; 503 with Retry-After
    beyond the connection limit)."""

    api_keys: tuple[str, ...] = ()
    max_inputs: int = 2048  # texts per request (OpenAI's limit)
    max_tokens_per_input: Optional[int] = None  # None: the model's max_length
    # None: CHARS_PER_TOKEN x the token limit. Checked before tokenising, so a huge text costs nothing.
    max_chars_per_input: Optional[int] = None
    truncate: bool = False  # True: cut long inputs to the limit instead of answering 400 (a request may override)
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_tokens: int = 16384  # padded tokens per model call, at most
    max_batch_size: int = 128  # texts per model call
    max_padding: float = 0.2  # a model call of >= 8 texts takes no text that would make padding exceed this share
    call_seconds: float = 0.1  # model calls are sized to take about this long: what a new request waits for at most
    read_timeout: float = 30.0  # seconds for a request's headers and body to arrive (408 after; slow clients)
    max_connections: int = 512  # open connections; one more is answered 503 and closed
    default_input_type: Literal["query", "document"] = "document"
    max_completion_tokens: int = 1024  # ceiling of a chat request's max_tokens
    extra_info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- schemas
class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "examples": [{"model": "minilm", "input": ["what causes asthma?"], "input_type": "query"}]})

    input: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="A text or a list of texts. Token arrays are refused (400): send text.")
    model: Optional[str] = Field(None, description="A served model id (GET /v1/models); optional when one is served.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="'float' (JSON numbers) or 'base64' (little-endian float32 bytes).")
    dimensions: Optional[int] = Field(None, ge=1, description="Keep the first N dimensions (re-normalised when the "
                                                               "model normalises).")
    input_type: Optional[Literal["query", "document"]] = Field(
        None, description="embedkit extension: 'query' or 'document' picks the model's prompt. Default: document.")
    truncate: Optional[bool] = Field(
        None, description="Extension (TEI's name): true cuts inputs over the token limit to it (usage counts the "
                          "tokens embedded), false answers 400 input_too_long. Default: the server's --truncate.")
    user: Optional[str] = Field(None, description="Ignored; accepted for OpenAI compatibility.")


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "examples": [{"messages": [{"role": "user", "content": "What causes asthma?"}], "max_tokens": 64}]})

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation; text content only.")
    model: Optional[str] = Field(None, description="A served model with a generative head (GET /v1/models).")
    max_tokens: Optional[int] = Field(None, ge=1, description="Answer length limit in tokens (default 256).")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="Same as max_tokens (newer name).")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 (default) = greedy, reproducible.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, description="Only 1 is supported.")
    stream: bool = Field(False, description="Streaming is not supported (400).")
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    user: Optional[str] = None


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "examples": [{"model": "reranker", "query": "what causes asthma?", "top_n": 2,
                      "documents": ["Asthma is caused by inflamed airways.", "The court ruled the contract void."]}]})

    query: str = Field(description="The query every document is scored against.")
    documents: list[Union[str, RerankDocument]] = Field(
        description="The documents to score: strings, or objects with a 'text' field (Cohere's and Jina's shapes).")
    model: Optional[str] = Field(None, description="A served reranker (GET /v1/models, kind 'reranker'); optional "
                                                   "when one is served.")
    top_n: Optional[int] = Field(None, ge=1, description="Return the best N results only (default: all).")
    return_documents: bool = Field(False, description="Add each result's document text (default false, as in "
                                                      "Cohere's v2 API and TEI; Jina's default is true).")
    truncate: bool = Field(True, description="true (default) cuts a (query, document) pair over the token limit, "
                                             "longest side first; false answers 413 pair_too_long.")


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"name": "legal", "path": "runs/legal-lora"}]})

    name: str = Field(min_length=1, description="The served name requests pick the adapter by ('model').")
    path: str = Field(min_length=1, description="An adapter folder on the server: an `embedkit train` output with "
                                                "adapter.save adapter or both, or a PEFT adapter folder.")
    base: Optional[str] = Field(None, description="The served base to load it on (default: the only torch base, "
                                                  "else the one whose fingerprint the adapter records).")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


_ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "Invalid input (token arrays, too many inputs, input too long, text that is not Unicode, bad dimensions, "
         "model missing, a model of the other kind).",
    401: "Missing or wrong API key.",
    403: "Adapters are added and removed only on a server started with an API key.",
    404: "Unknown model.",
    409: "The name is served already.",
    408: "The request's headers and body did not arrive within the read timeout.",
    413: "Request body too large; /v1/rerank with truncate=false: a (query, document) pair over the token limit.",
    422: "The body does not match the schema.",
    503: "The server is shutting down, or has too many connections (see Retry-After).",
}.items()}

CHARS_PER_TOKEN = 20  # the default character limit per input: far above any real text's characters per token
INLINE_TOKENIZE_CHARS = 4096  # requests up to this many characters are tokenised on the event loop (< 1 ms)
TOKENIZE_THREADS = 2  # bigger requests are tokenised by this many threads, at a lower CPU priority
RETRY_AFTER_SECONDS = 5  # what a 503 (shutting down, too many connections) tells the client to wait
SHUTDOWN_MARGIN_SECONDS = 2.0  # waiting work gets its 503 this long before the grace ends (the call in progress ends)


class APIError(StarletteHTTPException):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.param, self.code, self.type = param, code, type


def _error_json(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type=type, param=param, code=code), status_code=status, headers=headers)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object, one line. Text a client sent (a model name, a JSON key) may hold lone UTF-16
    surrogates, which UTF-8 cannot encode: they are written as escapes (\\ud800) so that the error can be sent."""
    def printable(text: str) -> str:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")

    message = printable(" ".join(str(message).split()))
    return {"error": {"message": message, "type": type, "param": printable(param) if param else param, "code": code}}


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down: retry (another replica, or this one once it is back)",
                    type="server_error", code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


# ---------------------------------------------------------------------------------------------------------- middleware
_ROUTES = {"/v1/embeddings", "/v1/adapters", "/v1/chat/completions", "/v1/rerank", "/rerank", "/v1/models", "/health", "/metrics",
           "/openapi.json", "/docs", "/redoc", "/embeddings"}


class _BodyLimitMiddleware:
    """413 for bodies over the limit: by Content-Length up front, or while streaming (chunked). 408 for a body that
    has not fully arrived `read_timeout` seconds after its headers (a slow or stalled client holds no slot for long;
    the headers have the same bound, in embedkit.serve.server)."""

    def __init__(self, app, limit: int, read_timeout: float) -> None:
        self.app, self.limit, self.read_timeout = app, limit, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            response = _error_json(413, f"request body of {int(length)} bytes is over the limit of {self.limit}",
                                   code="body_too_large", headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0
        limit, timeout = self.limit, self.read_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        body_read = False

        async def limited_receive():
            nonlocal seen, body_read
            if body_read:  # what can still come is the client disconnecting: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="read_timeout",
                               headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise APIError(413, f"request body is over the limit of {limit} bytes", code="body_too_large",
                                   headers={"Connection": "close"})
                body_read = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


class _MetricsMiddleware:
    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in _ROUTES else "other"
        status = {"code": 500}

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        began = time.perf_counter()
        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, tracking_send)
        finally:
            self.metrics.inflight.dec()
            self.metrics.latency.labels(route).observe(time.perf_counter() - began)
            self.metrics.requests.labels(route, str(status["code"])).inc()


class _CancelledMiddleware:
    """A request still running when the server's shutdown grace ends is cancelled by uvicorn: answer it 503 JSON
    with Retry-After (uvicorn would send a text/plain 500), and end it there."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if started:
                raise
            error = shutting_down()
            await _error_json(error.status_code, error.detail, type=error.type, code=error.code,
                              headers=error.headers)(scope, receive, send)


# ---------------------------------------------------------------------------------------------------------- app
@dataclass
class _Served:
    name: str
    backend: Any
    batcher: MicroBatcher | BatcherLane
    created: int
    removed: bool = False  # an adapter taken down at run time (DELETE /v1/adapters/{name})


def create_app(backends: dict[str, Any], settings: ServeSettings | None = None,
               generators: dict[str, Any] | None = None, *, rerankers: dict[str, Any] | None = None,
               adapter_hosts: dict[str, Any] | None = None) -> FastAPI:
    """An app serving `backends` ({served name: embedding backend}) and `rerankers` ({served name:
    TorchRerankBackend}, for /v1/rerank); models are chosen by the request's `model` field. Either may be empty,
    not both; a name serves one model.

    `generators` ({served name: embedkit.llm.generate.Generator}) adds /v1/chat/completions for those models.
    `adapter_hosts` ({base name: embedkit.serve.adapters.AdapterHost}, made by `load_adapters`): LoRA adapters
    loaded on served torch bases, each served under its own name. Every plain torch base gets a host, so that
    adapters can be added at run time (POST /v1/adapters, on a server with an API key).
    """
    generators = dict(generators or {})
    hosts = dict(adapter_hosts or {})
    for name, backend in backends.items():
        if name not in hosts and type(backend) is TorchBackend and not backend.encoder.has_adapter:
            hosts[name] = AdapterHost(backend)
    backends = dict(backends)
    for name, host in hosts.items():
        backends[name] = HostedBaseBackend(host)  # the base's calls run with no adapter active, under its lock
        for adapter_name, adapter in host.adapters.items():
            if adapter_name in backends:
                raise ValueError(f"adapter {adapter_name!r} has the name of a served model")
            backends[adapter_name] = adapter
    rerankers = dict(rerankers or {})
    unknown = set(generators) - set(backends)
    if unknown:
        raise ValueError(f"generators without an embedding backend: {sorted(unknown)}")
    both = sorted(set(backends) & set(rerankers))
    if both:
        raise ValueError(f"served both as an embedding model and as a reranker: {both}")
    settings = settings or ServeSettings()
    if not backends and not rerankers:
        raise ValueError("at least one model must be served")
    metrics = ServerMetrics()
    created = int(time.time())

    def batcher(name: str, compute) -> MicroBatcher:
        return MicroBatcher(compute, name=name, max_batch_tokens=settings.max_batch_tokens,
                            max_batch_size=settings.max_batch_size, max_padding=settings.max_padding,
                            call_seconds=settings.call_seconds, on_batch=metrics.batch_observer(name))

    # A base and its LoRA adapters are one model: one batcher, whose calls mix their rows (BatcherLane).
    host_batchers = {name: batcher(name, host.embed_rows) for name, host in hosts.items()}

    def batcher_of(name: str, backend: Any) -> MicroBatcher | BatcherLane:
        host = getattr(backend, "host", None)
        if host is None:
            return batcher(name, backend.embed_ids)
        base = next(base for base, candidate in hosts.items() if candidate is host)
        return BatcherLane(host_batchers[base], name if isinstance(backend, AdapterBackend) else None)

    served = {name: _Served(name, backend, batcher_of(name, backend), created) for name, backend in backends.items()}
    reranking = {name: _Served(name, backend, batcher(name, _score_column(backend)), created)
                 for name, backend in rerankers.items()}

    def everything() -> dict[str, _Served]:  # adapters come and go at run time
        return {**served, **reranking}
    shutdown_deadline = asyncio.Event()  # set when waiting work must give up (shortly before the grace ends)
    tokenizing = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="tokenize", initializer=_yield_cpu)

    def begin_shutdown(grace_seconds: float) -> None:
        """The server has stopped accepting and gives in-flight requests `grace_seconds` (call on the event loop).

        Work still waiting SHUTDOWN_MARGIN_SECONDS before the grace ends is answered 503 with Retry-After; the model
        call in progress finishes within the margin, so nothing is cut off and the process exits within the grace.
        """
        margin = min(SHUTDOWN_MARGIN_SECONDS, grace_seconds / 2)
        for entry in everything().values():
            entry.batcher.expire_in(grace_seconds - margin)
        asyncio.get_running_loop().call_later(max(0.0, grace_seconds - margin), shutdown_deadline.set)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for entry in everything().values():
            await entry.batcher.start()
        try:
            yield
        finally:  # uvicorn has finished the in-flight requests by now; drain whatever is still queued
            for entry in everything().values():
                await entry.batcher.stop()
            tokenizing.shutdown(wait=False)

    app = FastAPI(
        title="embedkit embedding server",
        version=_version(),
        description="OpenAI-compatible embeddings (`POST /v1/embeddings`) with dynamic micro-batching. "
                    "Extension: `input_type` = query | document selects the model's prompt. Rerankers served with "
                    "`--rerank` answer `POST /v1/rerank` (Cohere's and Jina's request shape).",
        lifespan=lifespan,
    )
    app.state.served = served
    app.state.adapter_hosts = hosts
    app.state.rerankers = reranking
    app.state.begin_shutdown = begin_shutdown
    app.state.generators = generators
    app.state.settings = settings
    app.state.metrics = metrics
    bearer = HTTPBearer(auto_error=False, description="Required when the server was started with --api-key.")

    async def check_key(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if not settings.api_keys:
            return
        given = credentials.credentials if credentials is not None else ""
        if not any(hmac.compare_digest(given.encode(), key.encode()) for key in settings.api_keys):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    # ---- error handlers: every error is one JSON line in OpenAI's shape
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc, APIError):
            return _error_json(exc.status_code, exc.detail, type=exc.type, param=exc.param, code=exc.code,
                               headers=exc.headers)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_json(exc.status_code, str(exc.detail), type=kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        return _error_json(422, f"{where}: {first.get('msg', 'invalid')}{more}", param=where, code="invalid_body")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: still JSON, still one line
        return _error_json(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    # ---- routes
    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERRORS, dependencies=[Depends(check_key)],
              summary="Create embeddings (OpenAI-compatible)")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        entry = _pick_model(served, body.model, "embedding", reranking)
        texts = _texts(body.input, settings.max_inputs)
        backend = entry.backend
        if body.dimensions is not None and body.dimensions > backend.dim:
            raise APIError(400, f"dimensions={body.dimensions} is more than {entry.name}'s {backend.dim}",
                           param="dimensions", code="invalid_dimensions")
        kind = body.input_type or settings.default_input_type
        truncate = settings.truncate if body.truncate is None else body.truncate
        token_limit = min(settings.max_tokens_per_input or backend.max_length, backend.max_length)
        char_limit = settings.max_chars_per_input or CHARS_PER_TOKEN * token_limit
        args = (entry.name, backend, texts, kind, token_limit, char_limit, truncate)
        if sum(len(text) for text in texts) <= INLINE_TOKENIZE_CHARS:
            ids = _checked_token_ids(*args)
        else:  # a big request is tokenised in a thread: the event loop keeps answering everyone else
            ids = await asyncio.get_running_loop().run_in_executor(tokenizing, functools.partial(_checked_token_ids,
                                                                                                 *args))
        metrics.queue_depth.labels(entry.name).set(entry.batcher.queue_depth)
        try:
            vectors = await _batched_while_connected(entry.batcher, ids, request)
        except APIError as exc:  # picked just before its adapter was removed: the name is gone, not the server
            if not (entry.removed and exc.code == "shutting_down"):
                raise
            _pick_model(served, body.model, "embedding", reranking)  # the 404 that lists what is served now
            raise

        if body.dimensions is not None and body.dimensions < backend.dim:
            vectors = vectors[:, : body.dimensions]
            if backend.normalize:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        n_tokens = sum(len(x) for x in ids)
        metrics.inputs.labels(entry.name).inc(len(texts))
        metrics.tokens.labels(entry.name).inc(n_tokens)
        if body.encoding_format == "base64":
            as_le = np.ascontiguousarray(vectors, dtype="<f4")
            data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(row.tobytes()).decode()}
                    for i, row in enumerate(as_le)]
        else:  # orjson writes float32 rows as shortest round-trip float32 text: ~5x faster, half the bytes of json
            data = [{"object": "embedding", "index": i, "embedding": row}
                    for i, row in enumerate(np.ascontiguousarray(vectors, dtype=np.float32))]
        payload = {"object": "list", "data": data, "model": entry.name,
                   "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
        return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    @app.post("/v1/chat/completions", responses=_ERRORS, dependencies=[Depends(check_key)],
              summary="Create a chat completion (OpenAI-compatible, non-streaming)")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        entry = _pick_model(served, body.model, "embedding", reranking)
        generator = generators.get(entry.name)
        if generator is None:
            raise APIError(400, f"model {entry.name!r} has no generative head (it serves embeddings only); train one "
                                "with `embedkit llm sft|joint`", param="model", code="model_not_generative")
        if body.stream:
            raise APIError(400, "stream=true is not supported by this server: send stream=false", param="stream",
                           code="stream_unsupported")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n", code="invalid_n")
        limit = body.max_completion_tokens or body.max_tokens or 256
        if limit > settings.max_completion_tokens:
            raise APIError(400, f"max_tokens={limit} is over this server's limit of {settings.max_completion_tokens}",
                           param="max_tokens", code="max_tokens_too_large")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        _check_unicode([m["content"] for m in messages], "messages")
        _check_unicode(stop, "stop")
        # Generation blocks for seconds: it runs in a thread, keeping the event loop (and the embedding batcher)
        # responsive. A daemon thread: a generation the shutdown gives up on must not hold the process open.
        generation = _in_daemon_thread(generator.chat, messages, max_new_tokens=limit, temperature=body.temperature,
                                       top_p=body.top_p, stop=stop, seed=body.seed)
        deadline = asyncio.ensure_future(shutdown_deadline.wait())
        try:
            await asyncio.wait({generation, deadline}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            deadline.cancel()
        if not generation.done():
            raise shutting_down()
        try:
            result = generation.result()
        except EmbedkitError as exc:
            raise APIError(400, exc.message, param="messages", code="invalid_messages") from None
        payload = {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": entry.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
        }
        return Response(orjson.dumps(payload), media_type="application/json")

    @app.post("/rerank", responses=_ERRORS, dependencies=[Depends(check_key)], include_in_schema=False)
    @app.post("/v1/rerank", responses=_ERRORS, dependencies=[Depends(check_key)],
              summary="Score documents against a query with a reranker (Cohere / Jina shape)")
    async def rerank(body: RerankRequest, request: Request) -> Response:
        """Every document scored against the query by a cross-encoder, best first.

        Request (Cohere's v2 and Jina's shape): `query`; `documents` (strings or {"text": ...} objects, at most the
        server's --max-inputs); `model` (optional when one reranker is served); `top_n` (>= 1, default all);
        `return_documents` (default **false**, as in Cohere's v2 API and TEI, so that a response does not repeat
        what the client sent; Jina defaults to true); `truncate` (default true: a pair over the token limit is cut
        longest side first, so the query is kept whole while it is the shorter side; false: 413 pair_too_long).

        Response: {"id", "model", "results": [{"index", "relevance_score", "document": {"text"} only with
        return_documents}], "usage": {"total_tokens"}}. `relevance_score` is the sigmoid of the reranker's logit,
        the number `Reranker.score` gives for the pair; results are sorted by it (ties: the earlier document first)
        and cut to `top_n`. `/rerank` is the same endpoint (TEI's path; its request shape is not this one).
        """
        entry = _pick_model(reranking, body.model, "reranker", served)
        documents = _document_texts(body.documents, settings.max_inputs)
        backend = entry.backend
        token_limit = min(settings.max_tokens_per_input or backend.max_length, backend.max_length)
        char_limit = settings.max_chars_per_input or CHARS_PER_TOKEN * token_limit
        args = (entry.name, backend, body.query, documents, token_limit, char_limit, body.truncate)
        if len(body.query) * len(documents) + sum(len(text) for text in documents) <= INLINE_TOKENIZE_CHARS:
            pairs = _checked_pair_ids(*args)
        else:  # as for embeddings: a big request is tokenised in a thread, the event loop keeps answering
            pairs = await asyncio.get_running_loop().run_in_executor(tokenizing, functools.partial(_checked_pair_ids,
                                                                                                   *args))
        metrics.queue_depth.labels(entry.name).set(entry.batcher.queue_depth)
        scores = (await _batched_while_connected(entry.batcher, pairs, request))[:, 0]
        order = sorted(range(len(documents)), key=lambda i: (-float(scores[i]), i))[: body.top_n]
        results = [{"index": i, "relevance_score": float(scores[i]),
                    **({"document": {"text": documents[i]}} if body.return_documents else {})} for i in order]
        n_tokens = sum(len(pair) for pair in pairs)
        metrics.rerank_requests.labels(entry.name).inc()
        metrics.rerank_pairs.labels(entry.name).inc(len(pairs))
        metrics.rerank_tokens.labels(entry.name).inc(n_tokens)
        payload = {"id": f"rerank-{uuid.uuid4().hex}", "model": entry.name, "results": results,
                   "usage": {"total_tokens": n_tokens}}
        return Response(orjson.dumps(payload), media_type="application/json")

    @app.get("/v1/models", dependencies=[Depends(check_key)], responses={401: _ERRORS[401]},
             summary="List the served models")
    async def models() -> dict[str, Any]:
        """Every served model with its `kind`: "embedding" (/v1/embeddings) or "reranker" (/v1/rerank)."""
        return {"object": "list", "data": [{**_model_card(entry), "chat": name in generators}
                                           for name, entry in served.items()]
                + [_reranker_card(entry) for entry in reranking.values()]}

    def require_adapter_admin() -> None:
        """Adding or removing adapters changes what every client gets: only on a server that checks keys (the key
        itself is checked by check_key, 401)."""
        if not settings.api_keys:
            raise APIError(403, "adapters are added and removed at run time only on a server started with --api-key",
                           type="permission_error", code="adapters_need_api_key")

    @app.post("/v1/adapters", dependencies=[Depends(check_key)], responses=_ERRORS,
              summary="Load a LoRA adapter onto a served base (needs --api-key)")
    async def add_adapter(body: AdapterRequest) -> dict[str, Any]:
        """Load an adapter folder onto its served base and serve it as `name`: its base fingerprint must be the
        base's (400 naming both otherwise) and its probe vectors must reproduce, as at start-up."""
        require_adapter_admin()
        _check_unicode([body.name, body.path], "name")
        if body.name in everything():
            raise APIError(409, f"{body.name!r} is served already: remove it first (DELETE /v1/adapters/"
                                f"{body.name}) or pick another name", param="name", code="model_exists")

        def load():
            folder = AdapterFolder.read(body.path)
            host = host_for(hosts, folder, body.base)
            backend = host.add(body.name, body.path)
            try:
                verify_probes(backend)
            except BaseException:
                host.remove(body.name)
                raise
            return backend

        try:
            backend = await asyncio.get_running_loop().run_in_executor(None, load)
        except EmbedkitError as exc:
            raise APIError(400, exc.one_line(), param="path", code="invalid_adapter") from None
        if body.name in everything():  # another request took the name while this one loaded
            await asyncio.get_running_loop().run_in_executor(None, backend.host.remove, body.name)
            raise APIError(409, f"{body.name!r} is served already", param="name", code="model_exists")
        entry = _Served(body.name, backend, batcher_of(body.name, backend), int(time.time()))
        await entry.batcher.start()
        served[body.name] = entry
        return _model_card(entry)

    @app.delete("/v1/adapters/{name}", dependencies=[Depends(check_key)], responses=_ERRORS,
                summary="Stop serving a LoRA adapter and free its weights (needs --api-key)")
    async def remove_adapter(name: str) -> dict[str, Any]:
        """Requests already queued for the adapter are answered first; new ones get 404."""
        require_adapter_admin()
        adapters = [n for n, entry in served.items() if getattr(entry.backend, "adapter", None) is not None]
        if name not in adapters:
            raise APIError(404, f"no adapter {name!r} is served here; adapters: {', '.join(adapters) or 'none'}",
                           param="name", code="model_not_found", type="not_found_error")
        entry = served.pop(name)
        entry.removed = True
        await entry.batcher.stop()
        await asyncio.get_running_loop().run_in_executor(None, entry.backend.host.remove, name)
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/health", summary="Liveness: 200 when the server can embed and rerank")
    async def health() -> dict[str, Any]:
        current = everything()
        return {"status": "ok", "models": list(current),
                "queue_depth": {name: entry.batcher.queue_depth for name, entry in current.items()}}

    @app.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response)
    async def prometheus() -> Response:
        for name, entry in everything().items():
            metrics.queue_depth.labels(name).set(entry.batcher.queue_depth)
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    # Added innermost first: metrics see every response, 413s and shutdown 503s included.
    app.add_middleware(_BodyLimitMiddleware, limit=settings.max_body_bytes, read_timeout=settings.read_timeout)
    app.add_middleware(_CancelledMiddleware)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    return app


def _model_card(entry: _Served) -> dict[str, Any]:
    info = entry.backend.describe()
    card = {"id": entry.name, "object": "model", "created": entry.created, "owned_by": "embedkit",
            "kind": "embedding", "dim": entry.backend.dim, "max_length": entry.backend.max_length,
            "backend": getattr(entry.backend, "kind", info.get("backend")), "pooling": info.get("pooling"),
            "normalize": entry.backend.normalize, "prompts": info.get("prompts") or {}}
    if info.get("parent"):  # a LoRA adapter: vLLM's card names the base the same way
        card.update(parent=info["parent"], root=info.get("path"), adapter=True)
    return card


def _reranker_card(entry: _Served) -> dict[str, Any]:
    info = entry.backend.describe()
    return {"id": entry.name, "object": "model", "created": entry.created, "owned_by": "embedkit",
            "kind": "reranker", "max_length": entry.backend.max_length, "backend": entry.backend.kind,
            "activation": info.get("activation"), "chat": False}


# A served model's kind: (what one is called in errors, what several are called, the endpoint that takes it).
MODEL_KINDS = {"embedding": ("an embedding model", "embedding models", "/v1/embeddings"),
               "reranker": ("a reranker (cross-encoder)", "rerankers", "/v1/rerank")}


def _pick_model(served: dict[str, _Served], name: Optional[str], kind: str,
                other_kind: dict[str, _Served]) -> _Served:
    """The model of `kind` a request names (`served`: the models of that kind; `other_kind`: the rest, for the
    400 that says a name, or every served model, is of the other kind)."""
    one, _, endpoint = MODEL_KINDS[kind]
    other_one, others, other_endpoint = next(v for k, v in MODEL_KINDS.items() if k != kind)
    if name and name in other_kind:
        raise APIError(400, f"model {name!r} is {other_one}, not {one}: send its requests to {other_endpoint}",
                       param="model", code="wrong_model_kind")
    if not name and not served:
        raise APIError(400, f"{endpoint} takes {one}, and none is served here; the {others} served here "
                            f"({', '.join(other_kind)}) answer {other_endpoint}", param="model",
                       code="wrong_model_kind")
    if name is None or name == "":
        if len(served) == 1:
            return next(iter(served.values()))
        raise APIError(400, f"several models are served ({', '.join(served)}): say which in 'model'",
                       param="model", code="model_required")
    if name not in served:
        raise APIError(404, f"model {name!r} is not served here; served: {', '.join({**served, **other_kind})}",
                       param="model", code="model_not_found", type="not_found_error")
    return served[name]


def _score_column(backend: Any):
    """The batcher's model call for a reranker: its scores as a column (the batcher fills rows of vectors)."""
    def score(pairs):
        return backend.score_ids(pairs)[:, None]

    return score


def _texts(value: Any, max_inputs: int) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise APIError(400, "input is empty: send a string or a non-empty list of strings", param="input",
                       code="empty_input")
    if not all(isinstance(x, str) for x in value):
        raise APIError(400, "token arrays are not supported: send text (a string or a list of strings)",
                       param="input", code="token_input_unsupported")
    if len(value) > max_inputs:
        raise APIError(400, f"{len(value)} inputs in one request; the limit is {max_inputs}: split the request",
                       param="input", code="too_many_inputs")
    return list(value)


def _checked_token_ids(name: str, backend: Any, texts: list[str], kind: str, token_limit: int, char_limit: int,
                       truncate: bool) -> list[list[int]]:
    """Token ids of a request's texts, or the 400 that explains why there are none. Runs on any thread.

    Characters are checked first: a text over `char_limit` would be over the token limit anyway (in practice), so it
    is refused (or, with `truncate`, cut to `char_limit`) without spending time tokenising it.
    """
    _check_unicode(texts, "input")
    too_long = [i for i, text in enumerate(texts) if len(text) > char_limit]
    if too_long and not truncate:
        i = too_long[0]
        raise APIError(400, f"input[{i}] has {len(texts[i])} characters; {name} takes at most {token_limit} tokens "
                            f"(and {char_limit} characters) per input ({len(too_long)} inputs too long): shorten or "
                            "split it, or send truncate=true", param="input", code="input_too_long")
    if truncate:
        return _truncated_token_ids(backend, texts, kind, token_limit, char_limit)
    ids = backend.token_ids(texts, kind, max_length=None)
    too_long = [i for i, x in enumerate(ids) if len(x) > token_limit]
    if too_long:
        i = too_long[0]
        raise APIError(400, f"input[{i}] has {len(ids[i])} tokens; {name} takes at most {token_limit} per input "
                            f"({len(too_long)} inputs too long): shorten or split it, or send truncate=true",
                       param="input", code="input_too_long")
    return ids


def _truncated_token_ids(backend: Any, texts: list[str], kind: str, token_limit: int,
                         char_limit: int) -> list[list[int]]:
    """`truncate`: the ids the encoders give the whole text cut to `token_limit`, without tokenising a huge text.

    A text over `char_limit` is cut at its last whitespace before the limit, so no word is split and the cut text's
    tokens are a prefix of the whole text's (tokenizers pre-split on whitespace). That prefix is the answer only when
    it still holds more than `token_limit` tokens; otherwise (e.g. a long run of spaces before the words) the whole
    text is tokenised. A text with no whitespace in its first `char_limit` characters keeps the plain character cut:
    one giant "word" is not worth tokenising whole (its tokens may then differ from the encoders' at the end)."""
    cut: dict[int, str] = {}
    heads: list[int] = []  # the texts cut at a word boundary
    for i, text in enumerate(texts):
        if len(text) > char_limit:
            cut[i], at_word = _cut_at_word_boundary(text, char_limit)
            if at_word:
                heads.append(i)
    if not cut:
        return backend.token_ids(texts, kind, max_length=token_limit)
    ids = backend.token_ids([cut.get(i, text) for i, text in enumerate(texts)], kind, max_length=token_limit)
    if heads:
        whole = backend.token_ids([cut[i] for i in heads], kind, max_length=None)
        short = [i for i, x in zip(heads, whole) if len(x) <= token_limit]  # the cut may have lost kept tokens
        if short:
            for i, x in zip(short, backend.token_ids([texts[i] for i in short], kind, max_length=token_limit)):
                ids[i] = x
    return ids


def _cut_at_word_boundary(text: str, char_limit: int) -> tuple[str, bool]:
    """`text` cut to at most `char_limit` characters at its last whitespace (no word split: the cut's tokens are a
    prefix of the whole text's, tokenizers pre-split on whitespace), and whether it was cut there; a text without
    whitespace in its first `char_limit` characters is cut at the limit (False)."""
    head = text[:char_limit]
    space = max(head.rfind(c) for c in " \t\n\r\f\v")
    return (head[:space], True) if space > 0 else (head, False)


def _document_texts(documents: list[Any], max_inputs: int) -> list[str]:
    """A rerank request's documents as texts, or the 400 for an empty or too long list (the --max-inputs limit of
    /v1/embeddings' inputs)."""
    if not documents:
        raise APIError(400, "documents is empty: send a non-empty list of strings or {\"text\": ...} objects",
                       param="documents", code="empty_input")
    if len(documents) > max_inputs:
        raise APIError(400, f"{len(documents)} documents in one request; the limit is {max_inputs}: split the "
                            "request", param="documents", code="too_many_inputs")
    return [document if isinstance(document, str) else document.text for document in documents]


def _checked_pair_ids(name: str, backend: Any, query: str, documents: list[str], token_limit: int, char_limit: int,
                      truncate: bool) -> list[Any]:
    """The (query, document) pairs' ids for a rerank request, or the error that explains why there are none. Runs
    on any thread.

    Without `truncate` a pair over `token_limit` tokens is a 413 naming the limit and the document; a text over
    `char_limit` characters is refused before anything is tokenised (it would be over the token limit anyway).
    """
    _check_unicode([query], "query")
    _check_unicode(documents, "documents")
    if truncate:
        return _truncated_pair_ids(backend, query, documents, token_limit, char_limit)
    fix = "shorten it, or send truncate=true"
    if len(query) > char_limit:
        raise APIError(413, f"query has {len(query)} characters; {name} takes at most {token_limit} tokens (and "
                            f"{char_limit} characters) per (query, document) pair: {fix}", param="query",
                       code="pair_too_long")
    too_long = [i for i, text in enumerate(documents) if len(text) > char_limit]
    if too_long:
        i = too_long[0]
        raise APIError(413, f"documents[{i}] has {len(documents[i])} characters; {name} takes at most {token_limit} "
                            f"tokens (and {char_limit} characters) per (query, document) pair ({len(too_long)} "
                            f"documents too long): {fix}", param="documents", code="pair_too_long")
    pairs = backend.pair_ids([query] * len(documents), documents, max_length=None)
    too_long = [i for i, pair in enumerate(pairs) if len(pair) > token_limit]
    if too_long:
        i = too_long[0]
        raise APIError(413, f"the query and documents[{i}] are {len(pairs[i])} tokens; {name} takes at most "
                            f"{token_limit} tokens per (query, document) pair ({len(too_long)} pairs too long): "
                            f"{fix}", param="documents", code="pair_too_long")
    return pairs


def _truncated_pair_ids(backend: Any, query: str, documents: list[str], token_limit: int,
                        char_limit: int) -> list[Any]:
    """`truncate`: the pairs cut to `token_limit` longest side first (Reranker.pair_ids' ids), without tokenising a
    huge text whole.

    A text over `char_limit` is cut at its last whitespace before the limit first, so its tokens are a prefix of the
    whole text's. A document's cut is paired only where that cannot change the pair: when the cut alone holds more
    tokens than the limit and than the query, it stays the longer side, which longest-first truncation cuts to what
    the query leaves, a prefix of the cut. Otherwise (e.g. a long run of spaces before the words) the whole document
    is paired. A document with no whitespace in its first `char_limit` characters keeps the plain character cut,
    as in /v1/embeddings. The query is tokenised once per document (pairing it whole could cost 2,048 times its
    size), so a query over the character limit is always paired as its cut: its pairs score as Reranker.score scores
    the cut query's. Those equal the whole query's wherever the cut holds more tokens than the limit and than the
    document (the same argument, sides swapped); beside a document at least as long, longest-first truncation may
    give the odd token to the other side."""
    if len(query) > char_limit:
        query = _cut_at_word_boundary(query, char_limit)[0]
    cut = {i: _cut_at_word_boundary(text, char_limit) for i, text in enumerate(documents) if len(text) > char_limit}
    heads = [i for i, (_, at_word) in cut.items() if at_word]
    if heads:
        query_tokens = len(backend.token_ids([query])[0])
        for i, ids in zip(heads, backend.token_ids([cut[i][0] for i in heads])):
            if len(ids) <= max(token_limit, query_tokens):
                del cut[i]  # the cut may have lost tokens the pair keeps: pair the whole document
    paired = [cut[i][0] if i in cut else text for i, text in enumerate(documents)]
    return backend.pair_ids([query] * len(paired), paired, max_length=token_limit)


def _yield_cpu() -> None:
    """A tokenising thread gives way to the model's threads: a 7 MB body then slows down the model calls that other
    requests wait for as little as possible (the body's own answer comes later). Linux: a thread's nice value is its
    own; elsewhere threads keep the process's priority."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except OSError:
            pass


def _check_unicode(texts: list[str], param: str) -> None:
    """400 for text that is not Unicode: JSON may carry a lone UTF-16 surrogate (\\ud800), which no tokenizer takes."""
    for i, text in enumerate(texts):
        if text.isascii():
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise APIError(400, f"{param}[{i}] is not valid Unicode text: a lone UTF-16 surrogate "
                                f"(\\u{ord(text[exc.start]):04x}) at character {exc.start}", param=param,
                           code="invalid_text") from None


async def _batched_while_connected(batcher: MicroBatcher | BatcherLane, ids: list[Any],
                                   request: Request) -> np.ndarray:
    """The batcher's vectors (or a reranker's scores, one column); 503 when the shutdown cut the work off. A client
    that disconnects first takes its rows out of the batcher (nobody would read them) and gets no answer."""
    embedding = asyncio.ensure_future(batcher.embed(ids))
    disconnect = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({embedding, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (embedding, disconnect):
            task.cancel()
    if not embedding.done() or embedding.cancelled():
        raise APIError(499, "the client closed the request", code="client_closed_request")
    try:
        return embedding.result()
    except BatcherClosed:
        raise shutting_down() from None


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: all that can arrive now is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _in_daemon_thread(fn, *args, **kwargs) -> asyncio.Future:
    """fn(*args, **kwargs) in a new daemon thread, as a future of this event loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(setter, value) -> None:
        if not future.done():
            setter(value)

    def run() -> None:
        try:
            outcome = (future.set_result, fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request
            outcome = (future.set_exception, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: the server has exited and nobody waits
            pass

    threading.Thread(target=run, name="embedkit-chat", daemon=True).start()
    return future


def _version() -> str:
    return __version__
