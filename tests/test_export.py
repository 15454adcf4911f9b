"""Export: ONNX graph parity with torch (BERT and causal), int8 bounds and batch independence, check sets, a damaged
int8 graph fails on a real check set, failure leaves nothing, HF export + launch."""

from __future__ import annotations

import json
import logging
import shlex

import numpy as np
import pytest
import torch

from embedkit.errors import ModelError
from embedkit.export.onnx import FP32_GRAPH, INT8_GRAPH, ONNX_CONFIG_NAME, ExportError, OnnxEncoder, export_onnx
from embedkit.models.probes import BATCH_INVARIANCE_ATOL, PROBES_NAME, batch_invariance, check_probes
from embedkit.manifest import MANIFEST_NAME
from embedkit.models import load_model

TEXTS = ["what causes high blood pressure", "fever", "a man is playing a guitar on the stage tonight with friends",
         "insulin lowers the level of glucose in the blood", "", "the court ruled"]


TINY_MAX_NDCG_DROP = 0.03


@pytest.fixture(scope="module")
def st_llama(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("st_llama") / "model"
    load_model(tiny_llama_dir, prompts="instruct", normalize=True).save(folder)
    return folder


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory, st_bert):
    out = tmp_path_factory.mktemp("exports") / "bert_onnx"
    # The 0.005 nDCG bound is for real models (test_minilm_int8_export holds it). This 2-layer random-weight BERT
    # scores ~0.42 on the check set, where one swapped rank moves nDCG by ~0.005, and int8 kernels round differently
    # across CPUs (AVX2 vs VNNI), so its drop is bounded loosely here.
    manifest = export_onnx(st_bert, out, quantize="int8", max_ndcg_drop=TINY_MAX_NDCG_DROP)
    return out, manifest


@pytest.mark.parametrize("which", ["st_bert", "st_llama"])
def test_onnx_fp32_matches_torch(which, request, tmp_path):
    folder = request.getfixturevalue(which)
    out = tmp_path / "onnx"
    manifest = export_onnx(folder, out)
    assert manifest["parity"]["passed"] and manifest["parity"]["fp32_max_abs_diff"] < 1e-5
    assert json.loads((out / MANIFEST_NAME).read_text())["parity"] == manifest["parity"]
    torch_encoder = load_model(folder)
    onnx_encoder = OnnxEncoder(out)
    assert onnx_encoder.variant == "fp32" and onnx_encoder.pooling == torch_encoder.pooling
    for kind in ("query", "document"):
        expected = torch_encoder.encode(TEXTS, kind=kind, batch_size=4)
        for batch_size in (1, 3, 32):  # with and without padding in the batch
            got = onnx_encoder.encode(TEXTS, kind=kind, batch_size=batch_size)
            assert np.abs(got - expected).max() < 1e-5
    # the prompt is applied: query and document vectors differ
    assert np.abs(onnx_encoder.encode(TEXTS, "query") - onnx_encoder.encode(TEXTS, "document")).max() > 1e-3
    # the graph itself has dynamic batch and sequence axes
    import onnx

    graph = onnx.load(str(out / FP32_GRAPH)).graph
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input]
    assert dims == [["batch", "sequence"], ["batch", "sequence"]]
    assert [o.name for o in graph.output] == ["sentence_embedding"]
    # the export carries its own probes, which its graph reproduces
    assert check_probes(lambda t, k: onnx_encoder.encode(list(t), k), out).ok
    if which == "st_llama":  # last-token pooling: the saved tokenizer must still append EOS
        assert onnx_encoder.pooling == "lasttoken"
        assert onnx_encoder.token_ids(["hello there"], "document")[0][-1] == onnx_encoder.tokenizer.eos_token_id


