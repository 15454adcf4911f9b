"""embedkit mine with real models: MiniLM on a tiny BEIR folder through the command, and tiny cross-encoders as
teachers (no pretrained cross-encoder ships here): a plain sequence-classification folder built here, and the
embedkit-saved `tiny_reranker` (conftest.py), whose mined rows then train a bi-encoder by distillation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from conftest import CORPUS, _wordpiece_tokenizer

pytestmark = pytest.mark.integration


def make_beir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    docs = list(dict.fromkeys(CORPUS)) + [
        "glucose levels in the blood fall when insulin is injected",
        "asthma in children is treated with inhaled steroids",
        "type 2 diabetes is managed with diet and metformin",
        "the guitarist played a long solo at the concert",
    ]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                               for i, t in enumerate(docs)))
    queries = {"q1": "what does insulin do to blood sugar", "q2": "treatment for asthma in kids",
               "q3": "what does insulin do to blood sugar"}  # same text as q1 under another id
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\nq1\td10\t1\nq2\td7\t1\n"
                                              "q2\td11\t2\nq3\td12\t1\n")
    return root


def command_app() -> typer.Typer:
    from embedkit.mine.cli import mine_command

    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(mine_command)
    return app


def test_mine_command_with_minilm(tmp_path):
    data = make_beir(tmp_path / "beir")
    out = tmp_path / "mined.jsonl"
    result = CliRunner().invoke(command_app(), ["--model", "minilm", "--data", str(data), "--output", str(out),
                                                "--range", "0:12", "-n", "3", "--seed", "1", "--no-cache"])
    assert result.exit_code == 0, result.output
    assert "candidates in window" in result.output and "removed by known_positive" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5  # one per (query text, positive): q1+q3 merged (3 positives) and q2 (2 positives)
    positives = {"what does insulin do to blood sugar": {"d2", "d10", "d12"},
                 "treatment for asthma in kids": {"d7", "d11"}}
    for row in rows:
        assert row["positive_id"] in positives[row["query"]]
        assert not positives[row["query"]] & set(row["negative_ids"])
        assert len(row["negatives"]) == 3 and len(row["scores"]) == 4
        assert row["scores"][0] - abs(row["scores"][0]) * 0.05 >= max(row["scores"][1:]) - 1e-6
    manifest = json.loads((tmp_path / "mined.manifest.json").read_text())
    from embedkit.models import load_model

    assert manifest["model"]["fingerprint"] == load_model("minilm").fingerprint
    assert manifest["data"]["kind"] == "beir" and manifest["data"]["data_hash"]
    # A bad option is one line naming the field.
    bad = CliRunner().invoke(command_app(), ["--model", "minilm", "--data", str(data), "--output", str(out),
                                             "--range", "50:10"])
    assert bad.exit_code != 0 and "range" in str(bad.exception)


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny_ce")
    tokenizer = _wordpiece_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cross_encoder_rescoring_sets_scores_and_margins(tmp_path, tiny_cross_encoder):
    """Bug caught: a plain sentence-transformers CrossEncoder folder (no embedkit manifest) scores differently
    through embedkit's Reranker than through sentence-transformers, the window is not re-ranked by the teacher, or
    the margins are applied to the bi-encoder's scores instead of the teacher's.

    The rows' scores are the teacher's logits (TeacherRescorer: distillation needs their margins, which the sigmoid
    squashes), so sentence-transformers is asked for its logits too (activation_fn=Identity); until the switch to
    embedkit's Reranker they were sigmoid probabilities."""
    import torch
    from sentence_transformers import CrossEncoder

    from embedkit.mine import MiningSettings, load_task, mine_to_file
    from test_mine import FakeEncoder

    data = make_beir(tmp_path / "beir")
    out = tmp_path / "ce.jsonl"
    # margin_grade "all": every positive (q2 has grades 1 and 2) is in the margin's reference set
    settings = MiningSettings(range_min=0, range_max=12, num_negatives=4, sampling="top", relative_margin=None,
                              absolute_margin=0.0, margin_grade="all")
    summary = mine_to_file(FakeEncoder(), load_task(data, split="train"), out, settings,
                           teacher=tiny_cross_encoder, use_cache=False)
    assert summary["teacher"] == str(tiny_cross_encoder)
    ce = CrossEncoder(str(tiny_cross_encoder), device="cpu", activation_fn=torch.nn.Identity())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows
    for row in rows:
        expected = ce.predict([(row["query"], t) for t in [row["positive"], *row["negatives"]]])
        assert np.allclose(row["scores"], np.asarray(expected).reshape(-1), atol=1e-4)
        assert row["scores"][1:] == sorted(row["scores"][1:], reverse=True)  # "top" follows the cross-encoder
    # absolute_margin=0 against the query's lowest positive cross-encoder score:
    by_query: dict[str, list[float]] = {}
    for row in rows:
        by_query.setdefault(row["query"], []).append(row["scores"][0])
    for row in rows:
        assert all(s <= min(by_query[row["query"]]) + 1e-6 for s in row["scores"][1:])


