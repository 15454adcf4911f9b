"""The main job (embedkit demo) end to end on a tiny model: every stage runs and the numbers agree with each other."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedkit.pipeline import DemoSettings, run_demo, summary_rows


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_bert_dir):
    workdir = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(model=str(tiny_bert_dir), max_pairs=48, batch_size=16, lr=1e-3, quantize=None,
                            rag_queries=2, threads=1)
    return run_demo(workdir, settings=settings)


def test_every_stage_leaves_its_output(demo):
    w = demo.workdir
    for name in ("train_pairs.jsonl", "mined.jsonl", "eval_base.json", "eval_tuned.json", "compare.json",
                 "summary.md", "summary.json", "summary.png", "model/embedkit_manifest.json",
                 "onnx/embedkit_manifest.json", "rag-index/embedkit_manifest.json"):
        assert (w / name).is_file(), name
    assert [t.name for t in demo.timings] == ["load", "data", "mine", "eval before", "train", "eval after", "export",
                                              "serve", "rag"]
    assert (w / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mined_tuples_feed_training(demo):
    rows = [json.loads(line) for line in (demo.workdir / "mined.jsonl").read_text().splitlines()]
    assert len(rows) == 48 == demo.training["samples"]
    for row in rows:
        assert row["positive"] not in row["negatives"]  # a known positive is never a negative


def test_summary_rows_come_from_the_two_reports(demo):
    base = json.loads(demo.base_report.read_text())
    tuned = json.loads(demo.tuned_report.read_text())
    rows = summary_rows(base, tuned, demo.comparison["improvement"])
    assert rows == demo.rows
    for row in rows:
        assert row["change"] == pytest.approx(row["after"] - row["before"])
    assert {r["task"] for r in rows} == {"stsb", "stsb-paraphrase"}
    # training changed the model: the tuned scores differ from the base ones
    assert any(abs(r["change"]) > 1e-6 for r in rows)


def test_rag_index_reproduces_the_eval_runner(demo):
    """The RAG index (exact search) over the same corpus must give the eval runner's nDCG@10 for the same model."""
    tuned = json.loads(demo.tuned_report.read_text())
    expected = tuned["results"]["stsb-paraphrase"]["metrics"]["ndcg_at_10"]
    assert demo.rag["eval"]["metrics"]["ndcg_at_10"] == pytest.approx(expected, abs=1e-6)
    assert len(demo.rag["examples"]) == 2 and all(len(e["hits"]) == 3 for e in demo.rag["examples"])


def test_served_vectors_equal_torch(demo):
    assert demo.serve["probes_ok"]
    assert demo.serve["min_cosine_to_torch"] > 0.99999
    assert demo.export["parity"]["fp32_max_abs_diff"] < 1e-5


def test_printed_summary(demo, capsys):
    from embedkit.pipeline import render_summary

    text = render_summary(demo)
    assert "stsb-paraphrase" in text and "ndcg_at_10" in text and "rag" in text and "gate" in text
    assert np.isfinite([r["after"] for r in demo.rows]).all()
