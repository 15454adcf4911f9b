"""Export: ONNX graph parity with torch (BERT and causal), int8 bounds, failure leaves nothing, HF export + launch."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch

from embedkit.errors import ModelError
from embedkit.export.onnx import FP32_GRAPH, INT8_GRAPH, ONNX_CONFIG_NAME, ExportError, OnnxEncoder, export_onnx
from embedkit.export.probes import PROBES_NAME, check_probes
from embedkit.manifest import MANIFEST_NAME
from embedkit.models import load_model

TEXTS = ["what causes high blood pressure", "fever", "a man is playing a guitar on the stage tonight with friends",
         "insulin lowers the level of glucose in the blood", "", "the court ruled"]


TINY_MAX_NDCG_DROP = 0.03


def _quiet(_message: str) -> None:
    pass




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
    manifest = export_onnx(st_bert, out, quantize="int8", max_ndcg_drop=TINY_MAX_NDCG_DROP, log=_quiet)
    return out, manifest


@pytest.mark.parametrize("which", ["st_bert", "st_llama"])
def test_onnx_fp32_matches_torch(which, request, tmp_path):
    folder = request.getfixturevalue(which)
    out = tmp_path / "onnx"
    manifest = export_onnx(folder, out, log=_quiet)
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
    assert parity["int8_mean_cosine"] >= 0.99
    assert parity["ndcg_at_10_max_drop"] == TINY_MAX_NDCG_DROP
    assert parity["ndcg_at_10_fp32"] - parity["ndcg_at_10_int8"] <= TINY_MAX_NDCG_DROP
    # recompute the cosine independently of the exporter
    fp32, int8 = OnnxEncoder(out, variant="fp32"), OnnxEncoder(out)
    a, b = fp32.encode(TEXTS * 3), int8.encode(TEXTS * 3)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() >= 0.99
    assert np.abs(a - b).max() > 0  # it really is a different (quantised) graph
    assert (out / INT8_GRAPH).stat().st_size < (out / FP32_GRAPH).stat().st_size


def test_failed_parity_writes_nothing_and_keeps_the_old_export(st_bert, tmp_path, bert_export):
    out = tmp_path / "onnx"
    with pytest.raises(ExportError, match="mean cosine"):
        export_onnx(st_bert, out, quantize="int8", min_mean_cosine=1.01, log=_quiet)
    assert not out.exists()
    assert [p for p in tmp_path.iterdir()] == []  # no temporary folder left either
    with pytest.raises(ExportError, match="differs from torch"):
        export_onnx(st_bert, out, max_abs_diff=0.0, log=_quiet)
    assert not out.exists()
    # an existing good export is not replaced by a failed one
    good, _ = bert_export
    before = (good / MANIFEST_NAME).read_text()
    with pytest.raises(ExportError):
        export_onnx(st_bert, good, quantize="int8", min_mean_cosine=1.01, log=_quiet)
    assert (good / MANIFEST_NAME).read_text() == before
    assert ExportError("x").exit_code != 0


def test_export_refuses_a_model_that_changed_after_training(st_bert, tmp_path):
    from embedkit.export.probes import write_probes

    folder = tmp_path / "trained"
    encoder = load_model(st_bert)
    encoder.save(folder)
    write_probes(encoder, folder)
    _perturb_weights(folder)
    with pytest.raises(ExportError, match="probe vectors"):
        export_onnx(folder, tmp_path / "out", log=_quiet)
    assert not (tmp_path / "out").exists()
    manifest = export_onnx(folder, tmp_path / "out", allow_probe_mismatch=True, log=_quiet)
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
        export_onnx(out, tmp_path / "x", quantize="int4", log=_quiet)


def test_hf_export_merges_saves_and_writes_launch_files(st_llama, tmp_path):
    from transformers import AutoTokenizer

    from embedkit.export.hf import export_hf

    out = tmp_path / "hf"
    spec = export_hf(st_llama, out, served_name="tiny", log=_quiet)
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
    export_hf(st_bert, out, adapter=adapter_dir, log=_quiet)
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
    """The real model: fp32 exact, int8 per-channel keeps mean cosine >= 0.99 and nDCG@10 within 0.005."""
    out = tmp_path / "minilm_onnx"
    manifest = export_onnx("minilm", out, quantize="int8", log=_quiet)
    parity = manifest["parity"]
    assert parity["fp32_max_abs_diff"] < 1e-5
    assert parity["int8_mean_cosine"] >= 0.99
    assert parity["ndcg_at_10_fp32"] - parity["ndcg_at_10_int8"] <= 0.005
    expected = load_model("minilm").encode(TEXTS)
    assert np.abs(OnnxEncoder(out, variant="fp32").encode(TEXTS) - expected).max() < 1e-5
