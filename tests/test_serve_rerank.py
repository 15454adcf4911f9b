"""`embedkit serve --rerank`: POST /v1/rerank (and /rerank) scores (query, document) pairs with a cross-encoder,
through the server's micro-batching, with the same scores as `Reranker.score` (issue #31)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from embedkit.errors import ConfigError, ModelError
from embedkit.models import load_model
from embedkit.models.reranker import RERANK_PROBES_NAME, Reranker, load_reranker
from embedkit.serve.app import ServeSettings, create_app
from embedkit.serve.backends import TorchBackend, TorchRerankBackend
from embedkit.serve.server import load_rerankers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = {"Authorization": "Bearer sekret"}
QUERY = "what is diabetes"
DOCUMENTS = ["a", "diabetes is a disease of high blood sugar", "insulin lowers the level of glucose in the blood",
             "the court ruled that the contract was void", "fever", "how is asthma treated in children"]
MEDIUM = "symptoms of flu include fever aches and fatigue " * 6  # ~50 tokens: over 48 tokens, under 960 characters
LONG = "the quick brown fox jumps over the lazy dog " * 40  # 1,760 characters: over the 960-character limit too


@pytest.fixture(scope="module")
def rerank_folder(tmp_path_factory, tiny_bert_dir) -> Path:
    """The tiny BERT with a one-logit head (max_length 48), its weights shaken so that documents get clearly
    different scores (an untrained tiny head scores every pair within 1e-5: a swapped result would pass)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reranker = Reranker.from_pretrained(tiny_bert_dir, max_length=48, start=True)
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in reranker.backbone.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=noise))
    reranker.invalidate_fingerprint()
    folder = tmp_path_factory.mktemp("serve_rerank") / "reranker"
    reranker.save(folder)  # with rerank_probes.json and the fingerprint in the manifest
    return folder


@pytest.fixture(scope="module")
def reranker(rerank_folder):
    """The in-process reference: what `Reranker.score` gives."""
    return load_reranker(rerank_folder)


@pytest.fixture(scope="module")
def client(rerank_folder, st_bert):
    """An embedding model ("bert") beside a reranker ("rr", loaded and probe-checked as --rerank loads it), an API
    key and a small --max-inputs."""
    torch.set_num_threads(1)
    rerankers = load_rerankers([f"rr={rerank_folder}"])
    app = create_app({"bert": TorchBackend(load_model(st_bert), name="bert")},
                     ServeSettings(api_keys=("sekret",), max_inputs=8), rerankers=rerankers)
    with TestClient(app) as running:
        yield running


def _rerank(client, body, *, headers=KEY, path="/v1/rerank"):
    return client.post(path, json=body, headers=headers)


def _error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and "\n" not in error["message"], error
    return error


# ---------------------------------------------------------------------------------------------------- answers
def test_results_are_reranker_scores_best_first(client, reranker):
    """Bug caught: the server scores pairs differently from `Reranker.score` (another tokenization, no sigmoid, the
    logit), sorts worst first or by index, loses the documents' indices, or counts tokens it did not score."""
    documents = DOCUMENTS[:3] + [{"text": text} for text in DOCUMENTS[3:]]  # Cohere's and Jina's shapes, mixed
    response = _rerank(client, {"model": "rr", "query": QUERY, "documents": documents})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reranker.score([QUERY] * len(DOCUMENTS), DOCUMENTS)
    assert body["model"] == "rr" and body["id"].startswith("rerank-")
    order = sorted(range(len(DOCUMENTS)), key=lambda i: (-expected[i], i))
    assert [r["index"] for r in body["results"]] == order
    got = np.array([r["relevance_score"] for r in body["results"]])
    assert np.allclose(got, expected[order], atol=1e-5)
    assert all(0.0 < s < 1.0 for s in got) and list(got) == sorted(got, reverse=True)
    assert all(set(r) == {"index", "relevance_score"} for r in body["results"])  # return_documents: false
    ids, _ = reranker.pair_ids([QUERY] * len(DOCUMENTS), DOCUMENTS)
    assert body["usage"] == {"total_tokens": sum(len(x) for x in ids)}
    alias = _rerank(client, {"query": QUERY, "documents": documents}, path="/rerank")  # one reranker: no model
    assert [r["index"] for r in alias.json()["results"]] == order


