"""ONNX export of a reranker (cross-encoder): the fp32 graph scores as torch does, int8 is checked by ranking
agreement and reported, a pair scores the same alone and in a batch, a failed check writes nothing and exits 3 in
one line, and each kind of export refuses the other kind in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from embedkit.errors import ConfigError, ModelError
from embedkit.export.checkset import builtin_check_set, check_pairs, mrr_of_pairs
from embedkit.export.onnx import FP32_GRAPH, INT8_GRAPH, ONNX_CONFIG_NAME, ExportError, OnnxEncoder, export_onnx
from embedkit.export.onnx_rerank import (INT8_MIN_SPEARMAN, INT8_MIN_TOP1_AGREEMENT, RERANK_FP32_MAX_ABS_DIFF,
                                         OnnxReranker, export_onnx_reranker, ranking_agreement)
from embedkit.manifest import MANIFEST_NAME
from embedkit.models.probes import BATCH_INVARIANCE_ATOL
from embedkit.models.registry import model_kind
from embedkit.models.reranker import check_rerank_probes, load_reranker

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONG = "the quick brown fox jumps over the lazy dog " * 40  # far beyond max_length (48): both sides are cut
QUERIES = ["what is diabetes", "who is playing a guitar", "asthma in children", "a", LONG, "fever"]
DOCUMENTS = ["diabetes is a disease of high blood sugar", LONG, "how is asthma treated in children", "a",
             "the court ruled", ""]


@pytest.fixture(scope="module")
def typed_reranker(tmp_path_factory, tiny_bert_dir):
    """The tiny reranker with a tokenizer that gives token type ids (0 query, 1 document), as BERT's and MiniLM's
    do; the plain tiny tokenizer gives none, so `tiny_reranker` covers the two-input graph."""
    import torch

    from embedkit.models.reranker import Reranker

    base = tmp_path_factory.mktemp("typed_bert") / "bert"
    shutil.copytree(tiny_bert_dir, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    folder = base.parent / "reranker"
    Reranker.from_pretrained(base, max_length=48, start=True).save(folder)
    return folder


# The tiny random-weight reranker's logits differ by ~3e-5 (sd) between candidates, and int8 rounding moves them by
# ~1.5e-5, so its top-1 flips between near-ties (here 2 of 40 queries, margins < 1e-6), and CPUs whose int8 kernels
# round the float steps differently could flip one or two more: its top-1 bound is looser than the real one (0.9).
TINY_MIN_TOP1_AGREEMENT = 0.8


@pytest.fixture(scope="module")
def rerank_export(tmp_path_factory, typed_reranker):
    out = tmp_path_factory.mktemp("rerank_exports") / "onnx"
    return out, export_onnx_reranker(typed_reranker, out, quantize="int8", min_top1_agreement=TINY_MIN_TOP1_AGREEMENT)


def test_fp32_graph_scores_pairs_as_torch_does(rerank_export, typed_reranker):
    """Bug caught: the ONNX path scores a pair differently from torch: a graph traced without the padded-attention
    path, token type ids dropped, another truncation of long pairs, or logits returned where probabilities are due."""
    out, manifest = rerank_export
    assert manifest["parity"]["fp32_max_abs_diff"] < RERANK_FP32_MAX_ABS_DIFF == 1e-4
    torch_reranker = load_reranker(typed_reranker)
    fp32 = OnnxReranker(out, variant="fp32")
    assert fp32.uses_type_ids and torch_reranker.uses_type_ids and fp32.max_length == torch_reranker.max_length == 48
    expected = torch_reranker.score(QUERIES, DOCUMENTS, logits=True)
    for batch_size in (1, 4, 32):  # alone, padded batches, one batch
        got = fp32.score(QUERIES, DOCUMENTS, batch_size=batch_size, logits=True)
        assert np.abs(got - expected).max() < 1e-5
    assert np.abs(fp32.score(QUERIES, DOCUMENTS) - torch_reranker.score(QUERIES, DOCUMENTS)).max() < 1e-6
    assert fp32.pair_ids(QUERIES, DOCUMENTS) == torch_reranker.pair_ids(QUERIES, DOCUMENTS)
    assert fp32.score([], [], logits=True).shape == (0,)
    import onnx

    graph = onnx.load(str(out / FP32_GRAPH)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all([d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "sequence"] for i in graph.input)
    assert [o.name for o in graph.output] == ["logits"]
    assert [d.dim_param for d in graph.output[0].type.tensor_type.shape.dim] == ["batch"]


def test_int8_export_reports_ranking_agreement_and_what_it_came_from(rerank_export, typed_reranker):
    """Bug caught: an int8 export that is not checked against torch's ranking, or whose folder does not say which
    reranker it was made from (no fingerprint, no configs: `model_kind` would not know it is a reranker)."""
    out, manifest = rerank_export
    parity = manifest["parity"]
    assert parity["passed"] and parity["check_set"] == "builtin-40" and parity["check_set_pairs"] == 40 * 8
    assert parity["int8_top1_agreement_bound"] == TINY_MIN_TOP1_AGREEMENT < INT8_MIN_TOP1_AGREEMENT == 0.9
    assert parity["int8_spearman_bound"] == INT8_MIN_SPEARMAN == 0.99
    assert parity["int8_top1_agreement"] >= TINY_MIN_TOP1_AGREEMENT and parity["int8_spearman"] >= INT8_MIN_SPEARMAN
    assert 0 < parity["mrr_torch"] <= 1 and 0 < parity["mrr_int8"] <= 1
    assert json.loads((out / MANIFEST_NAME).read_text())["parity"] == parity
    source = load_reranker(typed_reranker)
    assert manifest["model"]["fingerprint"] == source.fingerprint and manifest["model"]["kind"] == "cross-encoder"
    config = json.loads((out / ONNX_CONFIG_NAME).read_text())
    assert config["kind"] == "reranker" and config["default_variant"] == "int8"
    assert config["fingerprint"] == source.fingerprint
    assert model_kind(out) == "reranker" and (out / "tokenizer.json").is_file()
    # recompute the agreement independently of the exporter, on the same check pairs
    pairs = check_pairs(builtin_check_set())
    int8 = OnnxReranker(out)
    assert int8.variant == "int8"
    assert int8.fingerprint == f"{source.fingerprint}:int8:{int8.graph_sha256()[:16]}"  # the graph's own hash in it
    reference = source.score(pairs.queries, pairs.documents, logits=True)
    got = int8.score(pairs.queries, pairs.documents, logits=True)
    assert ranking_agreement(reference, got, pairs.groups)["spearman"] == pytest.approx(parity["int8_spearman"])
    assert np.abs(got - reference).max() > 0  # it really is another (quantised) graph
    assert (out / INT8_GRAPH).stat().st_size < (out / FP32_GRAPH).stat().st_size
    # the folder's probe scores are the int8 graph's, and it reproduces them
    assert check_rerank_probes(lambda q, d: int8.score(q, d, logits=True), out)["ok"]


def test_a_pair_scores_the_same_alone_and_in_a_batch(rerank_export):
    """Bug caught: the served int8 graph lets a pair's logit depend on the other pairs of its batch (one activation
    scale per batch, as onnxruntime's dynamic quantisation has) or on their padding."""
    out, manifest = rerank_export
    assert manifest["parity"]["batch_invariance_graph"] == "int8"
    assert manifest["parity"]["batch_invariance_max_abs_diff"] <= BATCH_INVARIANCE_ATOL
    int8 = OnnxReranker(out)
    together = int8.score(QUERIES, DOCUMENTS, batch_size=len(QUERIES), logits=True)
    alone = np.array([int8.score([q], [d], logits=True)[0] for q, d in zip(QUERIES, DOCUMENTS)])
    assert np.abs(together - alone).max() <= BATCH_INVARIANCE_ATOL


