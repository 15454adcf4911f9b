"""The GPU check's rows as tests: `pytest -m gpu tests/gpu` (scripts/gpu-check.sh runs it, then prints the table of
the rows file). Each test runs its row in its own process (bench/gpu_check.py holds the rows), adds the row to the
rows file and asserts what the row must show. Rows 5 and 6 serve row 2's model when row 2 ran first (this order).
Deselected by default (pyproject: -m "not gpu"); without CUDA, `-m gpu` stops with "no CUDA device" (conftest)."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.gpu


def _assert_measured(check, side: dict, what: str) -> None:
    """A trainer's throughput entry: timed steps after the warm-up step, tokens/s, and on a GPU one visible device,
    peak memory and (where the GPU's bf16 peak is known) an MFU between 0 and 1."""
    assert side["timed_steps"] >= 1 and side["seconds"] > 0, f"{what}: nothing timed after the warm-up step: {side}"
    assert side["tokens_per_s"] > 0 and side["samples_per_s"] > 0, f"{what}: {side}"
    if check.cuda:
        assert side["visible_gpus"] == 1, f"{what} saw {side['visible_gpus']} GPUs (one-GPU row)"
        assert side["peak_gpu_gib"] and side["peak_gpu_gib"] > 0, f"{what}: no peak GPU memory"
        assert side["timer"]["clock"] == "cuda events"
        if check.meta.get("peak_flops"):
            assert side["mfu"] is not None and 0 < side["mfu"] < 1, f"{what}: MFU {side['mfu']}"


def test_row1_encode_parity(check):
    r = check.run(1)
    assert r.status == "pass", r.result
    assert r.numbers["min_cosine"] >= check.gc.PARITY_MIN_COSINE
    assert r.numbers["device"].startswith("cuda" if check.cuda else "cpu")


def test_row2_minilm_vs_sentence_transformers(check):
    r = check.run(2)
    n = r.numbers
    ek, st = n["embedkit"], n["st"]
    # Matched settings: ST gets embedkit's attention dropout and its NO_DUPLICATES sampler, bf16, one GPU.
    # (BERT's attention reads its dropout module's p; embedkit sets the modules and leaves the saved config alone.)
    assert ek["attention_dropout"]["modules"] == st["attention_dropout"]["modules"] == [0.0]
    assert st["attention_dropout"]["config"] == 0.0
    assert st["batch_sampler"] == "no_duplicates" and st["bf16"]
    assert "DataParallel" not in st["wrapped"], st["wrapped"]
    if check.cuda:
        assert st["n_gpu"] == 1, f"HF Trainer saw {st['n_gpu']} GPUs (it would wrap the model in DataParallel)"
    for name, side in (("embedkit", ek["side"]), ("sentence-transformers", st["side"])):
        _assert_measured(check, side, name)
        # The same timer on both sides: from the end of step 1 to the end of the last step.
        assert side["timer"]["warmup_steps"] == 1 and side["timed_steps"] == side["timer"]["steps"] - 1
    # Both sides train the same MiniLM: the same FLOPs formula inputs (embedkit freezes BERT's pooler, which gets no
    # gradient on either side: 384 x 384 + 384 weights fewer "trainable").
    a, b = ek["side"]["flops_config"], st["side"]["flops_config"]
    assert {k: v for k, v in a.items() if k != "trainable"} == {k: v for k, v in b.items() if k != "trainable"}
    assert b["trainable"] - a["trainable"] in (0, 384 * 384 + 384)
    assert r.status == "pass", r.result  # embedkit's nDCG@10 >= ST's - 0.005


def test_row3_smollm2_qlora(check):
    r = check.run(3)
    assert r.status == "pass", r.result
    n = r.numbers
    assert all(math.isfinite(x) for x in (n["loss_first"], n["loss_last"]))
    (side,) = n["throughput"]
    _assert_measured(check, side, "SmolLM2 QLoRA")
    # QLoRA: only the adapters train (4P + 2T FLOPs per token, T << P).
    assert 0 < side["flops_config"]["trainable"] < side["flops_config"]["params"] / 10


def test_row4_zero3_kill_resume(check):
    r = check.run(4)
    assert r.status == "pass", r.result
    assert r.numbers["backend"] == "deepspeed-zero3"
    assert r.numbers["max_abs_diff"] <= r.numbers["atol"]


def test_row5_serve_vs_encode(check):
    r = check.run(5)
    assert r.status == "pass", r.result
    assert r.numbers["max_abs_diff"] <= check.gc.SERVE_MAX_ABS_DIFF


def test_row6_vllm(check):
    r = check.run(6)  # skipped (and recorded so) where vllm does not import
    assert r.status == "pass", r.result


def test_row7_qwen3_encoder_recipe(check):
    r = check.run(7)
    assert r.status == "pass", r.result
    n = r.numbers
    assert n["steps"] == n["max_steps"] and n["mntp_steps"] == n["mntp_max_steps"]
    (side,) = n["throughput"]
    _assert_measured(check, side, "Qwen3 encoder")
    if check.cuda and n.get("estimate"):
        assert n["peak_gpu_gib"] > 0


def test_row8_qwen3_rerank_recipe(check):
    r = check.run(8)
    assert r.status == "pass", r.result
    n = r.numbers
    assert n["steps"] == n["max_steps"] and n["reranker"] == "yes-no"
    # The reloaded folder re-scored its probe pairs within their tolerance (the pass criterion beside the steps).
    assert n["probes"]["ok"] and n["probes"]["n"] > 0 and n["probes"]["max_abs_diff"] <= n["probes"]["atol"]
    (side,) = n["throughput"]
    _assert_measured(check, side, "Qwen3 yes/no reranker")
    # LoRA: only the adapters train; the causal LM reads its prompt causally (half the attention FLOPs).
    assert 0 < side["flops_config"]["trainable"] < side["flops_config"]["params"] / 5
    assert side["flops_config"]["causal"]
    # --estimate-memory's peak for the row's recipe, beside the measured one.
    assert n["estimate"] and n["estimate"]["texts_at_once"] == n["pairs_per_step"]
    if check.cuda:
        assert n["peak_gpu_gib"] > 0 and n["peak_vs_estimate"] > 0
