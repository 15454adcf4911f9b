"""Decoder-to-encoder options of `embedkit train`: model.attention (bidirectional) and the MNTP warm-up."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embedkit.errors import ConfigError, ModelError
from embedkit.models.encoder import load_model
from embedkit.train.config import parse_recipe
from embedkit.train.contrastive import train
from embedkit.train.mntp import lm_head_weight, mask_batch

from test_train_trainer import _recipe, pairs_file  # noqa: F401  (fixture)


def test_mask_batch_predicts_only_real_tokens_after_real_tokens():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 2], [5, 6, 7, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        masked, predict = mask_batch(ids, mask, ratio=0.5, mask_id=99, vocab_size=100, special_ids={2}, generator=g)
        assert not predict[0, :3].any()  # padding, and the first real token (nothing before it predicts it)
        assert not predict[1, 0]
        assert not predict[0, 7]  # the special token
        assert predict.any(1).all()  # every row learns something
        assert torch.equal(masked[~predict], ids[~predict])  # only chosen positions change
    # about the ratio over many draws, and mostly replaced by the mask token
    total = chosen = as_mask = 0
    big = torch.randint(3, 90, (64, 64))
    for _ in range(20):
        masked, predict = mask_batch(big, torch.ones_like(big), ratio=0.2, mask_id=99, vocab_size=100,
                                     special_ids=set(), generator=g)
        total += 64 * 63
        chosen += int(predict.sum())
        as_mask += int((masked[predict] == 99).sum())
    assert 0.18 < chosen / total < 0.22
    assert 0.75 < as_mask / chosen < 0.85


def test_lm_head_is_read_from_disk_when_untied(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    encoder = load_model(tiny_llama_dir, pooling="mean")
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert not lm.config.tie_word_embeddings
    assert torch.equal(lm_head_weight(encoder), lm.lm_head.weight.detach())


def test_bidirectional_attention_lets_early_tokens_see_later_ones(tiny_llama_dir):
    causal = load_model(tiny_llama_dir, pooling="mean")
    both = load_model(tiny_llama_dir, pooling="mean", attention="bidirectional")
    a = causal.tokenize(["one two three four"])
    b = causal.tokenize(["one two three five"])
    with torch.no_grad():
        ha, hb = causal(a, hidden_states=True), causal(b, hidden_states=True)
        assert torch.allclose(ha[0, 0], hb[0, 0])  # causal: the first token cannot see the last
        ba, bb = both(a, hidden_states=True), both(b, hidden_states=True)
        assert not torch.allclose(ba[0, 0], bb[0, 0])


def test_mntp_warm_up_learns_and_the_saved_model_keeps_bidirectional_attention(tiny_llama_dir, pairs_file, tmp_path):
    out = tmp_path / "m"
    recipe = _recipe(tiny_llama_dir, pairs_file, out,
                     model={"pooling": "mean", "attention": "bidirectional"},
                     mntp={"steps": 40, "batch_size": 4, "lr": 1e-2, "max_length": 32},
                     training={"epochs": 1})
    train(recipe)
    log = [json.loads(line) for line in (out / "mntp_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["event"] == "train"]
    assert len(losses) >= 4 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
    manifest = json.loads((out / "embedkit_manifest.json").read_text())
    assert manifest["training"]["stats"]["memory"]["mntp"]["steps"] == 40
    saved = load_model(out)
    assert saved.attention == "bidirectional"
    # The warm-up changed what the contrastive stage started from: same seed without it gives other weights.
    plain = tmp_path / "plain"
    train(_recipe(tiny_llama_dir, pairs_file, plain, model={"pooling": "mean", "attention": "bidirectional"},
                  training={"epochs": 1}))
    texts = ["what is diabetes"]
    assert not np.allclose(saved.encode(texts), load_model(plain).encode(texts), atol=1e-4)


def test_mntp_and_attention_are_refused_where_they_do_not_apply(tiny_bert_dir, tiny_llama_dir, pairs_file, tmp_path):
    with pytest.raises(ConfigError, match="mntp.steps"):
        _recipe(tiny_llama_dir, pairs_file, tmp_path / "x", mntp={"steps": 2}, deepspeed={"stage": "zero3"})
    with pytest.raises(ConfigError, match="causal LLM"):
        train(_recipe(tiny_bert_dir, pairs_file, tmp_path / "y", mntp={"steps": 2}))
    with pytest.raises(ModelError, match="causal LLM"):
        load_model(tiny_bert_dir, attention="bidirectional")
    assert not (tmp_path / "y").exists()



def test_a_saved_bidirectional_model_exports_to_onnx_with_its_attention(tiny_llama_dir, tmp_path):
    import onnxruntime as ort

    from embedkit.export.onnx import torch_to_onnx

    load_model(tiny_llama_dir, pooling="mean", attention="bidirectional").save(tmp_path / "saved")
    saved = load_model(tmp_path / "saved")
    assert saved.attention == "bidirectional"
    torch_to_onnx(saved, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    feats = saved.tokenize(["one two three four", "one"])
    graph = session.run(None, {"input_ids": feats["input_ids"].numpy(),
                               "attention_mask": feats["attention_mask"].numpy()})[0]
    with torch.no_grad():
        both = saved(feats).numpy()
        causal = load_model(tiny_llama_dir, pooling="mean")(feats).numpy()
    assert np.abs(graph - both).max() < 1e-5
    assert np.abs(graph - causal).max() > 1e-2  # the graph did not fall back to causal attention
