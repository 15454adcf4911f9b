"""QLoRA memory: the 4-bit load does not keep the fp32 checkpoint mapped, and the trainer reports weight bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from embedkit.models.encoder import load_model
from embedkit.train.contrastive import parameter_memory


def _mapped(path: Path) -> bool:
    target = str(path.resolve())
    return any(line.rstrip("\n").endswith(target) for line in open("/proc/self/maps", encoding="utf-8"))


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_nf4_load_releases_the_fp32_checkpoint_and_weighs_less(tiny_llama64_dir):
    checkpoint = tiny_llama64_dir / "model.safetensors"
    quantised = load_model(tiny_llama64_dir, quantization="nf4", pooling="lasttoken", padding_side="left")
    # The unquantised weights (embeddings, norms) were copied out of the memory-mapped file: nothing maps it now.
    assert not _mapped(checkpoint)
    full = load_model(tiny_llama64_dir, pooling="lasttoken", padding_side="left")
    q, f = parameter_memory(quantised), parameter_memory(full)
    assert "nf4 (packed uint8 + absmax)" in q["by_kind_bytes"] and set(f["by_kind_bytes"]) == {"float32"}
    linear = sum(m.weight.numel() for m in full.backbone.modules() if isinstance(m, torch.nn.Linear))
    # 4-bit linears: half a byte per weight plus constants, instead of 4 bytes.
    assert f["total_bytes"] - q["total_bytes"] > 3 * linear
    assert q["trainable_bytes"] <= q["total_bytes"]
    texts = ["what causes a fever", "the court ruled"]
    assert quantised.encode(texts).shape == full.encode(texts).shape  # the copied weights still work


def test_training_manifest_records_weight_memory(tiny_bert_dir, tmp_path):
    from embedkit.manifest import MANIFEST_NAME
    from embedkit.train.config import parse_recipe
    from embedkit.train.contrastive import train

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"query {i}", "positive": f"document {i}"}) + "\n"
                             for i in range(4)))
    recipe = parse_recipe({"model": {"name": str(tiny_bert_dir), "max_length": 16}, "data": {"train": str(pairs)},
                           "adapter": {"type": "lora", "r": 2, "alpha": 4},
                           "training": {"output_dir": str(tmp_path / "m"), "batch_size": 2, "progress": False,
                                        "threads": 1}})
    train(recipe)
    memory = json.loads((tmp_path / "m" / MANIFEST_NAME).read_text())["training"]["stats"]["memory"]
    weights = memory["parameters"]
    assert 0 < weights["trainable_bytes"] < weights["total_bytes"] / 2  # LoRA: a small trainable share
    assert memory["rss_after_load_gb"] > 0


# ---------------------------------------------------------------------------------------------------- estimates
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bm():
    from embedkit.train import memory

    return memory


def test_estimated_shapes_count_the_parameters_transformers_builds(bm):
    from transformers import MistralConfig, MistralModel, Qwen2Config, Qwen2Model, Qwen3Config, Qwen3Model

    for name, (config_cls, model_cls) in {"Qwen/Qwen3-0.6B": (Qwen3Config, Qwen3Model),
                                           "mistralai/Mistral-7B-v0.1": (MistralConfig, MistralModel),
                                           "Qwen/Qwen2.5-7B": (Qwen2Config, Qwen2Model)}.items():
        s = bm.KNOWN_SHAPES[name]
        config = config_cls(num_hidden_layers=s.layers, hidden_size=s.hidden, intermediate_size=s.intermediate,
                            num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                            vocab_size=s.vocab, tie_word_embeddings=s.tied)
        with torch.device("meta"):
            model = model_cls(config)
        assert s.parameters == sum(p.numel() for p in model.parameters()), name
        assert bm.shape_from_config(config.to_dict()) == s, name
    assert bm.KNOWN_SHAPES["Qwen/Qwen3-0.6B"].parameters == 596_049_920


def test_one_layers_saved_activations_match_the_estimate(bm, tmp_path):
    """The per-layer element count behind the activation estimate, against the tensors autograd really saves in a
    QLoRA forward of a small Qwen3 (no checkpointing, so every layer's are alive)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from conftest import _bytelevel_tokenizer
    from embedkit.train.config import parse_recipe
    from embedkit.train.contrastive import build_encoder

    tokenizer = _bytelevel_tokenizer()
    config = Qwen3Config(num_hidden_layers=2, hidden_size=256, intermediate_size=768, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, vocab_size=320, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "q")
    tokenizer.save_pretrained(tmp_path / "q")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    recipe = parse_recipe({"model": {"name": str(tmp_path / "q"), "attention": "bidirectional", "pooling": "mean",
                                     "dtype": "bf16", "padding_side": "right"},
                           "adapter": {"type": "qlora", "r": 4, "alpha": 8, "targets": "all-linear"},
                           "data": {"train": str(pairs)}, "training": {"output_dir": str(tmp_path / "out")}})
    encoder = build_encoder(recipe, "cpu")
    encoder.train()
    texts, length = 4, 64
    features = {"input_ids": torch.randint(5, 300, (texts, length)),
                "attention_mask": torch.ones(texts, length, dtype=torch.long)}
    storages: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and t.dtype != torch.uint8:  # activations, not the 4-bit weights
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        encoder(features)
    shape = bm.shape_from_config(config.to_dict())
    # fp32 activations: PEFT's kbit preparation leaves the embeddings (so the residual stream) in fp32
    estimated = shape.layers * bm._layer_elements_per_token(shape) * texts * length * 4
    measured = sum(storages.values())
    assert 0.85 < measured / estimated < 1.15, (measured, estimated)


def test_recipe_estimates(bm):
    from embedkit.train.config import load_recipe

    qwen = bm.estimate_recipe_memory(load_recipe(REPO / "recipes" / "qwen3-0.6b-encoder.yaml", validate=False))
    assert qwen["lora_parameters"] == 28 * 32 * (1024 + 2048 + 2 * (1024 + 1024) + 2048 + 1024 + 3 * (1024 + 3072))
    assert qwen["mntp_bytes"] > 0 and 3 < qwen["peak_bytes"] / 2**30 < 12
    mistral = load_recipe(REPO / "recipes" / "mistral-7b-encoder-zero3.yaml", validate=False)
    per_gpu = [bm.estimate_recipe_memory(mistral, processes=n) for n in (2, 4, 8)]
    assert per_gpu[0]["peak_bytes"] > per_gpu[1]["peak_bytes"] > per_gpu[2]["peak_bytes"]
    assert per_gpu[1]["cpu_optimizer_bytes"] > 0 and 0 < per_gpu[1]["mntp_bytes"] < per_gpu[1]["activations_bytes"]
    table = bm.format_estimate(per_gpu[1])
    assert "GiB (estimate)" in table and "per GPU, 4 GPUs (ZeRO-3)" in table


def test_cli_estimate_memory_prints_the_functions_peak(bm, monkeypatch, capsys):
    """`embedkit train RECIPE --estimate-memory [--nproc N]` prints the table of estimate_recipe_memory with the same
    peak, and exits 0 on this CPU machine: no model, hub, GPU packages or data files. Catches the CLI drifting from the
    function: --nproc not passed on as the ZeRO-3 process count (the table would show one GPU's or 2 GPUs' peak), --set
    overrides dropped, or the recipe validated before estimating (a GPU recipe whose data or deepspeed is not on this
    machine would fail instead of printing); and a non-QLoRA recipe ending in a traceback or a bare SystemExit (what
    bench_memory.py raised) instead of the usual one-line error."""
    from typer.testing import CliRunner

    from embedkit.cli import app
    from embedkit.train.config import load_recipe

    monkeypatch.chdir(REPO)
    runner = CliRunner()
    # data.train missing on purpose: the estimate reads no data, so validating the recipe first would fail here
    qwen_sets = ["data.train=/nonexistent/train.jsonl", "training.grad_cache=64"]
    for recipe, nproc, sets in (("recipes/qwen3-0.6b-encoder.yaml", 1, qwen_sets),
                                ("recipes/mistral-7b-encoder-zero3.yaml", 4, [])):
        argv = ["train", recipe, "--estimate-memory"] + (["--nproc", str(nproc)] if nproc > 1 else [])
        result = runner.invoke(app, argv + [x for s in sets for x in ("--set", s)])
        assert result.exit_code == 0, result.output
        expected = bm.estimate_recipe_memory(load_recipe(recipe, sets, validate=False), processes=nproc)
        if sets:  # the override changes the peak, so dropping --set would show
            plain = bm.estimate_recipe_memory(load_recipe(recipe, validate=False))
            assert expected["peak_bytes"] != plain["peak_bytes"]
        peak = [line for line in result.output.splitlines() if "**peak" in line]
        assert peak == [line for line in bm.format_estimate(expected).splitlines() if "**peak" in line], result.output
        assert f"**{expected['peak_bytes'] / 2**30:.2f}**" in peak[0]
        assert ("4 GPUs (ZeRO-3)" if nproc > 1 else "one GPU") in peak[0]
    mistral = [bm.estimate_recipe_memory(load_recipe("recipes/mistral-7b-encoder-zero3.yaml", validate=False),
                                         processes=n)["peak_bytes"] for n in (2, 4)]
    assert mistral[0] != mistral[1]  # so the --nproc 4 check above tells 4 processes from 2 (or 1)
    from embedkit.cli import main

    with pytest.raises(SystemExit) as exit_info:  # a LoRA recipe: the usual one-line error, exit code 2
        main(["train", "recipes/minilm-scifact.yaml", "--estimate-memory"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0, err
    assert err.startswith("error: recipes/minilm-scifact.yaml: field 'adapter.type'") and "QLoRA" in err, err
