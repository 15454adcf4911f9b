"""Decoder-to-encoder options of `embedkit train`: model.attention (bidirectional) and the MNTP warm-up."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embedkit.errors import ConfigError, ModelError
from embedkit.models.encoder import load_model
from embedkit.train.contrastive import train
from embedkit.train.engine import work_dir
from embedkit.train.mntp import MNTPStep, lm_head_weight, mask_batch

from test_train_trainer import _assert_weights_close, _recipe, _weights, pairs_file  # noqa: F401  (fixture)


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
    # With DeepSpeed / FSDP the warm-up is a phase of the same engine (tests/test_train_distributed.py runs it).
    for sharded in ({"deepspeed": {"stage": "zero3"}}, {"fsdp": {"enabled": True}}):
        assert _recipe(tiny_llama_dir, pairs_file, tmp_path / "x", mntp={"steps": 2}, **sharded).mntp.steps == 2
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


# A LoRA adapter with dropout (the RNG streams matter), bidirectional attention, 5 MNTP steps, then one epoch.
PHASED = dict(model={"pooling": "mean", "attention": "bidirectional"},
              adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
              mntp={"steps": 5, "batch_size": 4, "lr": 1e-2, "max_length": 32}, training={"epochs": 1})


def _train_losses(path) -> list[float]:
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "train"]


def test_one_process_mntp_then_contrastive_trains_what_two_engines_did(tiny_llama_dir, pairs_file, tmp_path):
    """Catches the warm-up-as-a-phase (one engine, one optimizer whose state is cleared and whose schedule is
    replaced per phase) training other weights than before, when MNTP had an Engine of its own and the contrastive
    one a fresh optimizer. The numbers were recorded from that code (commit de4e92e) with this recipe; the weights
    were bit-identical then (sha256 of model.safetensors' tensors) and are compared here to 1e-6 relative, which a
    changed RNG order, schedule, lr or optimizer state misses by far more."""
    out = tmp_path / "m"
    train(_recipe(tiny_llama_dir, pairs_file, out, **PHASED))
    assert _train_losses(out / "mntp_log.jsonl") == pytest.approx(
        [5.711022, 5.691442, 5.67858, 5.681676, 5.669315], abs=2e-6)
    assert _train_losses(out / "train_log.jsonl") == pytest.approx(
        [0.8114389181137085, 1.1502385139465332, 0.19156351685523987], rel=1e-6)
    trained = _weights(out)
    base = {k.removeprefix("model."): v for k, v in _weights(tiny_llama_dir).items()}
    moved = sum(((trained[k].double() - base[k].double()) ** 2).sum().item() for k in trained if k in base) ** 0.5
    assert moved == pytest.approx(0.9757871489652457, rel=1e-6)


@pytest.mark.parametrize("kill_in", ["mntp", "train"])
def test_a_killed_run_resumes_in_the_phase_it_was_killed_in(tiny_llama_dir, pairs_file, tmp_path, monkeypatch,
                                                            kill_in):
    """Catches a resumed run that starts the wrong phase (MNTP again after a contrastive checkpoint, or the
    contrastive phase from an MNTP checkpoint), or resumes a phase with another phase's schedule or optimizer, by
    ending elsewhere than the uninterrupted run. Killed after MNTP step 3 (checkpoint mntp-step-2) or contrastive
    step 5 (checkpoint step-4); both keep the MNTP stats in the manifest."""
    phased = {**PHASED, "training": {"epochs": 2, "checkpoint_every": 2}}
    train(_recipe(tiny_llama_dir, pairs_file, tmp_path / "full", **phased))
    out = tmp_path / "killed"
    recipe = _recipe(tiny_llama_dir, pairs_file, out, **phased)

    class Killed(Exception):
        pass

    def kill(step, record=None, *_):
        if step == (3 if kill_in == "mntp" else 5):
            raise Killed

    if kill_in == "mntp":
        monkeypatch.setattr(MNTPStep, "after_step", lambda self, engine, step, total: kill(step))
        with pytest.raises(Killed):
            train(recipe)
        monkeypatch.undo()
    else:
        with pytest.raises(Killed):
            train(recipe, on_step=kill)
    assert not out.exists()
    checkpoints = sorted(p.name for p in (work_dir(out) / "checkpoints").iterdir())
    assert checkpoints == (["mntp-step-2"] if kill_in == "mntp" else ["step-2", "step-4"]), checkpoints
    payload = torch.load(work_dir(out) / "checkpoints" / checkpoints[-1] / "engine.pt", weights_only=True)
    assert payload["phase"] == kill_in and payload["position"]["step"] == int(checkpoints[-1].rpartition("-")[2])
    result = train(recipe, resume=True)
    assert result.steps == 6
    _assert_weights_close(tmp_path / "full", out, atol=1e-6)
    mntp_steps = [r["step"] for r in map(json.loads, (out / "mntp_log.jsonl").read_text().splitlines())
                  if r["event"] == "train"]
    train_steps = [r["step"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
                   if r["event"] == "train"]
    if kill_in == "mntp":  # MNTP went on from its step 2; the contrastive phase then ran once
        assert (mntp_steps, train_steps) == ([1, 2, 3, 3, 4, 5], [1, 2, 3, 4, 5, 6])
    else:  # MNTP was done: not run again
        assert (mntp_steps, train_steps) == ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 5, 6])
    manifest = json.loads((out / "embedkit_manifest.json").read_text())
    assert manifest["training"]["stats"]["memory"]["mntp"]["steps"] == 5