def test_top_n_and_return_documents(client, reranker):
    """Bug caught: top_n cuts before sorting (the first N documents, not the best N), top_n over the count fails,
    or return_documents returns another document's text (or the object instead of its text)."""
    documents = [DOCUMENTS[0], {"text": DOCUMENTS[1], "id": "ignored"}] + DOCUMENTS[2:]
    full = _rerank(client, {"query": QUERY, "documents": documents}).json()["results"]
    top = _rerank(client, {"query": QUERY, "documents": documents, "top_n": 2, "return_documents": True}).json()
    assert [r["index"] for r in top["results"]] == [r["index"] for r in full[:2]]
    assert all(r["document"] == {"text": DOCUMENTS[r["index"]]} for r in top["results"])
    everything = _rerank(client, {"query": QUERY, "documents": documents, "top_n": 100}).json()["results"]
    assert [r["index"] for r in everything] == [r["index"] for r in full]
    equal = _rerank(client, {"query": QUERY, "documents": ["fever", "a", "fever"]}).json()["results"]
    assert [r["index"] for r in equal if r["index"] != 1] == [0, 2]  # a tie keeps the earlier document first


def test_long_pairs_are_cut_like_reranker_score_unless_truncate_false(client, reranker):
    """Bug caught: a pair over the token limit is refused although truncate defaults to true, is cut otherwise than
    `Reranker.pair_ids` cuts it (the query first, or the character pre-cut changing the tokens), or, with
    truncate=false, is scored anyway or refused without naming the limit and the document."""
    spaced = "diabetes " + " " * 1200 + "insulin lowers the level of glucose in the blood " * 3  # words after 960 chars
    documents = ["fever", MEDIUM, LONG, spaced]
    body = _rerank(client, {"query": QUERY, "documents": documents}).json()
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    expected = reranker.score([QUERY] * len(documents), documents)
    assert np.allclose([got[i] for i in range(len(documents))], expected, atol=1e-5)
    ids, _ = reranker.pair_ids([QUERY] * len(documents), documents)
    assert [len(x) for x in ids][1:3] == [48, 48]  # cut longest side first: the short query is whole
    assert body["usage"]["total_tokens"] == sum(len(x) for x in ids)

    error = _error(_rerank(client, {"query": QUERY, "documents": ["fever", MEDIUM], "truncate": False}), 413,
                   "pair_too_long")
    assert "documents[1]" in error["message"] and "48 tokens" in error["message"] and error["param"] == "documents"
    error = _error(_rerank(client, {"query": QUERY, "documents": ["fever", "a", LONG], "truncate": False}), 413,
                   "pair_too_long")
    assert "documents[2]" in error["message"] and "48 tokens" in error["message"]
    error = _error(_rerank(client, {"query": LONG, "documents": ["fever"], "truncate": False}), 413, "pair_too_long")
    assert error["param"] == "query"
    assert _rerank(client, {"query": QUERY, "documents": ["fever"], "truncate": False}).status_code == 200


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("body, status, code", [
    ({"query": QUERY, "documents": []}, 400, "empty_input"),
    ({"query": QUERY, "documents": ["x"] * 9}, 400, "too_many_inputs"),
    ({"model": "bert", "query": QUERY, "documents": ["x"]}, 400, "wrong_model_kind"),
    ({"model": "nope", "query": QUERY, "documents": ["x"]}, 404, "model_not_found"),
    ({"query": QUERY}, 422, "invalid_body"),
    ({"documents": ["x"]}, 422, "invalid_body"),
    ({"query": QUERY, "documents": [1, 2]}, 422, "invalid_body"),
    ({"query": QUERY, "documents": [{"title": "no text"}]}, 422, "invalid_body"),
    ({"query": QUERY, "documents": ["x"], "top_n": 0}, 422, "invalid_body"),
    ({"query": ["a", "b"], "documents": ["x"]}, 422, "invalid_body"),
])
def test_client_errors_are_one_line_4xx(client, body, status, code):
    """Bug caught: an empty list, too many documents, a wrong type or an embedding model reaches the reranker (a
    500, or scores from the wrong model) instead of one JSON line naming the field."""
    error = _error(_rerank(client, body), status, code)
    if code in ("empty_input", "too_many_inputs"):
        assert error["param"] == "documents" and "documents" in error["message"]


