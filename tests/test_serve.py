"""`embedkit serve`: OpenAI client parity, micro-batching under load, limits, auth, errors, probes, shutdown."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time

import httpx
import numpy as np
import pytest

from embedkit.errors import ModelError
from embedkit.models import load_model
from embedkit.serve.app import ServeSettings, create_app
from embedkit.serve.backends import TorchBackend
from embedkit.serve.server import BackgroundServer, load_backends

TEXTS = ["what causes high blood pressure", "fever", "a man is playing a guitar on the stage tonight with friends",
         "insulin lowers the level of glucose in the blood", "the court ruled"]




@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory, st_bert):
    from embedkit.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("serve_onnx") / "onnx"
    export_onnx(st_bert, out)
    return out


@pytest.fixture(scope="module")
def server(st_bert, bert_onnx):
    """Two models (torch and onnx), an API key, small limits; one background uvicorn for the module."""
    backends = load_backends([f"bert={st_bert}", f"bert-onnx={bert_onnx}"])
    settings = ServeSettings(api_keys=("sekret",), max_inputs=64, max_tokens_per_input=40, max_body_bytes=64 * 1024)
    with BackgroundServer(create_app(backends, settings)) as running:
        yield running


def _post(server, body, *, key="sekret", **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/embeddings", json=body, headers=headers, timeout=30, **kwargs)


def test_vectors_equal_in_process_encode(server, st_bert, bert_onnx):
    from embedkit.export.onnx import OnnxEncoder

    torch_encoder = load_model(st_bert)
    onnx_encoder = OnnxEncoder(bert_onnx)
    for model, encoder in (("bert", torch_encoder), ("bert-onnx", onnx_encoder)):
        for kind in ("query", "document"):
            response = _post(server, {"model": model, "input": TEXTS, "input_type": kind})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model"] == model and [row["index"] for row in body["data"]] == list(range(len(TEXTS)))
            got = np.array([row["embedding"] for row in body["data"]], dtype=np.float32)
            assert np.abs(got - encoder.encode(TEXTS, kind=kind)).max() < 1e-5
            ids = encoder.tokenizer([("query: " if kind == "query" else "") + t for t in TEXTS])["input_ids"]
            assert body["usage"]["prompt_tokens"] == sum(len(x) for x in ids)


def test_base64_dimensions_and_single_string(server, st_bert):
    full = load_model(st_bert).encode(["fever"])[0]
    response = _post(server, {"model": "bert", "input": "fever", "encoding_format": "base64", "dimensions": 8})
    assert response.status_code == 200
    vector = np.frombuffer(base64.b64decode(response.json()["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (8,)
    assert np.isclose(np.linalg.norm(vector), 1.0, atol=1e-6)  # re-normalised
    assert np.allclose(vector, full[:8] / np.linalg.norm(full[:8]), atol=1e-6)


@pytest.mark.parametrize("body, status, code", [
    ({"model": "bert", "input": [1, 2, 3]}, 400, "token_input_unsupported"),
    ({"model": "bert", "input": [[1, 2], [3]]}, 400, "token_input_unsupported"),
    ({"model": "bert", "input": []}, 400, "empty_input"),
    ({"model": "bert", "input": ["x"] * 65}, 400, "too_many_inputs"),
    ({"model": "bert", "input": "fever " * 60}, 400, "input_too_long"),
    ({"model": "bert", "input": "x", "dimensions": 33}, 400, "invalid_dimensions"),
    ({"input": "x"}, 400, "model_required"),
    ({"model": "gpt-9", "input": "x"}, 404, "model_not_found"),
    ({"model": "bert"}, 422, "invalid_body"),
    ({"model": "bert", "input": "x", "encoding_format": "int8"}, 422, "invalid_body"),
    ({"model": "bert", "input": "x", "dimensions": 0}, 422, "invalid_body"),
    ({"model": "bert", "input": "x", "input_type": "passage"}, 422, "invalid_body"),
    ({"model": "bert", "input": [None]}, 422, "invalid_body"),
])
def test_client_errors_are_4xx_json(server, body, status, code):
    response = _post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and "\n" not in error["message"] and error["message"]


def test_malformed_bodies_body_limit_and_auth(server):
    headers = {"Authorization": "Bearer sekret", "Content-Type": "application/json"}
    url = f"{server.url}/v1/embeddings"
    for raw in (b"{", b"", b"null", b"[]", b'{"input": "x"', "{\"input\": \"\udcff\"}".encode("utf-8", "surrogatepass"),
                b"\xff\xfe", b'{"input": 1e999999}'):
        response = httpx.post(url, content=raw, headers=headers)
        assert 400 <= response.status_code < 500, (raw, response.status_code, response.text)
        assert "error" in response.json()
    big = json.dumps({"model": "bert", "input": ["a"] * 40000}).encode()
    response = httpx.post(url, content=big, headers=headers)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(100):
            yield b" " * 1024

    response = httpx.post(url, content=chunks(), headers=headers)
    assert response.status_code == 413
    assert _post(server, {"model": "bert", "input": "x"}, key=None).status_code == 401
    response = _post(server, {"model": "bert", "input": "x"}, key="wrong")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # liveness needs no key
    assert httpx.get(f"{server.url}/nowhere").status_code == 404


def test_models_health_metrics_openapi(server):
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer sekret"}).json()
    assert {m["id"]: m["backend"] for m in models["data"]} == {"bert": "torch", "bert-onnx": "onnx"}
    assert all(m["dim"] == 32 for m in models["data"])
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    _post(server, {"model": "bert", "input": ["a", "b"]})
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'embedkit_http_requests_total{route="/v1/embeddings",status="200"}' in text
    assert 'embedkit_embedding_inputs_total{model="bert"}' in text
    assert "embedkit_batch_rows_bucket" in text
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/embeddings" in spec["paths"]
    props = spec["components"]["schemas"]["EmbeddingRequest"]["properties"]
    assert {"input", "model", "encoding_format", "dimensions", "input_type"} <= set(props)


def test_batcher_merges_requests_that_arrive_while_the_model_runs():
    """The batcher alone, with a model that takes 20 ms: 16 concurrent callers share model calls, rows stay theirs."""
    from embedkit.serve.batcher import MicroBatcher

    calls: list[int] = []

    def model(id_lists):
        calls.append(len(id_lists))
        time.sleep(0.02)
        return np.array([[len(ids), ids[0]] for ids in id_lists], dtype=np.float32)

    async def drive():
        # max_padding=1: no padding-driven splits, so every model call is one merged round
        batcher = MicroBatcher(model, max_batch_tokens=10_000, max_batch_size=1000, max_padding=1.0)
        await batcher.start()
        semaphore = asyncio.Semaphore(16)

        async def one(i):
            rows = [[i] * (1 + (i + j) % 5) for j in range(1 + i % 4)]
            async with semaphore:
                got = await batcher.embed(rows)
            assert got.tolist() == [[len(r), i] for r in rows]

        await asyncio.gather(*(one(i) for i in range(400)))
        await batcher.stop()

    asyncio.run(drive())
    assert sum(calls) == sum(1 + i % 4 for i in range(400))
    assert len(calls) <= 400 / 8, f"{len(calls)} model calls for 400 requests"


def test_batcher_respects_the_token_budget():
    from embedkit.serve.batcher import MicroBatcher

    shapes: list[tuple[int, int]] = []

    def model(id_lists):
        shapes.append((len(id_lists), max(len(x) for x in id_lists)))
        return np.zeros((len(id_lists), 2), dtype=np.float32)

    async def drive():
        batcher = MicroBatcher(model, max_batch_tokens=100, max_batch_size=8)
        await batcher.start()
        await asyncio.gather(batcher.embed([[1] * 50, [1] * 3, [1] * 3]), batcher.embed([[1] * 10] * 20))
        await batcher.stop()
        with pytest.raises(Exception, match="shutting down"):
            await batcher.embed([[1]])

    asyncio.run(drive())
    assert all(rows * width <= 100 or rows == 1 for rows, width in shapes) and all(r <= 8 for r, _ in shapes)
    assert sum(rows for rows, _ in shapes) == 23


def test_fill_call_bounds_budget_rows_and_padding_in_priority_order():
    from embedkit.serve.batcher import fill_call

    # The first request's first text always goes in, whatever its size: every call makes progress.
    assert fill_call([[500, 2]], max_tokens=100, max_rows=8) == [1]
    # Budget (rows x longest row) and row caps bind; equal lengths fill the call up to them.
    assert fill_call([[10] * 50], max_tokens=10_000, max_rows=32) == [32]
    assert fill_call([[10] * 50], max_tokens=100, max_rows=128) == [10]
    assert fill_call([[10] * 5, [10] * 5, [10] * 5], max_tokens=120, max_rows=128) == [5, 5, 2]
    # Priority order: a one-text request first rides along with the big one's longest texts.
    assert fill_call([[7], [60] * 100], max_tokens=600, max_rows=128) == [1, 9]
    # Once a call has min_rows rows, a text that would make it more than max_padding padding waits; the request
    # stops giving there (its later texts are shorter) and the next request is tried.
    lengths = sorted([40, 38, 37, 30, 25, 24, 22, 20, 18, 17, 16, 15, 14, 12, 12, 11, 10, 10, 9, 9, 8, 8] * 2,
                     reverse=True)
    counts = fill_call([lengths, [39] * 4], max_tokens=10_000, max_rows=128, min_rows=4, max_padding=0.2)
    taken = lengths[: counts[0]] + [39] * counts[1]
    assert counts[0] < len(lengths) and counts[1] == 4
    assert 1 - sum(taken) / (len(taken) * max(taken)) <= 0.2


def test_load_2000_requests_at_concurrency_16(st_bert):
    """2,000 HTTP requests at concurrency 16 through uvicorn: zero errors, every row correct, requests merged."""
    import sys

    backend = TorchBackend(load_model(st_bert), name="bert")
    calls: list[int] = []
    original = backend.embed_ids

    def counting(id_lists):
        calls.append(len(id_lists))
        return original(id_lists)

    backend.embed_ids = counting  # type: ignore[method-assign]
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(64)]
    expected = load_model(st_bert).encode(texts)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # client and server share this process: hand the GIL over quickly
    with BackgroundServer(create_app({"bert": backend})) as running:
        async def drive():
            limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
            async with httpx.AsyncClient(base_url=running.url, limits=limits, timeout=120) as client:
                semaphore = asyncio.Semaphore(16)
                errors, wrong = [], []

                async def one(i):
                    rows = [(i + j) % len(texts) for j in range(1 + i % 4)]
                    async with semaphore:
                        response = await client.post("/v1/embeddings", json={"input": [texts[r] for r in rows]})
                    if response.status_code != 200:
                        errors.append(response.status_code)
                        return
                    got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
                    if np.abs(got - expected[rows]).max() > 1e-5:
                        wrong.append(i)

                began = time.perf_counter()
                await asyncio.gather(*(one(i) for i in range(2000)))
                return errors, wrong, time.perf_counter() - began

        try:
            errors, wrong, seconds = asyncio.run(drive())
        finally:
            sys.setswitchinterval(switch)
    assert errors == [] and wrong == []
    assert sum(calls) == sum(1 + i % 4 for i in range(2000))
    assert max(calls) > 4  # a request has at most 4 texts: a bigger call merged several requests
    print(f"2000 requests at concurrency 16: {seconds:.1f}s, {len(calls)} model calls, "
          f"mean {np.mean(calls):.1f} texts per call")


def test_graceful_shutdown_finishes_in_flight_requests(st_bert):
    backend = TorchBackend(load_model(st_bert), name="bert")
    original = backend.embed_ids
    started, release = threading.Event(), threading.Event()

    def held(id_lists):  # the first call holds the model until the test lets go: no timing race under CPU load
        started.set()
        release.wait(60)
        return original(id_lists)

    backend.embed_ids = held  # type: ignore[method-assign]
    app = create_app({"bert": backend})
    running = BackgroundServer(app).start()
    results: list = []

    def client(i):
        response = httpx.post(f"{running.url}/v1/embeddings", json={"input": [f"text {i}"]}, timeout=60)
        results.append((response.status_code, len(response.json()["data"])))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    threads[0].start()
    assert started.wait(30)  # request 0 is in the model; the other five can only queue behind it
    for t in threads[1:]:
        t.start()
    batcher = app.state.served["bert"].batcher
    deadline = time.monotonic() + 30
    while batcher.queue_depth < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.queue_depth == 5
    threading.Timer(0.5, release.set).start()  # the model lets go only after shutdown has begun
    running.stop()  # what SIGTERM does: stop accepting, finish in-flight, then stop the batcher
    for t in threads:
        t.join(30)
    assert results and all(r == (200, 1) for r in results) and len(results) == 6
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{running.url}/v1/embeddings", json={"input": ["late"]}, timeout=5)


def test_refuses_to_start_on_probe_mismatch(st_bert, tmp_path, caplog):
    import torch
    from safetensors.torch import load_file, save_file

    from embedkit.models.probes import write_probes
    from embedkit.serve.server import run_server

    folder = tmp_path / "trained"
    encoder = load_model(st_bert)
    encoder.save(folder)
    write_probes(encoder, folder)
    assert load_backends([str(folder)])  # intact: starts
    weights = load_file(folder / "model.safetensors")
    key = "encoder.layer.1.output.dense.weight"
    weights[key] = weights[key] + 0.05 * torch.randn(weights[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="refusing to serve .*MISMATCH"):
        run_server([str(folder)], port=0)  # fails before binding anything
    with caplog.at_level(logging.INFO, logger="embedkit"):
        backends = load_backends([str(folder)], allow_mismatch=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]  # shown even with -q
    assert "trained" in backends and any("WARNING" in line and "--allow-mismatch" in line for line in warnings)


def test_model_spec_names_and_duplicates(st_bert):
    from embedkit.errors import ConfigError
    from embedkit.serve.backends import ModelSpec

    assert ModelSpec.parse("base=minilm") == ModelSpec("base", "minilm")
    assert ModelSpec.parse("minilm").name == "minilm"
    assert ModelSpec.parse(str(st_bert)).name.endswith("-model")
    with pytest.raises(ConfigError, match="NAME=PATH"):
        load_backends([f"a={st_bert}", f"a={st_bert}"])
    with pytest.raises(ModelError, match="ONNX export folder"):
        load_backends([str(st_bert)], backend="onnx")


def test_serve_cli_help():
    import typer
    from typer.testing import CliRunner

    from embedkit.serve.cli import serve_command

    app = typer.Typer()
    app.command()(serve_command)
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0
    for option in ("--backend", "--api-key", "--allow-mismatch", "--engine", "--max-batch-tokens"):
        assert option in result.output


@pytest.mark.integration
def test_openai_client_gets_minilm_vectors_equal_to_encode():
    """The official openai client against `embedkit serve` with the real MiniLM (torch backend)."""
    import openai

    encoder = load_model("minilm")
    backends = load_backends(["minilm"])
    with BackgroundServer(create_app(backends, ServeSettings(api_keys=("k1",)))) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="k1", max_retries=0)
        texts = TEXTS + ["Diabetes mellitus is a group of metabolic disorders."]
        response = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64 by default
        got = np.array([d.embedding for d in response.data], dtype=np.float32)
        assert got.shape == (len(texts), 384)
        assert np.abs(got - encoder.encode(texts)).max() < 1e-5
        floats = client.embeddings.create(model="minilm", input="fever", encoding_format="float")
        assert np.abs(np.array(floats.data[0].embedding) - encoder.encode(["fever"])[0]).max() < 1e-5
        assert response.usage.prompt_tokens > len(texts)
        assert [m.id for m in client.models.list().data] == ["minilm"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{running.url}/v1", api_key="bad", max_retries=0).embeddings.create(
                model="minilm", input="x")
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="nope", input="x")
