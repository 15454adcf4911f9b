"""`eval` and `compare` commands through typer's CliRunner: exit codes and one-line errors.

The commands are mounted on a small typer app here, exactly as embedkit/cli.py registers them; the model
loader is replaced by the fake encoder so these tests stay fast (the real model is covered by the
integration tests).
"""

from __future__ import annotations

import json

import pytest
import typer
from test_eval_support import FakeEncoder, write_beir, write_sts
from typer.testing import CliRunner

import embedkit.models
from embedkit.eval.cli import compare_command, eval_command

app = typer.Typer()
app.command("eval")(eval_command)
app.command("compare")(compare_command)


@pytest.fixture()
def runner():
    return CliRunner()


@pytest.fixture(autouse=True)
def fake_models(monkeypatch, tmp_path):
    models = {"good": FakeEncoder(name="good"), "bad": FakeEncoder(name="bad", noise=0.9)}
    monkeypatch.setattr(embedkit.models, "load_model", lambda name, **kw: models[name])
    monkeypatch.setenv("EMBEDKIT_HOME", str(tmp_path / "home"))


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_eval_writes_report_and_markdown(runner, tmp_path):
    beir = write_beir(tmp_path / "tiny")
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", "-m", "good", "-t", f"beir:{beir}", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "tiny-test" in result.stdout and "ndcg_at_10" in result.stdout
    assert json.loads(out.read_text())["results"]["tiny-test"]["metrics"]["recall_at_10"] == 1.0
    assert out.with_suffix(".md").exists()


def test_unparseable_task_spec_is_one_line_error(runner, tmp_path):
    result = runner.invoke(app, ["eval", "-m", "good", "-t", "bogus:thing", "-o", str(tmp_path / "r.json")])
    assert result.exit_code == 2
    assert "bogus:thing" in _error_line(result)


def test_qrels_with_unknown_document_is_one_line_error(runner, tmp_path):
    beir = write_beir(tmp_path / "bad", unknown_doc_in_qrels=True)
    result = runner.invoke(app, ["eval", "-m", "good", "-t", f"beir:{beir}", "-o", str(tmp_path / "r.json"), "-q"])
    assert result.exit_code == 2
    line = _error_line(result)
    assert "qrels/test.tsv:22" in line and "corpus-id" in line and "no-such-doc" in line
    assert not (tmp_path / "r.json").exists()


def test_sts_file_without_scores_is_one_line_error(runner, tmp_path):
    sts = write_sts(tmp_path / "d" / "pairs.jsonl", with_scores=False)
    result = runner.invoke(app, ["eval", "-m", "good", "-t", f"sts:{sts}", "-o", str(tmp_path / "r.json"), "-q"])
    assert result.exit_code == 2
    assert "pairs.jsonl:1: field 'score'" in _error_line(result)


def test_compare_exit_codes(runner, tmp_path):
    beir = write_beir(tmp_path / "tiny")
    sts = write_sts(tmp_path / "d" / "pairs.jsonl", n=120)
    # same folder and file names, hence the same task name "d-pairs", but other pairs
    other_sts = write_sts(tmp_path / "elsewhere" / "d" / "pairs.jsonl", n=100)
    reports = {}
    for name, model, sts_file in [("base", "good", sts), ("again", "good", sts), ("worse", "bad", sts),
                                  ("other", "good", other_sts)]:
        out = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["eval", "-m", model, "-t", f"beir:{beir}", "-t", f"sts:{sts_file}",
                                     "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
        reports[name] = out

    def gate(candidate):
        return runner.invoke(app, ["compare", "-b", str(reports["base"]), "-c", str(reports[candidate]),
                                   "--resamples", "500"])

    same = gate("again")
    assert same.exit_code == 0, same.output
    worse = gate("worse")
    assert worse.exit_code == 1, worse.output
    assert "REGRESSION" in worse.stdout and "randomization" in worse.stdout and "bootstrap" in worse.stdout
    different = gate("other")
    assert different.exit_code == 2 and "different data" in different.stdout

    plot = tmp_path / "cmp.png"
    cmp_json = tmp_path / "cmp.json"
    result = runner.invoke(app, ["compare", "-b", str(reports["base"]), "-c", str(reports["worse"]),
                                 "--plot", str(plot), "-o", str(cmp_json), "--resamples", "500"])
    assert result.exit_code == 1 and plot.stat().st_size > 0
    assert json.loads(cmp_json.read_text())["exit_code"] == 1


def test_compare_missing_report_is_one_line_error(runner, tmp_path):
    result = runner.invoke(app, ["compare", "-b", str(tmp_path / "nope.json"), "-c", str(tmp_path / "nope.json")])
    assert result.exit_code == 2
    assert "nope.json" in _error_line(result)