def test_models_of_the_other_kind_are_400_naming_both_kinds(client):
    """Bug caught: /v1/rerank naming an embedding model (or /v1/embeddings naming a reranker) runs it anyway, or
    answers 404 as if the name were unknown."""
    message = _error(_rerank(client, {"model": "bert", "query": QUERY, "documents": ["x"]}), 400,
                     "wrong_model_kind")["message"]
    assert "embedding model" in message and "reranker" in message and "/v1/embeddings" in message
    response = client.post("/v1/embeddings", json={"model": "rr", "input": "x"}, headers=KEY)
    message = _error(response, 400, "wrong_model_kind")["message"]
    assert "embedding model" in message and "reranker" in message and "/v1/rerank" in message
    assert client.post("/v1/embeddings", json={"input": "x"}, headers=KEY).status_code == 200  # one embedding model


def test_invalid_unicode_is_400(client):
    """Bug caught: a lone UTF-16 surrogate (valid JSON, not Unicode) reaches the tokenizer: a 500."""
    for field, raw in (("query", '{"query": "\\ud800", "documents": ["x"]}'),
                       ("documents", '{"query": "q", "documents": ["x", "a\\udcff"]}')):
        response = client.post("/v1/rerank", content=raw.encode(), headers={**KEY, "Content-Type": "application/json"})
        assert _error(response, 400, "invalid_text")["param"] == field


def test_api_key_is_required(client):
    """Bug caught: the rerank endpoints (or their alias) skip the API key check that /v1/embeddings has."""
    body = {"query": QUERY, "documents": ["x"]}
    for path in ("/v1/rerank", "/rerank"):
        _error(_rerank(client, body, headers={}, path=path), 401, "invalid_api_key")
        response = _rerank(client, body, headers={"Authorization": "Bearer wrong"}, path=path)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


def test_models_health_and_metrics_show_the_reranker(client):
    """Bug caught: a reranker missing from /v1/models (or listed without its kind), /health or /metrics, or rerank
    requests and pairs not counted."""
    models = {m["id"]: m for m in client.get("/v1/models", headers=KEY).json()["data"]}
    assert models["rr"]["kind"] == "reranker" and models["rr"]["max_length"] == 48
    assert models["bert"]["kind"] == "embedding"
    health = client.get("/health").json()
    assert health["status"] == "ok" and set(health["models"]) == {"bert", "rr"} and "rr" in health["queue_depth"]
    _rerank(client, {"query": QUERY, "documents": DOCUMENTS[:3]})
    text = client.get("/metrics").text
    assert 'embedkit_http_requests_total{route="/v1/rerank",status="200"}' in text
    pairs = [line for line in text.splitlines() if line.startswith('embedkit_rerank_pairs_total{model="rr"}')]
    assert pairs and float(pairs[0].split()[-1]) >= 3
    assert 'embedkit_rerank_requests_total{model="rr"}' in text and 'embedkit_batch_rows_count{model="rr"}' in text