def test_teacher_reranker_scores_rows_and_they_train_a_bi_encoder_by_distillation(
        tmp_path, st_bert, tiny_reranker, tiny_bert_dir, one_torch_thread):
    """Bug caught: `embedkit mine --teacher` writes scores that are not the teacher's (the bi-encoder's cosine, or
    probabilities where logits were promised), the manifest does not name the teacher, the older --cross-encoder
    name stops working, an embedding model is taken as a teacher, or the rows do not train with
    loss.distillation: margin_mse."""
    from embedkit.errors import ModelError
    from embedkit.models.reranker import load_reranker
    from embedkit.train.contrastive import train
    from test_train_trainer import _recipe

    data = make_beir(tmp_path / "beir")
    common = ["--model", str(st_bert), "--data", str(data), "--range", "0:12", "-n", "3", "--no-relative-margin",
              "--no-duplicate-filter", "--no-cache"]
    out = tmp_path / "mined.jsonl"
    result = CliRunner().invoke(command_app(), [*common, "--teacher", str(tiny_reranker), "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(len(row["scores"]) == 4 for row in rows)
    teacher = load_reranker(tiny_reranker)
    for row in rows:
        documents = [row["positive"], *row["negatives"]]
        logits = teacher.score([row["query"]] * len(documents), documents, logits=True)
        assert np.allclose(row["scores"], logits, atol=1e-6, rtol=0)  # rows keep 6 decimals
    manifest = json.loads((tmp_path / "mined.manifest.json").read_text())
    assert manifest["teacher"]["fingerprint"] == teacher.fingerprint and manifest["teacher"]["scores"] == "logits"
    assert manifest["model"]["fingerprint"] != teacher.fingerprint  # the bi-encoder that ranked the pool, beside it

    alias = tmp_path / "alias.jsonl"
    result = CliRunner().invoke(command_app(), [*common, "--cross-encoder", str(tiny_reranker), "--output",
                                                str(alias)])
    assert result.exit_code == 0, result.output
    assert alias.read_text() == out.read_text()
    with pytest.raises(ModelError, match="not a reranker"):
        CliRunner().invoke(command_app(), [*common, "--teacher", str(st_bert), "--output",
                                           str(tmp_path / "wrong.jsonl")], catch_exceptions=False)
    assert not (tmp_path / "wrong.jsonl").exists()

    recipe = _recipe(tiny_bert_dir, out, tmp_path / "student", loss={"hard_negatives": 3, "distillation": "margin_mse"},
                     training={"epochs": 1})
    trained = train(recipe)
    log = [json.loads(line) for line in (tmp_path / "student" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["event"] == "train"]
    assert len(steps) == 2 and all(np.isfinite(r["distillation"]) for r in steps)  # 5 rows, batches of 4
    assert np.isfinite(trained.final_loss)
