"""Runner, task specs and reports with a fake encoder: determinism, cache, search, STS, prompts, reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr
from test_eval_support import FakeEncoder, write_beir, write_sts

from embedkit.errors import ConfigError, DataError
from embedkit.eval.report import plot_reports, render_markdown, write_report
from embedkit.eval.runner import evaluate, exact_search, faiss_search
from embedkit.eval.tasks import parse_task_spec, parse_task_specs


@pytest.fixture()
def beir_dir(tmp_path):
    return write_beir(tmp_path / "tiny")


@pytest.fixture()
def sts_file(tmp_path):
    return write_sts(tmp_path / "stsdata" / "test.jsonl")


def test_parse_task_specs():
    spec = parse_task_spec("beir:some/where/scifact:dev")
    assert (spec.name, spec.type, spec.path, spec.split, spec.main_metric) == (
        "scifact-dev", "retrieval", "some/where/scifact", "dev", "ndcg_at_10")
    assert parse_task_spec("sts:data/sick/test.jsonl").name == "sick-test"
    assert parse_task_spec("stsb").type == "sts"
    assert parse_task_spec("stsb-paraphrase").type == "retrieval"
    assert parse_task_spec("mteb:SciFact").type == "mteb"
    assert [s.name for s in parse_task_specs(None)] == ["stsb", "stsb-paraphrase"]


def test_beir_spec_without_split_on_existing_folder(beir_dir):
    spec = parse_task_spec(f"beir:{beir_dir}")
    assert (spec.path, spec.split, spec.name) == (str(beir_dir), "test", "tiny-test")


@pytest.mark.parametrize("bad", ["nonsense", "bier:foo", "beir:", "sts", "what:ever:x"])
def test_unparseable_spec_is_one_line_config_error(bad):
    with pytest.raises(ConfigError) as info:
        parse_task_spec(bad)
    message = str(info.value)
    assert f"'{bad}'" in message and "\n" not in message


def test_duplicate_task_names_rejected(beir_dir):
    with pytest.raises(ConfigError, match="both name task"):
        parse_task_specs([f"beir:{beir_dir}", f"beir:{beir_dir}:test"])


def test_retrieval_uses_query_and_document_kinds_and_finds_relevant(beir_dir, tmp_path):
    enc = FakeEncoder()
    report = evaluate(enc, [f"beir:{beir_dir}"], cache_dir=tmp_path / "cache")
    kinds = {kind for kind, _ in enc.calls}
    assert kinds == {"query", "document"}
    assert ("document", 40) in enc.calls and ("query", 20) in enc.calls
    result = report["results"]["tiny-test"]
    assert result["metrics"]["recall_at_10"] == 1.0
    assert result["metrics"]["ndcg_at_10"] > 0.9
    assert set(result["per_query"]) == {f"q{i}" for i in range(20)}
    assert result["task"]["data_hash"] and result["task"]["sizes"] == {"queries": 20, "documents": 40, "judgements": 20}


def test_same_eval_twice_gives_byte_identical_results(beir_dir, sts_file, tmp_path):
    tasks = [f"beir:{beir_dir}", f"sts:{sts_file}"]
    first = evaluate(FakeEncoder(), tasks, cache_dir=tmp_path / "cache", use_cache=False)
    second = evaluate(FakeEncoder(), tasks, cache_dir=tmp_path / "cache", use_cache=False)
    assert json.dumps(first["results"]) == json.dumps(second["results"])
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_report(first, a)
    write_report(second, b)
    assert json.loads(a.read_text())["results"] == json.loads(b.read_text())["results"]


def test_corpus_embeddings_are_cached_per_model(beir_dir, tmp_path):
    cache = tmp_path / "cache"
    first_enc = FakeEncoder()
    first = evaluate(first_enc, [f"beir:{beir_dir}"], cache_dir=cache)
    assert first["timings"]["tasks"]["tiny-test"]["documents_from_cache"] is False
    files = list((cache / "embeddings").glob("*.npy"))
    assert len(files) == 1 and np.load(files[0], allow_pickle=False).shape == (40, 32)

    again = FakeEncoder()
    second = evaluate(again, [f"beir:{beir_dir}"], cache_dir=cache)
    assert second["timings"]["tasks"]["tiny-test"]["documents_from_cache"] is True
    assert [kind for kind, _ in again.calls] == ["query"]  # documents came from the cache
    assert json.dumps(first["results"]) == json.dumps(second["results"])

    # another model (other fingerprint) or other prompts must not reuse those embeddings
    evaluate(FakeEncoder(noise=0.5), [f"beir:{beir_dir}"], cache_dir=cache)
    evaluate(FakeEncoder(prompts={"document": "passage: "}), [f"beir:{beir_dir}"], cache_dir=cache)
    assert len(list((cache / "embeddings").glob("*.npy"))) == 3


def test_exact_and_faiss_search_agree_and_break_ties_by_doc_id():
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((500, 16)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    docs[7] = docs[3]  # an exact tie
    queries = np.vstack([docs[3], rng.standard_normal((9, 16)).astype(np.float32)])
    doc_ids = [f"d{i:03d}" for i in range(500)]
    query_ids = [f"q{i}" for i in range(10)]
    exact = exact_search(queries, docs, query_ids, doc_ids, 100)
    approx = faiss_search(queries, docs, query_ids, doc_ids, 100)
    for qid in query_ids:
        assert list(exact[qid]) == list(approx[qid])[: len(exact[qid])] or set(exact[qid]) == set(approx[qid])
        assert len(exact[qid]) == 100
    assert list(exact["q0"])[:2] == ["d007", "d003"]  # tied: larger doc id first, as trec_eval


def test_sts_spearman_equals_independent_scipy(sts_file, tmp_path):
    enc = FakeEncoder()
    report = evaluate(enc, [f"sts:{sts_file}"], cache_dir=tmp_path)
    rows = [json.loads(line) for line in sts_file.read_text().splitlines()]
    a = enc.encode([r["sentence1"] for r in rows], kind="query").astype(np.float64)
    b = enc.encode([r["sentence2"] for r in rows], kind="query").astype(np.float64)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    expected = spearmanr([r["score"] for r in rows], cosine).statistic
    result = report["results"]["stsdata-test"]
    assert result["metrics"]["cosine_spearman"] == pytest.approx(expected, abs=1e-6)
    assert result["metrics"]["cosine_spearman"] > 0.8
    assert len(result["per_pair"]["predicted"]) == len(rows)


def test_bad_inputs_raise_data_errors_naming_file_and_line(tmp_path):
    bad_beir = write_beir(tmp_path / "bad", unknown_doc_in_qrels=True)
    with pytest.raises(DataError) as info:
        evaluate(FakeEncoder(), [f"beir:{bad_beir}"], cache_dir=tmp_path)
    assert "test.tsv:22" in str(info.value) and "no-such-doc" in str(info.value)
    no_scores = write_sts(tmp_path / "x" / "noscore.jsonl", with_scores=False)
    with pytest.raises(DataError, match="noscore.jsonl:1: field 'score'"):
        evaluate(FakeEncoder(), [f"sts:{no_scores}"], cache_dir=tmp_path)


def test_report_manifest_markdown_and_plot(beir_dir, sts_file, tmp_path):
    report = evaluate(FakeEncoder(), [f"beir:{beir_dir}", f"sts:{sts_file}"], seed=7, cache_dir=tmp_path)
    manifest = report["manifest"]
    assert manifest["kind"] == "eval_report" and manifest["seed"] == 7
    assert manifest["model"]["fingerprint"] == FakeEncoder().fingerprint
    assert "library_versions" in manifest and "command_line" in manifest
    assert manifest["data"]["tiny-test"]["data_hash"] == report["results"]["tiny-test"]["task"]["data_hash"]
    json_path, md_path = write_report(report, tmp_path / "out" / "r.json")
    assert md_path.name == "r.md" and "| tiny-test | retrieval | ndcg_at_10 |" in md_path.read_text()
    assert render_markdown(report).startswith("# Eval report: fake")
    worse = evaluate(FakeEncoder(noise=0.7), [f"beir:{beir_dir}", f"sts:{sts_file}"], cache_dir=tmp_path)
    png = plot_reports([("base", report), ("worse", worse)], tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_invalid_settings_are_config_errors(beir_dir, tmp_path):
    with pytest.raises(ConfigError, match="top_k"):
        evaluate(FakeEncoder(), [f"beir:{beir_dir}"], top_k=10, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="search"):
        evaluate(FakeEncoder(), [f"beir:{beir_dir}"], search="annoy", cache_dir=tmp_path)
