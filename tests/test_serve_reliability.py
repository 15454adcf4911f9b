"""`embedkit serve` under abuse and load: any JSON string, truncation and limits, fair batching, responses independent
of concurrency, the start-up identity check, slow clients, SIGTERM under load (a real server process), and the
latency of a one-text request beside a 2,048-text request and a 7 MB body (a real server process)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedkit.errors import ModelError
from embedkit.models import load_model
from embedkit.serve.app import ServeSettings, create_app
from embedkit.serve.backends import TorchBackend
from embedkit.serve.server import BackgroundServer, load_backends

from conftest import CORPUS

WORDS = " ".join(CORPUS).split()


def _text(seed: int, n_words: int) -> str:
    """A deterministic text of `n_words` words from the test corpus."""
    return " ".join(WORDS[(seed * 7 + i) % len(WORDS)] for i in range(n_words))


@pytest.fixture(scope="module")
def server(st_bert):
    backend = TorchBackend(load_model(st_bert), name="bert")
    settings_ = ServeSettings(max_inputs=64, max_tokens_per_input=24, max_body_bytes=256 * 1024)
    with BackgroundServer(create_app({"bert": backend}, settings_)) as running:
        running.backend = backend
        yield running


# ---------------------------------------------------------------------------------------------------------- strings
_any_char = st.one_of(st.characters(exclude_categories=()), st.characters(categories=["Cs"]))  # lone surrogates too
_strings = st.text(_any_char, max_size=40)


@pytest.fixture(scope="module")
def keepalive(server):
    """One keep-alive connection for all examples (the server must never close it) and its client address."""
    with httpx.Client(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=1)) as client:
        yield client, []


@given(body=st.fixed_dictionaries({"input": st.one_of(_strings, st.lists(_strings, min_size=1, max_size=4))}, optional={
    "model": st.one_of(st.just("bert"), _strings), "input_type": st.one_of(st.just("query"), _strings),
    "encoding_format": st.one_of(st.just("base64"), _strings), "user": _strings, "truncate": st.booleans(),
}), key=_strings, value=_strings)
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_any_json_string_gets_2xx_or_4xx(keepalive, body, key, value):
    """Every string JSON can carry (lone UTF-16 surrogates included), in every field and as a key: 2xx or 4xx JSON,
    and the keep-alive connection survives (a 500 used to reset it)."""
    client, addresses = keepalive
    raw = json.dumps({**body, key: value}, ensure_ascii=True).encode()  # "\ud800" is a valid JSON escape
    response = client.post("/v1/embeddings", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code in (200, 400, 404, 422), (raw[:200], response.status_code, response.text[:300])
    if response.status_code != 200:
        assert response.json()["error"]["message"]
    addresses.append(response.extensions["network_stream"].get_extra_info("client_addr"))
    assert addresses[-1] == addresses[0], "the server closed the keep-alive connection"


def test_lone_surrogate_is_400_and_names_where(server):
    for raw, param in ((b'{"input": ["fever", "a\\ud800b"]}', "input"), (b'{"input": "\\udfff"}', "input")):
        response = httpx.post(f"{server.url}/v1/embeddings", content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_text" and error["param"] == param and "surrogate" in error["message"]
    response = httpx.post(f"{server.url}/v1/embeddings", content=b'{"input": "x", "model": "\\ud800"}',
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 404 and "\\ud800" in response.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------------- limits
def test_truncate_field_server_default_and_usage(server, st_bert):
    long_text = _text(1, 60)  # well over the server's 24-token limit
    url = f"{server.url}/v1/embeddings"
    refused = httpx.post(url, json={"input": [long_text, "fever"]})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "input_too_long"
    assert "truncate=true" in refused.json()["error"]["message"]
    cut = httpx.post(url, json={"input": [long_text, "fever"], "truncate": True})
    assert cut.status_code == 200, cut.text
    encoder = load_model(st_bert)
    ids = encoder.tokenizer([long_text, "fever"], truncation=True, max_length=24)["input_ids"]
    assert len(ids[0]) == 24 and ids[0][-1] == encoder.tokenizer.sep_token_id  # cut inside, [SEP] kept
    assert cut.json()["usage"] == {"prompt_tokens": 24 + len(ids[1]), "total_tokens": 24 + len(ids[1])}
    got = np.array([row["embedding"] for row in cut.json()["data"]], dtype=np.float32)
    expected = np.stack([server.backend.embed_ids([x])[0] for x in ids])
    assert np.abs(got - expected).max() < 1e-6

    backend = TorchBackend(load_model(st_bert), name="bert")
    with BackgroundServer(create_app({"bert": backend}, ServeSettings(max_tokens_per_input=24, truncate=True))) as on:
        assert httpx.post(f"{on.url}/v1/embeddings", json={"input": long_text}).json()["usage"]["prompt_tokens"] == 24
        off = httpx.post(f"{on.url}/v1/embeddings", json={"input": long_text, "truncate": False})
        assert off.status_code == 400 and off.json()["error"]["code"] == "input_too_long"


def test_over_long_inputs_are_refused_by_characters_before_tokenising(server):
    calls: list[int] = []
    original = server.backend.token_ids

    def spy(texts, kind, **kwargs):
        calls.append(sum(len(t) for t in texts))
        return original(texts, kind, **kwargs)

    server.backend.token_ids = spy
    try:
        huge = "fever " * 40_000  # 240,000 characters; the limit is 20 x 24 tokens = 480
        began = time.perf_counter()
        response = httpx.post(f"{server.url}/v1/embeddings", json={"input": ["fever", huge]}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["code"] == "input_too_long"
        assert "characters" in response.json()["error"]["message"] and calls == []
        assert time.perf_counter() - began < 5
        cut = httpx.post(f"{server.url}/v1/embeddings", json={"input": huge, "truncate": True}, timeout=30)
        # only what the character limit keeps is tokenised: the text cut at its last space before 480 characters
        # (truncated, and whole to check that it still holds more tokens than the limit)
        assert cut.status_code == 200 and calls and max(calls) <= 480, calls
    finally:
        del server.backend.token_ids


def test_tokenizer_is_safe_across_threads(st_bert):
    """Tokenising off the event loop: concurrent calls with and without truncation each get their own result."""
    from concurrent.futures import ThreadPoolExecutor

    backend = TorchBackend(load_model(st_bert), name="bert")
    texts = [_text(i, 10 + i % 50) for i in range(64)]
    expected = {limit: backend.token_ids(texts, "query", max_length=limit) for limit in (None, 16, 128)}
    with ThreadPoolExecutor(8) as pool:
        jobs = [(limit, pool.submit(backend.token_ids, texts, "query", max_length=limit))
                for _ in range(20) for limit in (None, 16, 128)]
        assert all(job.result() == expected[limit] for limit, job in jobs)
    assert max(map(len, expected[None])) > 16 and max(map(len, expected[16])) == 16


# ---------------------------------------------------------------------------------------------------------- batcher
def _slow_model(seconds_per_token: float, calls: list):
    """A model whose time grows with the padded tokens; row = [length, first id], so results can be checked."""
    def model(id_lists):
        calls.append((time.perf_counter(), len(id_lists)))
        time.sleep(seconds_per_token * len(id_lists) * max(len(x) for x in id_lists))
        return np.array([[len(ids), ids[0]] for ids in id_lists], dtype=np.float32)

    return model


def test_one_text_request_is_not_queued_behind_a_2048_text_one():
    """The batcher alone, with a model whose time grows with its tokens: the big request takes ~0.7 s."""
    from embedkit.serve.batcher import MicroBatcher

    calls: list = []

    async def drive():
        batcher = MicroBatcher(_slow_model(5e-6, calls), call_seconds=0.02, min_call_tokens=256)
        await batcher.start()
        big_rows = [[i % 50 + 1] * (20 + i % 80) for i in range(2048)]
        big = asyncio.ensure_future(batcher.embed(big_rows))
        await asyncio.sleep(0.1)  # the big request is being computed
        began = time.perf_counter()
        small = await batcher.embed([[7] * 5])
        small_latency = time.perf_counter() - began
        assert not big.done()
        big_vectors = await big
        await batcher.stop()
        return small, small_latency, big_vectors, big_rows

    small, latency, big_vectors, big_rows = asyncio.run(drive())
    assert small.tolist() == [[5, 7]]
    assert big_vectors.tolist() == [[len(r), r[0]] for r in big_rows]
    seconds_for_big = calls[-1][0] - calls[0][0]
    assert seconds_for_big > 0.5 and latency < 0.15, (seconds_for_big, latency)  # ~2 calls of ~0.02 s, not ~0.7 s


def test_draining_batcher_finishes_closest_to_done_first_then_fails_the_rest():
    from embedkit.serve.batcher import BatcherClosed, MicroBatcher

    calls: list = []

    async def drive():
        batcher = MicroBatcher(_slow_model(1e-5, calls), call_seconds=0.02, min_call_tokens=256, max_batch_size=16)
        await batcher.start()
        sizes = [400, 40, 200, 20]  # rows of 10 tokens: 40 ms, 4 ms, 20 ms, 2 ms of model time
        futures = [asyncio.ensure_future(batcher.embed([[1] * 10] * n)) for n in sizes]
        await asyncio.sleep(0)
        batcher.expire_in(0.06)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        with pytest.raises(BatcherClosed):
            await batcher.embed([[1]])
        await batcher.stop()
        return sizes, outcomes

    sizes, outcomes = asyncio.run(drive())
    done = [n for n, outcome in zip(sizes, outcomes) if not isinstance(outcome, Exception)]
    failed = [n for n, outcome in zip(sizes, outcomes) if isinstance(outcome, BatcherClosed)]
    assert done and failed and max(done) < min(failed), (done, failed)  # smallest remaining work finished first


def test_a_lane_stopped_alone_answers_its_queue_and_the_last_lane_stops_the_shared_batcher():
    """Bug caught: removing one adapter (its lane) stops the batcher its base and the other adapters share, drops
    the removed adapter's queued requests, or leaves the shared batcher running after every lane stopped; and rows
    must reach the model tagged with their own lane."""
    from embedkit.serve.batcher import BatcherClosed, BatcherLane, MicroBatcher

    calls: list = []

    def model(rows):
        calls.append(sorted({row.tag for row in rows}))
        time.sleep(0.01)
        return np.array([[len(row), ord(row.tag)] for row in rows], dtype=np.float32)

    async def drive():
        shared = MicroBatcher(model, call_seconds=0.02, min_call_tokens=64)
        legal, med = BatcherLane(shared, "l"), BatcherLane(shared, "m")
        await legal.start()
        await med.start()
        queued = [asyncio.ensure_future(lane.embed([[1] * 8] * 20)) for lane in (legal, med, legal)]
        await asyncio.sleep(0)
        await legal.stop()  # returns once its two queued requests are answered
        assert all(future.done() for future in (queued[0], queued[2]))
        with pytest.raises(BatcherClosed):
            await legal.embed([[1]])
        assert shared.running
        still = await med.embed([[2, 2]])
        await med.stop()
        return [await future for future in queued], still, shared.running

    answers, still, running = asyncio.run(drive())
    assert [answer[:, 1].tolist() for answer in answers] == [[ord("l")] * 20, [ord("m")] * 20, [ord("l")] * 20]
    assert still.tolist() == [[2, ord("m")]] and not running
    assert any(len(tags) == 2 for tags in calls)  # one model call held both lanes' rows


# ---------------------------------------------------------------------------------------------------------- concurrency
@pytest.fixture
def one_torch_thread():
    """Client and server share this process's two cores: torch's OpenMP threads would spin against the client's
    (the server process avoids that with OMP_WAIT_POLICY=PASSIVE, which must be set before torch loads)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def served_backend(request, st_bert, tmp_path_factory, one_torch_thread):
    """(backend, tolerance, requests) for one parametrised backend."""
    kind = request.param
    if kind == "torch":
        return TorchBackend(load_model(st_bert), name="bert"), 1e-6, 160
    if kind == "minilm-torch":
        return TorchBackend(load_model("minilm"), name="bert"), 1e-6, 48
    from embedkit.export.onnx import OnnxEncoder, export_onnx
    from embedkit.serve.backends import OnnxBackend

    out = tmp_path_factory.mktemp("onnx") / "onnx"
    # The random tiny BERT ties many documents: its int8 nDCG moves by noise (see test_export.TINY_MAX_NDCG_DROP).
    export_onnx(st_bert, out, quantize="int8", max_ndcg_drop=0.03)
    return OnnxBackend(OnnxEncoder(out), name="bert"), 1e-4, 160