def test_int8_export_meets_bounds(bert_export):
    out, manifest = bert_export
    parity = manifest["parity"]
    assert (out / INT8_GRAPH).is_file() and (out / FP32_GRAPH).is_file()
    assert json.loads((out / ONNX_CONFIG_NAME).read_text())["default_variant"] == "int8"
    assert parity["int8_mean_cosine"] >= 0.99 and parity["int8_min_cosine"] >= parity["int8_min_cosine_bound"] == 0.95
    assert parity["check_set"] == "builtin-40" and parity["check_set_source"] == "builtin"  # st_bert names no data
    assert parity["batch_invariance_graph"] == "int8" and parity["batch_invariance_bound"] == BATCH_INVARIANCE_ATOL
    assert parity["batch_invariance_max_abs_diff"] <= BATCH_INVARIANCE_ATOL
    assert parity["ndcg_at_10_max_drop"] == TINY_MAX_NDCG_DROP
    assert parity["ndcg_at_10_fp32"] - parity["ndcg_at_10_int8"] <= TINY_MAX_NDCG_DROP
    # recompute the cosine independently of the exporter
    fp32, int8 = OnnxEncoder(out, variant="fp32"), OnnxEncoder(out)
    a, b = fp32.encode(TEXTS * 3), int8.encode(TEXTS * 3)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() >= 0.99
    assert np.abs(a - b).max() > 0  # it really is a different (quantised) graph
    assert (out / INT8_GRAPH).stat().st_size < (out / FP32_GRAPH).stat().st_size
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / INT8_GRAPH)).graph.node}
    assert "MatMulIntegerToFloat" in ops and "DynamicQuantizeLinear" not in ops and "MatMul" in ops  # attention fp32


MIXED = ["a", "fever", "what causes high blood pressure in adults over sixty",
         "The court ruled that the contract was void because one party had been misled about the price, and the "
         "appeal was dismissed with costs after a hearing that lasted two days. " * 3,
         "insulin", "how is asthma treated in children?", "42", "the quick brown fox jumps over the lazy dog"] * 2


def test_int8_vectors_do_not_depend_on_the_batch(bert_export, tmp_path):
    """A text gets the same int8 vector alone and inside batches of 8 and 32 of other texts of other lengths (float
    rounding only); the old dynamic quantisation (one activation scale per batch) moves it by orders of magnitude more
    (on MiniLM up to 0.05; this random 32-d model has small activations, ~1e-4)."""
    out, _ = bert_export
    int8 = OnnxEncoder(out)
    one_batch = lambda t: int8.encode(t, "document", batch_size=len(t))  # noqa: E731
    per_token = batch_invariance(one_batch, MIXED)
    assert per_token <= BATCH_INVARIANCE_ATOL
    alone = np.concatenate([one_batch([t]) for t in MIXED])
    for size in (8, 32):
        for seed in range(3):
            order = np.random.default_rng(seed).permutation(len(MIXED))[:size]
            batch = one_batch([MIXED[i] for i in np.resize(order, size)])
            assert np.abs(batch - alone[np.resize(order, size)]).max() <= BATCH_INVARIANCE_ATOL
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(out / FP32_GRAPH), str(tmp_path / "dynamic.onnx"), per_channel=True,
                     weight_type=QuantType.QInt8)
    import onnxruntime as ort

    int8.session = ort.InferenceSession(str(tmp_path / "dynamic.onnx"), providers=["CPUExecutionProvider"])
    assert batch_invariance(one_batch, MIXED) > 100 * max(per_token, 1e-7)


def _write_beir(folder, pairs, split="dev", distractors=()):
    (folder / "qrels").mkdir(parents=True)
    docs = [p for _, p in pairs] + list(distractors)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": d}) + "\n"
                                                 for i, d in enumerate(docs)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n"
                                                  for i, (q, _) in enumerate(pairs)))
    (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                                   "".join(f"q{i}\td{i}\t1\n" for i in range(len(pairs))))
    return folder


PAIRS = [(f"question {i} about {w}", f"an answer about {w} number {i}") for i, w in
         enumerate(["fever", "insulin", "asthma", "contracts", "interest rates", "dogs", "vaccines", "copyright"] * 3)]


