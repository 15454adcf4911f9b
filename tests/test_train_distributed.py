"""DeepSpeed ZeRO-3 with 2 CPU processes (gloo): the saved model reloads and equals single-process training.

Needs deepspeed (pip install 'embedkit[deepspeed]'); the first run JIT-compiles a small comm op (cached after).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from embedkit.models.encoder import load_model
from embedkit.train.config import load_recipe
from embedkit.train.distributed import launch
from embedkit.train.trainer import train

PAIRS = [("what causes a fever", "the patient has a fever and a cough"),
         ("what is diabetes", "diabetes is a disease of high blood sugar"),
         ("what does insulin do", "insulin lowers the level of glucose in the blood"),
         ("who plays a guitar", "a man is playing a guitar on the stage"),
         ("what did the court rule", "the court ruled that the contract was void"),
         ("did interest rates rise", "interest rates rose by half a percent this quarter"),
         ("asthma in children", "how is asthma treated in children"),
         ("flu symptoms", "symptoms of flu include fever, aches and fatigue")]


@pytest.fixture
def recipe_file(tmp_path, tiny_bert_dir) -> Path:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in PAIRS))
    path = tmp_path / "recipe.yaml"
    # No dropout: the processes draw different masks than one process would, and the comparison must be exact.
    path.write_text(
        f"model: {{name: {tiny_bert_dir}, max_length: 32, attention_dropout: 0.0, hidden_dropout: 0.0}}\n"
        f"data: {{train: {pairs}}}\n"
        "loss: {temperature: 0.1, symmetric: true}\n"
        f"training: {{output_dir: {tmp_path / 'out'}, batch_size: 2, lr: 1.0e-3, epochs: 2, seed: 3, threads: 1,"
        " progress: false}\n"
        "deepspeed: {stage: zero3}\n")
    return path


@pytest.mark.parametrize("grad_cache", [None, 1], ids=["plain", "gradcache"])
def test_zero3_two_processes_equal_one_process_and_reload(recipe_file, tmp_path, grad_cache, tiny_bert_dir):
    out = tmp_path / "zero3"
    overrides = [f"training.output_dir={out}", f"training.grad_cache={'null' if grad_cache is None else grad_cache}"]
    assert launch([str(recipe_file), *[a for o in overrides for a in ("--set", o)]], 2) == 0
    manifest = json.loads((out / "embedkit_manifest.json").read_text())
    assert manifest["training"]["stats"]["processes"] == 2
    assert manifest["training"]["stats"]["steps"] == 4  # 8 pairs, global batch 2 x 2, 2 epochs

    # One process with the global batch (4) trains the same model: gather + ZeRO-3 change nothing but memory.
    single = load_recipe(recipe_file, ["deepspeed.stage=none", "training.batch_size=4",
                                       f"training.output_dir={tmp_path / 'single'}"])
    train(single, say=lambda m: None)
    a, b = load_model(out), load_model(tmp_path / "single")
    untrained = load_model(tiny_bert_dir)
    base = dict(untrained.named_parameters())
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    # Compared as a norm relative to how far training moved the weights, not element by element: Adam's first step
    # moves every weight by ~lr whatever its gradient's size, so a gradient that is float noise (~1e-9) can flip
    # sign between the two reduction orders and move one element by up to 2 x lr (seen: 9e-5 on an AVX-512 CPU).
    # Measured: 6.5e-5. Real differences, measured with one process: batch 2 without gathering 0.67, lr x 1.1 0.10,
    # temperature 0.1 -> 0.11 0.05.
    gap = sum(((pa[k] - pb[k]) ** 2).sum().item() for k in pa) ** 0.5
    moved = sum(((pb[k] - base[k]) ** 2).sum().item() for k in pa) ** 0.5
    assert gap / moved < 1e-3, (gap, moved)
    texts = [q for q, _ in PAIRS]
    assert np.allclose(a.encode(texts), b.encode(texts), atol=1e-4)
    assert not np.allclose(a.encode(texts), untrained.encode(texts), atol=1e-3)  # it trained
