"""Fuzzing the server from its own OpenAPI spec (schemathesis, offline): no input may produce a 5xx."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedkit.models import load_model
from embedkit.serve.app import ServeSettings, create_app
from embedkit.serve.backends import TorchBackend
from embedkit.serve.server import BackgroundServer


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_bert_dir):
    folder = tmp_path_factory.mktemp("fuzz") / "model"
    load_model(tiny_bert_dir, prompts={"query": "query: "}, normalize=True).save(folder)
    backends = {"tiny": TorchBackend(load_model(folder), name="tiny")}
    app = create_app(backends, ServeSettings(api_keys=("k",), max_inputs=32, max_body_bytes=256 * 1024))
    with BackgroundServer(app) as running:
        yield running


def test_no_server_errors_from_the_spec(fuzz_server):
    """Every operation in /openapi.json, with schemathesis-generated requests (valid and invalid), key and no key.

    (schemathesis' pytest plugin does not work with pytest 9, so its strategies are driven by hypothesis directly.)
    """
    api = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/embeddings", "/v1/models", "/health", "/metrics"}
    checked = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=60 if operation.path == "/v1/embeddings" else 10, deadline=None,
                  suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            for headers in ({"Authorization": "Bearer k"}, {}):
                response = case.call(headers=headers, timeout=30)
                assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:300])
                if response.status_code >= 400:
                    assert isinstance(response.json()["error"]["message"], str)
                checked.append(response.status_code)

        run()
    assert 200 in checked and any(400 <= code < 500 for code in checked)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                     max_leaves=20)
_bodies = st.fixed_dictionaries({}, optional={
    "input": st.one_of(st.text(max_size=50), st.lists(st.text(max_size=30), max_size=40),
                       st.lists(st.integers(), max_size=5), _json),
    "model": st.one_of(st.just("tiny"), st.text(max_size=10), _json),
    "encoding_format": st.one_of(st.sampled_from(["float", "base64"]), _json),
    "dimensions": st.one_of(st.integers(min_value=-5, max_value=100), st.integers(), _json),
    "input_type": st.one_of(st.sampled_from(["query", "document"]), _json),
}) | _json


@given(body=_bodies)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_server_errors_from_random_json(fuzz_server, body):
    """Beyond the schema: arbitrary JSON values in every field (and as the whole body)."""
    response = httpx.post(f"{fuzz_server.url}/v1/embeddings", json=body, headers={"Authorization": "Bearer k"},
                          timeout=30)
    assert response.status_code < 500, (body, response.text[:300])
    assert response.status_code in (200, 400, 404, 422), (body, response.status_code)