def test_check_set_specs_and_the_model_manifest_default(tmp_path, caplog):
    from embedkit.errors import DataError
    from embedkit.export.checkset import load_check_set

    beir = _write_beir(tmp_path / "mydata", PAIRS, distractors=[f"filler text {i}" for i in range(1500)])
    check = load_check_set(f"beir:{beir}:dev")
    assert check.name == "mydata-dev" and len(check.queries) == len(PAIRS) and len(check.corpus) == 1000
    assert set(check.qrels) == set(check.queries) and all(d in check.corpus for q in check.qrels
                                                          for d in check.qrels[q])
    assert load_check_set(f"beir:{beir}:dev", seed=0).corpus == check.corpus  # seeded
    assert len(load_check_set(f"beir:{beir}:dev", max_queries=5).queries) == 5
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"q": q, "p": p, "negatives": ["hard " + p]}) + "\n" for q, p in PAIRS))
    with pytest.raises(DataError):
        load_check_set(f"pairs:{pairs_file}")  # its columns are q/p: only the manifest knows
    assert load_check_set("builtin-40").name == "builtin-40"
    with pytest.raises(DataError, match="no such folder"):
        load_check_set("beir:/nonexistent:test")
    # default: the data named in the model's manifest (dev if retrieval, else training data), else builtin-40
    model = tmp_path / "model"
    model.mkdir()
    assert load_check_set(None, model_folders=[model]).name == "builtin-40"
    recipe = {"train": str(pairs_file), "columns": {"query": "q", "positive": "p", "negatives": None}, "dev": "stsb"}
    (model / MANIFEST_NAME).write_text(json.dumps({"training": {"recipe": {"data": recipe}}}))
    check = load_check_set(None, model_folders=[model])
    assert check.source.startswith("the model's training data") and len(check.queries) == len(PAIRS)
    assert len(check.corpus) == 2 * len(PAIRS)  # positives + hard negatives
    recipe["dev"] = f"beir:{beir}:dev"
    (model / MANIFEST_NAME).write_text(json.dumps({"training": {"recipe": {"data": recipe}}}))
    assert load_check_set(None, model_folders=[model]).source.startswith("the model's dev data")
    recipe.update(dev="beir:/gone:test", train="/gone.jsonl")
    (model / MANIFEST_NAME).write_text(json.dumps({"training": {"recipe": {"data": recipe}}}))
    with caplog.at_level(logging.INFO, logger="embedkit"):
        assert load_check_set(None, model_folders=[model]).name == "builtin-40"
    notes = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(notes) == 2 and "not usable here" in notes[0]


def test_export_cli_takes_a_beir_check_set(st_bert, tmp_path):
    import typer
    from typer.testing import CliRunner

    from embedkit.export.cli import export_command

    from embedkit.data.defaults import stsb_paraphrase_retrieval

    # a real retrieval set (STS-B paraphrases, 1,379 documents) written as a BEIR folder with a "dev" split; the
    # random-weight model's near-ties still reorder under another CPU's int8 kernels (CI saw a 0.0057 drop at
    # cosine 1.0000), so it is held to the tiny-model bound through --max-ndcg-drop
    data = stsb_paraphrase_retrieval("test")
    pairs = [(data.queries[q], data.corpus[d]["text"]) for q in data.qrels for d in list(data.qrels[q])[:1]]
    beir = _write_beir(tmp_path / "mydata", pairs, split="dev",
                       distractors=[row["text"] for row in data.corpus.values()])
    app = typer.Typer()
    app.command()(export_command)
    out = tmp_path / "onnx"
    result = CliRunner().invoke(app, ["--model", str(st_bert), "--output", str(out), "--quantize", "int8",
                                      "--check-set", f"beir:{beir}:dev", "--max-ndcg-drop", str(TINY_MAX_NDCG_DROP)])
    assert result.exit_code == 0, result.output
    assert "nDCG@10 on mydata-dev" in result.output and "batch vs alone" in result.output
    parity = json.loads((out / MANIFEST_NAME).read_text())["parity"]
    assert parity["check_set"] == "mydata-dev" and parity["check_set_queries"] == 300
    assert parity["check_set_documents"] == 1000
    assert parity["check_set_source"] == f"--check-set beir:{beir}:dev"
    assert parity["ndcg_at_10_max_drop"] == TINY_MAX_NDCG_DROP