@pytest.mark.parametrize("served_backend", [
    "torch",
    pytest.param("minilm-torch", marks=pytest.mark.integration),
    "onnx-int8",
], indirect=True)
def test_responses_under_concurrency_32_equal_the_request_sent_alone(served_backend):
    backend, atol, n_requests = served_backend
    pool = [_text(i, 1 + (i * 13) % 40) for i in range(48)]
    requests = [[pool[(i * 5 + j * 11) % len(pool)] for j in range(1 + i % 6)] for i in range(n_requests)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # client and server share this process: hand the GIL over quickly
    try:
        with BackgroundServer(create_app({"bert": backend})) as running:
            async def send_all(concurrency: int) -> list[np.ndarray]:
                limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
                async with httpx.AsyncClient(base_url=running.url, limits=limits, timeout=120) as client:
                    semaphore = asyncio.Semaphore(concurrency)

                    async def one(texts):
                        async with semaphore:
                            response = await client.post("/v1/embeddings", json={"input": texts})
                        assert response.status_code == 200, response.text
                        return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)

                    return await asyncio.gather(*(one(texts) for texts in requests))

            alone = asyncio.run(send_all(1))
            calls_alone = _model_calls(running.url)
            together = asyncio.run(send_all(32))
            calls_together = _model_calls(running.url) - calls_alone
    finally:
        sys.setswitchinterval(switch)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(alone, together))
    assert worst <= atol, worst
    assert calls_together < calls_alone  # concurrent requests did share model calls
    print(f"concurrency 32: max |diff| to the request alone {worst:.1e} ({calls_alone} model calls alone, "
          f"{calls_together} together)")