def test_ranking_agreement_is_per_query_top1_and_spearman_of_ranks():
    """Bug caught: top-1 compared over all pairs instead of per query, or Spearman computed on the raw values
    (Pearson), which a monotone but non-linear change of the logits would lower."""
    reference = np.array([3.0, 1.0, 2.0, 0.5, 0.4, 0.3])
    groups = [[0, 1, 2], [3, 4, 5]]
    cubed = ranking_agreement(reference, reference ** 3, groups)
    assert cubed == pytest.approx({"top1_agreement": 1.0, "spearman": 1.0})
    swapped = reference.copy()
    swapped[[3, 4]] = swapped[[4, 3]]  # the second query's top-1 changes
    result = ranking_agreement(reference, swapped, groups)
    assert result["top1_agreement"] == 0.5 and 0.9 < result["spearman"] < 1.0
    ties = ranking_agreement(np.array([1.0, 1.0, 2.0]), np.array([1.0, 1.0, 2.0]), [[0, 1, 2]])
    assert ties["spearman"] == pytest.approx(1.0)


def test_check_pairs_put_each_query_with_its_document_and_distractors():
    """Bug caught: check pairs without the relevant document, or with it twice, or different on every run."""
    check = builtin_check_set()
    pairs = check_pairs(check, candidates=5)
    assert len(pairs.groups) == 40 and all(len(g) == 5 for g in pairs.groups) and set(pairs.judged) == {1}
    for group, (qid, text) in zip(pairs.groups, check.queries.items()):
        documents = [pairs.documents[i] for i in group]
        assert all(pairs.queries[i] == text for i in group)
        assert documents[0] == check.corpus[next(iter(check.qrels[qid]))] and len(set(documents)) == 5
    assert check_pairs(check, candidates=5) == pairs
    scores = np.zeros(len(pairs.documents))
    scores[[g[0] for g in pairs.groups[:20]]] = 1.0  # half the queries rank their document first
    scores[[g[1] for g in pairs.groups[20:]]] = 1.0  # the others second (the tied distractors count for it)
    assert mrr_of_pairs(pairs, scores) == pytest.approx(0.75)