def _negate_embedding_row(token):
    """A quantize_int8 that then negates one token's row of the int8 word-embedding table (a damaged graph)."""
    import onnx
    from onnx import numpy_helper

    from embedkit.export import onnx as export_module

    real = export_module.quantize_int8

    def damaged(src, dst, **kwargs):
        counts = real(src, dst, **kwargs)
        from transformers import AutoTokenizer

        token_id = AutoTokenizer.from_pretrained(src.parent).convert_tokens_to_ids(token)
        model = onnx.load(str(dst))
        table = next(i for i in model.graph.initializer if i.name.endswith("word_embeddings.weight/q"))
        values = numpy_helper.to_array(table).copy()
        values[token_id] = -values[token_id]
        table.CopyFrom(numpy_helper.from_array(values, table.name))
        onnx.save(model, str(dst))
        return counts

    return damaged


def test_a_damaged_int8_graph_fails_on_a_real_check_set_and_leaves_nothing(st_bert, tmp_path, monkeypatch, caplog):
    """Negating the int8 embedding of one frequent token ('a') hurts only the texts that contain it: the mean cosine
    stays above 0.99 (the old check alone passed it); the per-text minimum on STS-B paraphrase fails."""
    from embedkit.export import onnx as export_module

    monkeypatch.setattr(export_module, "quantize_int8", _negate_embedding_row("a"))
    out = tmp_path / "onnx"
    with pytest.raises(ExportError, match="cosine to fp32 .* < 0.95; nothing was written"), \
            caplog.at_level(logging.INFO, logger="embedkit"):
        export_onnx(st_bert, out, quantize="int8", check_set="stsb-paraphrase")
    messages = [r.getMessage() for r in caplog.records]
    assert not out.exists() and list(tmp_path.iterdir()) == []
    line = next(m for m in messages if m.startswith("parity int8"))
    assert "on 1441 texts" in line and "nDCG@10 on stsb-paraphrase-test" in line  # 300 queries, 1,000 documents
    assert float(line.split("mean cosine ")[1].split()[0]) >= 0.99


def test_failed_parity_writes_nothing_and_keeps_the_old_export(st_bert, tmp_path, bert_export):
    out = tmp_path / "onnx"
    with pytest.raises(ExportError, match="mean cosine"):
        export_onnx(st_bert, out, quantize="int8", min_mean_cosine=1.01)
    assert not out.exists()
    assert [p for p in tmp_path.iterdir()] == []  # no temporary folder left either
    with pytest.raises(ExportError, match="differs from torch"):
        export_onnx(st_bert, out, max_abs_diff=0.0)
    assert not out.exists()
    # an existing good export is not replaced by a failed one
    good, _ = bert_export
    before = (good / MANIFEST_NAME).read_text()
    with pytest.raises(ExportError):
        export_onnx(st_bert, good, quantize="int8", min_mean_cosine=1.01)
    assert (good / MANIFEST_NAME).read_text() == before
    assert ExportError("x").exit_code != 0


