"""Probe vectors: write/read round trip, malformed files, tolerance, and detection of altered weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedkit.errors import ModelError
from embedkit.models.probes import DEFAULT_PROBES, PROBES_NAME, check_probes, read_probes, write_probes
from embedkit.models import load_model


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir):
    return load_model(tiny_bert_dir, prompts={"query": "query: "}, normalize=True)


def test_round_trip(encoder, tmp_path):
    path = write_probes(encoder, tmp_path)
    assert path == tmp_path / PROBES_NAME
    data = read_probes(tmp_path)
    assert data["texts"] == [t for t, _ in DEFAULT_PROBES] and data["kind"] == [k for _, k in DEFAULT_PROBES]
    assert data["vectors"].shape == (len(DEFAULT_PROBES), encoder.dim)
    assert data["model_fingerprint"] == encoder.fingerprint
    # the stored vectors are the per-kind encodings (queries got the prompt)
    first_query = DEFAULT_PROBES[0][0]
    assert np.allclose(data["vectors"][0], encoder.encode([first_query], kind="query")[0], atol=1e-6)
    result = check_probes(lambda t, k: encoder.encode(list(t), kind=k), tmp_path)
    assert result.ok and result.max_abs_diff < 1e-6 and result.min_cosine > 0.99999


def test_detects_a_changed_model(encoder, tmp_path):
    write_probes(encoder, tmp_path)
    # the same weights without the query prompt: only the query probes move
    result = check_probes(lambda t, k: encoder.encode(list(t), kind="document"), tmp_path)
    assert not result.ok and result.worst_text in [t for t, k in DEFAULT_PROBES if k == "query"]
    # a tiny perturbation passes a loose tolerance and fails a tight one
    noisy = lambda t, k: encoder.encode(list(t), kind=k) + 1e-3  # noqa: E731
    assert check_probes(noisy, tmp_path, atol=1e-2).ok
    assert not check_probes(noisy, tmp_path).ok  # recorded default 1e-4
    assert "MISMATCH" in check_probes(noisy, tmp_path).summary()


@pytest.mark.parametrize("content, message", [
    ("not json", "unreadable"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"texts": ["a"], "kind": ["query"]}), "vectors"),
    (json.dumps({"texts": ["a", "b"], "kind": ["query"], "vectors": [[1.0]]}), "equal length"),
    (json.dumps({"texts": ["a"], "kind": ["passage"], "vectors": [[1.0]]}), "kinds"),
    (json.dumps({"texts": ["a", "b"], "kind": ["query", "query"], "vectors": [[1.0], [1.0, 2.0]]}), "vectors"),
    (json.dumps({"texts": [3], "kind": ["query"], "vectors": [[1.0]]}), "string"),
])
def test_malformed_files_fail_in_one_line(tmp_path, content, message):
    (tmp_path / PROBES_NAME).write_text(content)
    with pytest.raises(ModelError, match=message) as info:
        read_probes(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_file_and_wrong_dimension(encoder, tmp_path):
    with pytest.raises(ModelError, match="no probe vectors"):
        read_probes(tmp_path)
    write_probes(encoder, tmp_path)
    with pytest.raises(ModelError, match="shape"):
        check_probes(lambda t, k: np.zeros((len(t), encoder.dim + 1), dtype=np.float32), tmp_path)
