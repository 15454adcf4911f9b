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