# ---------------------------------------------------------------------------------------------------- batching
def test_concurrent_requests_share_a_forward_and_scores_do_not_depend_on_it(rerank_folder, reranker):
    """Bug caught: pairs of concurrent requests are scored one request at a time (no micro-batching), rows come back
    to the wrong request, or padding leaks into a pair's score (wrong mask or type ids): a pair scores differently
    beside longer pairs of other requests than alone."""
    backend = TorchRerankBackend(load_reranker(rerank_folder), name="rr")
    calls: list[int] = []
    started, release = threading.Event(), threading.Event()
    original = backend.score_ids

    def held(pairs, **kwargs):  # the first call holds the model until the others have queued: no timing race
        calls.append(len(pairs))
        started.set()
        release.wait(30)
        return original(pairs, **kwargs)

    backend.score_ids = held  # type: ignore[method-assign]
    requests = {"first": ("fever", ["a"]),
                "b": (QUERY, ["diabetes is a disease of high blood sugar", "a"]),
                "c": ("how is asthma treated", ["how is asthma treated in children", "the court ruled"]),
                "d": ("what causes high blood pressure in adults",
                      ["interest rates rose by half a percent this quarter", "fever"])}
    answers: dict[str, dict] = {}
    app = create_app({}, ServeSettings(), rerankers={"rr": backend})
    with TestClient(app) as running:
        def post(name):
            query, documents = requests[name]
            answers[name] = running.post("/v1/rerank", json={"query": query, "documents": documents}).json()

        threads = {name: threading.Thread(target=post, args=(name,)) for name in requests}
        threads["first"].start()
        assert started.wait(30)  # "first" is in the model; the other three can only queue behind it
        for name in ("b", "c", "d"):
            threads[name].start()
        batcher = app.state.rerankers["rr"].batcher
        for _ in range(3000):
            if batcher.queue_depth == 3:
                break
            threading.Event().wait(0.01)
        assert batcher.queue_depth == 3
        release.set()
        for thread in threads.values():
            thread.join(30)
    assert calls == [1, 6]  # the three queued requests' six pairs: one forward
    for name, (query, documents) in requests.items():
        got = {r["index"]: r["relevance_score"] for r in answers[name]["results"]}
        alone = [float(reranker.score([query], [document])[0]) for document in documents]
        assert np.allclose([got[i] for i in range(len(documents))], alone, atol=1e-5), name


# ---------------------------------------------------------------------------------------------------- loading
def test_load_checks_kind_names_and_probe_scores(rerank_folder, st_bert, tmp_path, reranker):
    """Bug caught: --rerank serves an embedding model (a random head), two models under one name, or a reranker whose
    weights no longer give the probe scores it was saved with."""
    with pytest.raises(ModelError) as info:
        load_rerankers([str(st_bert)])
    assert "embedding model" in str(info.value) and "not a reranker" in str(info.value)
    with pytest.raises(ConfigError, match="NAME=PATH"):
        load_rerankers([f"x={rerank_folder}"], taken=["x"])
    changed = tmp_path / "changed"
    reranker.save(changed)
    probes = json.loads((changed / RERANK_PROBES_NAME).read_text())
    probes["logits"] = [x + 0.01 for x in probes["logits"]]  # what other weights (or tokenizer) would score
    (changed / RERANK_PROBES_NAME).write_text(json.dumps(probes))
    with pytest.raises(ModelError, match="refusing to serve .*probe scores MISMATCH"):
        load_rerankers([str(changed)])
    assert "changed" in load_rerankers([str(changed)], allow_mismatch=True)


def test_serve_cli_takes_rerank(tmp_path):
    """Bug caught: `embedkit serve` still requires --model (a reranker cannot be served alone), lacks --rerank in
    its help, or hands --rerank to vLLM, which cannot score pairs."""
    import typer
    from typer.testing import CliRunner

    from embedkit.serve.cli import serve_command

    app = typer.Typer()
    app.command()(serve_command)
    runner = CliRunner()
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0 and "--rerank" in result.output
    result = runner.invoke(app, [])
    assert isinstance(result.exception, ConfigError) and "--rerank" in str(result.exception)
    result = runner.invoke(app, ["--engine", "vllm", "--model", str(tmp_path), "--rerank", str(tmp_path)])
    assert isinstance(result.exception, ConfigError) and "--engine vllm" in str(result.exception)