def test_export_refuses_a_model_that_changed_after_training(st_bert, tmp_path):
    from embedkit.models.probes import write_probes

    folder = tmp_path / "trained"
    encoder = load_model(st_bert)
    encoder.save(folder)
    write_probes(encoder, folder)
    _perturb_weights(folder)
    with pytest.raises(ExportError, match="probe vectors"):
        export_onnx(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    manifest = export_onnx(folder, tmp_path / "out", allow_probe_mismatch=True)
    assert manifest["source_probes"]["ok"] is False


def _perturb_weights(folder):
    """Alter the weights the way a stray edit would: noise on one layer's output projection."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    key = next(k for k in sorted(weights) if k.endswith(("layer.1.output.dense.weight", "layers.1.mlp.down_proj.weight")))
    weights[key] = weights[key] + 0.05 * torch.randn_like(weights[key], generator=torch.Generator().manual_seed(0))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_onnx_encoder_errors(tmp_path, bert_export):
    with pytest.raises(ModelError, match="not an ONNX export folder"):
        OnnxEncoder(tmp_path)
    out, _ = bert_export
    with pytest.raises(ModelError, match="normalize"):
        OnnxEncoder(out).encode(["x"], normalize=False)
    with pytest.raises(ModelError, match="unknown quantization"):
        export_onnx(out, tmp_path / "x", quantize="int4")


def test_hf_export_merges_saves_and_writes_launch_files(st_llama, tmp_path):
    from transformers import AutoTokenizer

    from embedkit.export.hf import export_hf

    out = tmp_path / "hf"
    spec = export_hf(st_llama, out, served_name="tiny")
    for name in ("launch.txt", "launch.json", PROBES_NAME, MANIFEST_NAME, "modules.json", "1_Pooling/config.json"):
        assert (out / name).is_file(), name
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_lasttoken"] is True and "pooling_mode" not in pooling  # explicit form (vLLM 45995)
    vllm = spec["commands"]["vllm"]
    assert vllm[:4] == ["vllm", "serve", str(out.resolve()), "--runner"] and vllm[4] == "pooling"
    assert json.loads(vllm[vllm.index("--pooler-config") + 1]) == {"pooling_type": "LAST", "normalize": True}
    assert json.loads((out / "launch.json").read_text())["commands"]["vllm"] == vllm
    assert shlex.join(vllm) in (out / "launch.txt").read_text()
    assert "Instruct:" in (out / "launch.txt").read_text()  # the prompt note tells vLLM users what to prepend
    # vLLM/TEI read the tokenizer with plain transformers: it must append EOS by itself
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("hello")["input_ids"][-1] == tokenizer.eos_token_id
    reloaded = load_model(out)
    assert np.abs(reloaded.encode(TEXTS) - load_model(st_llama).encode(TEXTS)).max() < 1e-6
    assert check_probes(lambda t, k: reloaded.encode(list(t), kind=k), out).ok
    assert json.loads((out / MANIFEST_NAME).read_text())["export"]["format"] == "hf"


def test_hf_export_merges_a_lora_adapter(st_bert, tmp_path):
    from peft import LoraConfig, get_peft_model

    from embedkit.export.hf import export_hf

    encoder = load_model(st_bert)
    encoder.backbone = get_peft_model(encoder.backbone, LoraConfig(r=4, target_modules=["query", "value"],
                                                                     init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    encoder.save_adapter(adapter_dir)
    expected = encoder.encode(TEXTS)
    out = tmp_path / "hf"
    export_hf(st_bert, out, adapter=adapter_dir)
    merged = load_model(out)
    assert not merged.has_adapter
    assert np.abs(merged.encode(TEXTS) - expected).max() < 1e-5
    assert np.abs(merged.encode(TEXTS) - load_model(st_bert).encode(TEXTS)).max() > 1e-4  # the adapter mattered


def test_export_cli_help_and_format_errors():
    import typer
    from typer.testing import CliRunner

    from embedkit.errors import ConfigError
    from embedkit.export.cli import export_command

    app = typer.Typer()
    app.command()(export_command)
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0 and "parity" in result.output and "--quantize" in result.output
    result = CliRunner().invoke(app, ["--model", "x", "--output", "y", "--format", "tflite"])
    assert isinstance(result.exception, ConfigError)


@pytest.mark.integration
def test_minilm_int8_export(tmp_path):
    """The real model on a real check set (STS-B paraphrase retrieval, 300 queries, 1,000 documents): fp32 exact;
    per-token int8 keeps mean cosine >= 0.99, every text >= 0.95 and nDCG@10 within 0.005; a text's int8 vector is
    the same alone and inside batches of 8 and 32 of other texts."""
    out = tmp_path / "minilm_onnx"
    manifest = export_onnx("minilm", out, quantize="int8", check_set="stsb-paraphrase")
    parity = manifest["parity"]
    assert parity["check_set"] == "stsb-paraphrase-test" and parity["check_set_documents"] == 1000
    assert parity["fp32_max_abs_diff"] < 1e-5
    assert parity["int8_mean_cosine"] >= 0.99 and parity["int8_min_cosine"] >= 0.95
    assert parity["ndcg_at_10_fp32"] - parity["ndcg_at_10_int8"] <= 0.005
    assert parity["batch_invariance_max_abs_diff"] <= BATCH_INVARIANCE_ATOL
    expected = load_model("minilm").encode(TEXTS)
    assert np.abs(OnnxEncoder(out, variant="fp32").encode(TEXTS) - expected).max() < 1e-5
    int8 = OnnxEncoder(out)
    assert batch_invariance(lambda t: int8.encode(t, "document", batch_size=len(t)), MIXED + TEXTS) <= 1e-4