def _model_calls(url: str) -> int:
    text = httpx.get(f"{url}/metrics").text
    return int(float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith("embedkit_batch_rows_count"))))


# ---------------------------------------------------------------------------------------------------------- identity
def _altered_copy(source: Path, target: Path, token_id: int) -> Path:
    """`source` with one token's embedding row changed by +1.0 (a token the probe texts do not contain)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    weights[key][token_id] += 1.0
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _unprobed_token(encoder) -> int:
    from embedkit.models.probes import DEFAULT_PROBES
    from embedkit.models.prompts import apply_prompt

    used = {i for text, kind in DEFAULT_PROBES for i in encoder.tokenizer(apply_prompt([text], encoder.prompts,
                                                                                       kind))["input_ids"][0]}
    return max(set(range(len(encoder.tokenizer))) - used)


@pytest.fixture(scope="module")
def trained(st_bert, tmp_path_factory):
    """A model folder as training leaves it: weights, manifest, probe vectors with the recorded fingerprint."""
    from embedkit.models.probes import write_probes

    folder = tmp_path_factory.mktemp("trained") / "trained"
    encoder = load_model(st_bert)
    encoder.save(folder)
    write_probes(encoder, folder)
    return folder


def test_altered_embedding_row_is_refused_at_start_up_with_one_line(trained, tmp_path, capsys, caplog):
    from embedkit.cli import main
    from embedkit.models.probes import check_probes

    assert load_backends([str(trained)])  # intact: starts
    encoder = load_model(trained)
    altered = _altered_copy(trained, tmp_path / "altered", _unprobed_token(encoder))
    # The probe texts do not use that token: the probe vectors alone would let it through ...
    assert check_probes(lambda t, k: load_model(altered).encode(list(t), kind=k), altered).ok
    # ... the fingerprint recorded beside them does not.
    with pytest.raises(ModelError, match="refusing to serve altered: weights fingerprint .* differs from "
                                         f"{encoder.fingerprint[:12]} recorded in probe_vectors.json"):
        load_backends([str(altered)])
    with caplog.at_level(logging.INFO, logger="embedkit"):
        assert "altered" in load_backends([str(altered)], allow_mismatch=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]  # shown even with -q
    assert any("WARNING" in line and "fingerprint" in line for line in warnings)
    # the command (its logging configured by main: records stop at the "embedkit" logger from here on)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", str(altered), "--port", "0"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "fingerprint" in errors[0] and "--allow-mismatch" in errors[0]


def test_altered_onnx_graph_is_refused_at_start_up(trained, tmp_path):
    import onnx
    from onnx import numpy_helper

    from embedkit.export.onnx import export_onnx

    export = tmp_path / "onnx"
    export_onnx(trained, export)
    assert load_backends([str(export)])
    altered = tmp_path / "altered-onnx"
    shutil.copytree(export, altered)
    graph = onnx.load(str(altered / "model.onnx"))
    token = _unprobed_token(load_model(trained))
    for initializer in graph.graph.initializer:
        if initializer.name.endswith("word_embeddings.weight"):
            array = numpy_helper.to_array(initializer).copy()
            array[token] += 1.0
            initializer.CopyFrom(numpy_helper.from_array(array, initializer.name))
            break
    else:
        pytest.fail("no word-embedding initializer in the graph")
    onnx.save(graph, str(altered / "model.onnx"))
    with pytest.raises(ModelError, match=r"model\.onnx sha256 .* differs from .* recorded in embedkit_manifest\.json"):
        load_backends([str(altered)])


# ---------------------------------------------------------------------------------------------------------- slow clients
def _raw_response(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes, float]:
    """Read until the server closes: (status, headers, body, seconds waited)."""
    sock.settimeout(timeout)
    began, data = time.monotonic(), b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body, time.monotonic() - began


def test_read_timeout_and_connection_limit(st_bert):
    backend = TorchBackend(load_model(st_bert), name="bert")
    limits = ServeSettings(read_timeout=0.5, max_connections=8)
    with BackgroundServer(create_app({"bert": backend}, limits)) as running:
        host, port = running.url.removeprefix("http://").split(":")
        address = (host, int(port))
        # Headers that never finish: 408 JSON after the read timeout, connection closed.
        with socket.create_connection(address) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
            status, headers, body, waited = _raw_response(sock, 10)
        assert status == 408 and json.loads(body)["error"]["code"] == "read_timeout" and 0.4 < waited < 3
        # A body that never finishes: the same, from the app.
        with socket.create_connection(address) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"input\": ")
            status, headers, body, waited = _raw_response(sock, 10)
        assert status == 408 and json.loads(body)["error"]["code"] == "read_timeout" and waited < 3
        # Slowloris: 30 connections dribbling a header, a byte every 0.1 s, are all closed by the read timeout.
        dribblers = [socket.create_connection(address) for _ in range(30)]
        for sock in dribblers:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        began = time.monotonic()
        open_ = list(dribblers)
        while open_ and time.monotonic() - began < 5:
            for sock in list(open_):
                try:
                    sock.sendall(b"a")
                except OSError:
                    open_.remove(sock)
            time.sleep(0.1)
        assert not open_, f"{len(open_)} slow connections still open after {time.monotonic() - began:.1f}s"
        for sock in dribblers:
            sock.close()
        # The connection limit: with 8 open, one more is answered 503 JSON with Retry-After.
        idle = [socket.create_connection(address) for _ in range(8)]
        time.sleep(0.1)
        over = httpx.post(f"{running.url}/v1/embeddings", json={"input": "fever"})
        assert over.status_code == 503 and over.json()["error"]["code"] == "too_many_connections"
        assert over.headers["retry-after"] == "5"
        for sock in idle:
            sock.close()
        time.sleep(0.1)
        assert httpx.post(f"{running.url}/v1/embeddings", json={"input": "fever"}).status_code == 200


def test_work_past_the_grace_gets_503_json_not_a_500(st_bert):
    """A model call longer than the whole grace: its request is cancelled by uvicorn (503 JSON from the app, not
    uvicorn's text/plain 500); a request still waiting gets the batcher's 503 before the grace ends."""
    backend = TorchBackend(load_model(st_bert), name="bert")
    original, started = backend.embed_ids, threading.Event()

    def slow(id_lists):
        started.set()
        time.sleep(1.5)
        return original(id_lists)

    backend.embed_ids = slow
    running = BackgroundServer(create_app({"bert": backend}), graceful_timeout=0.5).start()
    results: list = [None, None]
    first = _post_in_thread(f"{running.url}/v1/embeddings", {"input": ["fever"]}, results, 0)
    assert started.wait(30)
    second = _post_in_thread(f"{running.url}/v1/embeddings", {"input": ["cough"]}, results, 1)
    time.sleep(0.2)  # the second request is waiting for the model
    running.stop()
    for thread in (first, second):
        thread.join(30)
    for response, _ in results:
        assert isinstance(response, httpx.Response), response
        assert response.status_code == 503 and response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == "shutting_down" and response.headers["retry-after"] == "5"


class _SlowGenerator:
    """Stands in for embedkit.llm.generate.Generator: answers after `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def chat(self, messages, **kwargs):
        from types import SimpleNamespace

        time.sleep(self.seconds)
        return SimpleNamespace(text="ok", finish_reason="stop", prompt_tokens=3, completion_tokens=1)


def test_chat_refuses_lone_surrogates_and_answers_503_when_the_grace_runs_out(st_bert):
    backend = TorchBackend(load_model(st_bert), name="bert")
    app = create_app({"bert": backend}, generators={"bert": _SlowGenerator(3.0)})
    running = BackgroundServer(app, graceful_timeout=1.0).start()
    url = f"{running.url}/v1/chat/completions"
    bad = httpx.post(url, content=b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
                     headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_text"
    results: list = [None]
    thread = _post_in_thread(url, {"messages": [{"role": "user", "content": "hi"}]}, results, 0)
    time.sleep(0.3)  # generating
    began = time.monotonic()
    running.stop()  # the generation (3 s) outlasts the grace (1 s): 503 when waiting work gives up
    stopped_after = time.monotonic() - began
    thread.join(30)
    response, _ = results[0]
    assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    assert stopped_after < 1.5, stopped_after  # the daemon generation thread does not hold the server


# ---------------------------------------------------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _ServerProcess:
    """`embedkit serve` in its own process (python -m embedkit.cli serve ...), stderr kept in a file."""

    def __init__(self, tmp_path: Path, args: list[str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"serve-{self.port}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "embedkit.cli", "serve", "--port", str(self.port),
                                             *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited ({self.process.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def in_flight(self) -> int:
        """HTTP requests being handled, less the /metrics request asking."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        line = next(line for line in text.splitlines() if line.startswith("embedkit_http_requests_in_flight"))
        return int(float(line.split()[-1])) - 1

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def _post_in_thread(url: str, body: dict | bytes, results: list, index: int, timeout: float = 120) -> threading.Thread:
    def run():
        began = time.perf_counter()
        try:
            if isinstance(body, bytes):
                response = httpx.post(url, content=body, headers={"Content-Type": "application/json"},
                                      timeout=timeout)
            else:
                response = httpx.post(url, json=body, timeout=timeout)
            results[index] = (response, time.perf_counter() - began)
        except httpx.HTTPError as exc:
            results[index] = (exc, time.perf_counter() - began)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigterm_under_load_finishes_or_answers_503_and_exits_0(wider_bert, tmp_path):
    grace = 3.0
    served = _ServerProcess(tmp_path, ["--model", f"bert={wider_bert}", "--graceful-timeout", str(grace),
                                       "--threads", "1"])
    try:
        texts = [_text(i, 70) for i in range(256)]  # ~105 tokens each: ~27,000 tokens per request
        # the load is sized from this machine's speed: about 4 graces of work, so some requests cannot finish
        began = time.monotonic()
        assert httpx.post(f"{served.url}/v1/embeddings", json={"input": texts}, timeout=120).status_code == 200
        one_request = time.monotonic() - began
        count = min(256, max(12, math.ceil(4 * grace / one_request)))
        results: list = [None] * count
        threads = [_post_in_thread(f"{served.url}/v1/embeddings", {"input": texts}, results, i) for i in range(count)]
        deadline = time.monotonic() + 60
        while served.in_flight() < len(threads):  # every request is in the server before the signal
            assert time.monotonic() < deadline, "the load never got in flight"
            time.sleep(0.05)
        signalled = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        returncode = served.process.wait(grace + 30)
        exited_after = time.monotonic() - signalled
        for thread in threads:
            thread.join(30)
    finally:
        served.kill()
    log = served.log.read_text()
    assert returncode == 0, log[-3000:]
    # The forward running when the grace ends cannot be cut short, and the process then tears down: the bound is
    # the grace plus one request's forward (measured above, so a loaded machine gets its own) plus a second. A
    # server that ignored the grace would finish all the work, about 4 graces' worth.
    assert exited_after < grace + one_request + 1.0, (exited_after, one_request, log[-2000:])
    statuses = []
    for response, _ in results:
        assert isinstance(response, httpx.Response), (response, log[-2000:])
        statuses.append(response.status_code)
        if response.status_code == 200:
            assert len(response.json()["data"]) == len(texts)
        else:
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "shutting_down" and response.headers["retry-after"] == "5"
    assert 200 in statuses and 503 in statuses, statuses  # more work than the grace: some finish, the rest 503
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    print(f"SIGTERM under load ({count} requests of {one_request:.2f}s each): {statuses.count(200)} finished, {statuses.count(503)} answered 503, "
          f"exit 0 after {exited_after:.2f}s (grace {grace:g}s)")


@pytest.fixture(scope="module")
def wider_bert(tmp_path_factory):
    """The tiny BERT at 128-d (4 x the width): a 2,048-text request takes seconds, long enough to measure beside."""
    from conftest import build_tiny_bert

    raw = build_tiny_bert(tmp_path_factory.mktemp("wider_raw"), hidden=128)
    folder = tmp_path_factory.mktemp("wider") / "model"
    load_model(raw, prompts={"query": "query: "}, normalize=True).save(folder)
    return folder


def test_one_text_answers_within_1s_while_a_2048_text_request_and_a_7mb_body_are_in_flight(wider_bert, tmp_path):
    served = _ServerProcess(tmp_path, ["--model", f"bert={wider_bert}", "--max-chars-per-input", "3500",
                                       "--threads", "1"])
    try:
        url = f"{served.url}/v1/embeddings"
        big = {"input": [_text(i, 30) for i in range(2048)]}  # ~45 tokens each: ~90,000 tokens to embed
        seven_mb = json.dumps({"input": [_text(i, 700)[:3450] for i in range(2048)]}).encode()  # tokenised, then 400
        assert len(seven_mb) > 7_000_000
        results: list = [None, None]
        threads = [_post_in_thread(url, big, results, 0), _post_in_thread(url, seven_mb, results, 1)]
        deadline = time.monotonic() + 60
        while served.in_flight() < 2:
            assert time.monotonic() < deadline, "the load never got in flight"
            time.sleep(0.02)
        latencies, health, both_in_flight = [], [], 0
        with httpx.Client(timeout=30) as client:
            while results[0] is None and len(latencies) < 40:  # while the 2,048-text request is being embedded
                loaded = results[1] is None
                began = time.perf_counter()
                response = client.post(url, json={"input": f"what causes fever {len(latencies)}"})
                latencies.append(time.perf_counter() - began)
                assert response.status_code == 200
                began = time.perf_counter()
                assert client.get(f"{served.url}/health").status_code == 200
                health.append(time.perf_counter() - began)
                both_in_flight += loaded and results[1] is None
                time.sleep(0.05)
        for thread in threads:
            thread.join(180)
    finally:
        served.kill()
    response, big_seconds = results[0]
    assert isinstance(response, httpx.Response) and response.status_code == 200, response
    assert len(response.json()["data"]) == 2048
    response, body_seconds = results[1]
    assert response.status_code == 400 and response.json()["error"]["code"] == "input_too_long"
    print(f"one-text latency (s) beside the load, {len(latencies)} requests ({both_in_flight} while both were in "
          f"flight): median {np.median(latencies):.3f}, p90 {np.percentile(latencies, 90):.3f}, max "
          f"{max(latencies):.3f}; /health max {max(health):.3f}; the 2,048-text request took {big_seconds:.1f}s, "
          f"the 7 MB body's 400 {body_seconds:.1f}s")
    assert len(latencies) >= 5 and both_in_flight >= 1, "too little of the measurement happened under the load"
    assert max(latencies) < 1.0 and max(health) < 1.0, (latencies, health)