def _shuffle_embedding_rows(real):
    """A quantize_int8 that then shuffles the rows of the int8 word-embedding table (a damaged graph)."""
    def damaged(src, dst, **kwargs):
        import onnx
        from onnx import numpy_helper

        counts = real(src, dst, **kwargs)
        model = onnx.load(str(dst))
        table = next(i for i in model.graph.initializer if i.name.endswith("word_embeddings.weight/q"))
        values = numpy_helper.to_array(table)
        table.CopyFrom(numpy_helper.from_array(values[np.random.default_rng(0).permutation(len(values))], table.name))
        onnx.save(model, str(dst))
        return counts

    return damaged


def test_a_damaged_int8_graph_fails_in_one_line_and_writes_nothing(tiny_reranker, tmp_path, monkeypatch, capsys):
    """Bug caught: an int8 reranker that ranks unlike torch is written anyway, or the CLI fails with a traceback
    (or exit code 0) instead of one line."""
    from embedkit.cli import main
    from embedkit.export import onnx as export_module

    monkeypatch.setattr(export_module, "quantize_int8", _shuffle_embedding_rows(export_module.quantize_int8))
    out = tmp_path / "onnx"
    with pytest.raises(SystemExit) as info:
        main(["export", "--model", str(tiny_reranker), "--output", str(out), "--quantize", "int8"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert info.value.code == 3 and len(errors) == 1
    assert "int8 graph" in errors[0] and "nothing was written" in errors[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ExportError, match="fp32 logits differ from torch"):
        export_onnx_reranker(tiny_reranker, out, max_abs_diff=0.0)
    assert not out.exists()


def test_the_cli_exports_a_reranker_and_prints_its_parity(tiny_reranker, tmp_path, capsys):
    """Bug caught: `embedkit export --format onnx` sends a reranker folder down the embedding path (a one-line
    'is a reranker' error, or worse, mean-pooled vectors)."""
    from embedkit.cli import main

    out = tmp_path / "onnx"
    with pytest.raises(SystemExit) as info:
        main(["export", "--model", str(tiny_reranker), "--output", str(out)])
    printed = capsys.readouterr().out
    assert info.value.code == 0 and "exported reranker" in printed and "fp32 max |logit diff|" in printed
    reranker = OnnxReranker(out)
    assert reranker.variant == "fp32" and not reranker.uses_type_ids  # this tokenizer gives no token type ids
    expected = load_reranker(tiny_reranker).score(QUERIES, DOCUMENTS)
    assert np.abs(reranker.score(QUERIES, DOCUMENTS) - expected).max() < 1e-6
    assert check_rerank_probes(lambda q, d: OnnxReranker(out).score(q, d, logits=True), out)["ok"]


def test_each_kind_refuses_the_other_in_one_line(rerank_export, tiny_reranker, st_bert, tmp_path):
    """Bug caught: an embedding runtime loads a reranker graph (its logits served as one-number vectors), a reranker
    runtime loads an embedding graph (or an export from before rerankers, which has no "kind"), or `--format hf`
    half-exports a cross-encoder."""
    import typer
    from typer.testing import CliRunner

    from embedkit.export.cli import export_command

    out, _ = rerank_export
    with pytest.raises(ModelError, match="is a reranker .*not an embedding model") as info:
        OnnxEncoder(out)
    assert "\n" not in str(info.value)
    older = tmp_path / "older"
    shutil.copytree(out, older)
    config = json.loads((older / ONNX_CONFIG_NAME).read_text())
    del config["kind"]  # how an embedding export looked before rerankers
    (older / ONNX_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ModelError, match="is an embedding model .*not a reranker"):
        OnnxReranker(older)
    with pytest.raises(ModelError, match="not a reranker"):
        export_onnx_reranker(st_bert, tmp_path / "x")
    with pytest.raises(ModelError, match="is a reranker"):
        export_onnx(tiny_reranker, tmp_path / "x")
    app = typer.Typer()
    app.command()(export_command)
    result = CliRunner().invoke(app, ["--model", str(tiny_reranker), "--output", str(tmp_path / "hf"),
                                      "--format", "hf"])
    assert isinstance(result.exception, ConfigError) and "already the Hugging Face layout" in str(result.exception)
    result = CliRunner().invoke(app, ["--model", str(tiny_reranker), "--output", str(tmp_path / "y"), "--adapter",
                                      str(tmp_path)])
    assert isinstance(result.exception, ConfigError) and "adapter" in str(result.exception)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "x").exists()


def test_export_refuses_a_reranker_that_changed_after_training(tiny_reranker, tmp_path):
    """Bug caught: weights altered after the reranker was saved are exported (and then pass parity against
    themselves); the reranker's own probe scores catch it."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "trained"
    shutil.copytree(tiny_reranker, folder)
    weights = load_file(folder / "model.safetensors")
    key = next(k for k in sorted(weights) if k.endswith("layer.1.output.dense.weight"))
    weights[key] = weights[key] + 0.05 * torch.randn_like(weights[key], generator=torch.Generator().manual_seed(0))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="probe scores"):
        export_onnx_reranker(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    manifest = export_onnx_reranker(folder, tmp_path / "out", allow_probe_mismatch=True)
    assert manifest["source_probes"]["ok"] is False
