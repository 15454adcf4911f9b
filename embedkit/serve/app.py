"""The OpenAI-compatible embedding server (FastAPI): /v1/embeddings, /v1/models, /health, /metrics, and
/v1/chat/completions for models whose folder has a generative head (`embedkit llm`).

Errors follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with 4xx for everything a client
can get wrong (400 bad input, 401 key, 404 model, 413 body size, 422 schema); a 5xx means a bug in the server.
"""

from __future__ import annotations

import base64
import hmac
import time
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

from embedkit.serve.batcher import BatcherClosed, MicroBatcher
from embedkit.serve.metrics import ServerMetrics


@dataclass
class ServeSettings:
    """Limits and behaviour of one server; every limit answers with a clear 4xx."""

    api_keys: tuple[str, ...] = ()
    max_inputs: int = 2048  # texts per request (OpenAI's limit)
    max_tokens_per_input: Optional[int] = None  # None: the model's max_length
    truncate: bool = False  # True: cut long inputs to the limit instead of answering 400
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_tokens: int = 16384  # padded tokens per model call
    max_batch_size: int = 128  # texts per model call
    max_padding: float = 0.2  # a model call of >= 8 texts is cut before padding would exceed this share
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


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


_ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "Invalid input (token arrays, too many inputs, input too long, bad dimensions, model missing).",
    401: "Missing or wrong API key.",
    404: "Unknown model.",
    413: "Request body too large.",
    422: "The body does not match the schema.",
    503: "The server is shutting down.",
}.items()}


class APIError(StarletteHTTPException):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.param, self.code, self.type = param, code, type


def _error_json(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    message = " ".join(str(message).split())
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------------------- middleware
_ROUTES = {"/v1/embeddings", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/openapi.json", "/docs",
           "/redoc", "/embeddings"}


class _BodyLimitMiddleware:
    """413 for bodies over the limit: by Content-Length up front, or while streaming (chunked)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            response = _error_json(413, f"request body of {int(length)} bytes is over the limit of {self.limit}",
                                   code="body_too_large")
            return await response(scope, receive, send)
        seen = 0
        limit = self.limit

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise APIError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
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


# ---------------------------------------------------------------------------------------------------------- app
@dataclass
class _Served:
    name: str
    backend: Any
    batcher: MicroBatcher
    created: int


def create_app(backends: dict[str, Any], settings: ServeSettings | None = None,
               generators: dict[str, Any] | None = None) -> FastAPI:
    """An app serving `backends` ({served name: backend}); models are chosen by the request's `model` field.

    `generators` ({served name: embedkit.llm.generate.Generator}) adds /v1/chat/completions for those models.
    """
    generators = dict(generators or {})
    unknown = set(generators) - set(backends)
    if unknown:
        raise ValueError(f"generators without an embedding backend: {sorted(unknown)}")
    settings = settings or ServeSettings()
    if not backends:
        raise ValueError("at least one model must be served")
    metrics = ServerMetrics()
    created = int(time.time())
    served = {
        name: _Served(name, backend, MicroBatcher(backend.embed_ids, name=name, max_batch_tokens=settings.max_batch_tokens,
                                                  max_batch_size=settings.max_batch_size,
                                                  max_padding=settings.max_padding,
                                                  on_batch=metrics.batch_observer(name)), created)
        for name, backend in backends.items()
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for entry in served.values():
            await entry.batcher.start()
        try:
            yield
        finally:  # uvicorn has finished the in-flight requests by now; drain whatever is still queued
            for entry in served.values():
                await entry.batcher.stop()

    app = FastAPI(
        title="embedkit embedding server",
        version=_version(),
        description="OpenAI-compatible embeddings (`POST /v1/embeddings`) with dynamic micro-batching. "
                    "Extension: `input_type` = query | document selects the model's prompt.",
        lifespan=lifespan,
    )
    app.state.served = served
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
    async def embeddings(body: EmbeddingRequest) -> Response:
        entry = _pick_model(served, body.model)
        texts = _texts(body.input, settings.max_inputs)
        kind = body.input_type or settings.default_input_type
        backend = entry.backend
        limit = min(settings.max_tokens_per_input or backend.max_length, backend.max_length)
        if settings.truncate:
            ids = backend.token_ids(texts, kind, truncate=True)
            ids = [x[:limit] for x in ids] if limit < backend.max_length else ids
        else:
            ids = backend.token_ids(texts, kind, truncate=False)
            too_long = [(i, len(x)) for i, x in enumerate(ids) if len(x) > limit]
            if too_long:
                i, n = too_long[0]
                raise APIError(400, f"input[{i}] has {n} tokens; {entry.name} takes at most {limit} per input "
                                    f"({len(too_long)} inputs too long): shorten or split it",
                               param="input", code="input_too_long")
        if body.dimensions is not None and body.dimensions > backend.dim:
            raise APIError(400, f"dimensions={body.dimensions} is more than {entry.name}'s {backend.dim}",
                           param="dimensions", code="invalid_dimensions")
        queue_gauge = metrics.queue_depth.labels(entry.name)
        queue_gauge.set(entry.batcher.queue_depth)
        try:
            vectors = await entry.batcher.embed(ids)
        except BatcherClosed:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
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
        import asyncio
        import uuid

        entry = _pick_model(served, body.model)
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
        from embedkit.errors import EmbedkitError

        try:  # generation blocks for seconds: keep the event loop (and the embedding batcher) responsive
            result = await asyncio.to_thread(generator.chat, messages, max_new_tokens=limit,
                                             temperature=body.temperature, top_p=body.top_p, stop=stop,
                                             seed=body.seed)
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

    @app.get("/v1/models", dependencies=[Depends(check_key)], responses={401: _ERRORS[401]},
             summary="List the served models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{**_model_card(entry), "chat": name in generators}
                                           for name, entry in served.items()]}

    @app.get("/health", summary="Liveness: 200 when the server can embed")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(served),
                "queue_depth": {name: entry.batcher.queue_depth for name, entry in served.items()}}

    @app.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response)
    async def prometheus() -> Response:
        for name, entry in served.items():
            metrics.queue_depth.labels(name).set(entry.batcher.queue_depth)
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    # Outermost first: metrics see every response, 413s included.
    app.add_middleware(_BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    return app


def _model_card(entry: _Served) -> dict[str, Any]:
    info = entry.backend.describe()
    return {"id": entry.name, "object": "model", "created": entry.created, "owned_by": "embedkit",
            "dim": entry.backend.dim, "max_length": entry.backend.max_length,
            "backend": getattr(entry.backend, "kind", info.get("backend")), "pooling": info.get("pooling"),
            "normalize": entry.backend.normalize, "prompts": info.get("prompts") or {}}


def _pick_model(served: dict[str, _Served], name: Optional[str]) -> _Served:
    if name is None or name == "":
        if len(served) == 1:
            return next(iter(served.values()))
        raise APIError(400, f"several models are served ({', '.join(served)}): say which in 'model'",
                       param="model", code="model_required")
    if name not in served:
        raise APIError(404, f"model {name!r} is not served here; served: {', '.join(served)}", param="model",
                       code="model_not_found", type="not_found_error")
    return served[name]


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


def _version() -> str:
    from embedkit import __version__

    return __version__
