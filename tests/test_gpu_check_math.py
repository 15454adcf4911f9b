"""The GPU check's arithmetic on the CPU, against hand-computed values: model FLOPs per token, MFU, the peak FLOP/s
assumed per GPU, the step timer's window and token count, and the rows file's Markdown table. (The rows themselves
are tests/gpu, marker `gpu`, deselected here.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def gc():
    from conftest import bench_module

    yield from bench_module("gpu_check")


def test_flops_per_token_mfu_by_hand(gc):
    # Full fine-tuning: 2P forward + 2P to the activations + 2P to the weights = 6P (a 2P-only count, the
    # inference figure, would report a third of the real MFU).
    assert gc.flops_per_token(1000) == 6000
    # LoRA: the frozen base still passes gradients down (4P), only the adapters get weight gradients (2T).
    assert gc.flops_per_token(1000, trainable=10) == 4020
    # Attention: 12 L d sum(s^2); lengths 3 and 7 -> 9 + 49 = 58; L = 2, d = 4.
    assert gc.attention_flops(2, 4, 58) == 12 * 2 * 4 * 58 == 5568
    assert gc.attention_flops(2, 4, 58, causal=True) == 2784
    config = {"params": 1000, "trainable": 1000, "layers": 2, "attention_dim": 4, "causal": False}
    assert gc.training_flops(config, tokens=10, sum_sq_lengths=58) == 60000 + 5568 == 65568
    assert gc.mfu(65568, 2.0, 1e5) == pytest.approx(0.32784)  # 65568 FLOPs / 2 s / 1e5 FLOP/s
    assert gc.mfu(65568, 2.0, None) is None and gc.mfu(65568, 0.0, 1e5) is None


def test_model_flops_config_leaves_the_embedding_tables_out(gc):
    """A BERT of hidden 8, 2 layers, intermediate 16, by hand: per layer q/k/v/o 4 x (8x8 + 8) = 288, attention
    LayerNorm 16, intermediate 8x16 + 16 = 144, output 16x8 + 8 = 136, LayerNorm 16 -> 600; x2 = 1200; pooler
    8x8 + 8 = 72; the embeddings' LayerNorm 16 -> 1288. The word / position / type tables (800 + 256 + 16) are
    lookups, not matmuls: counted, they would inflate MiniLM's FLOPs (and MFU) about 2x."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=16, max_position_embeddings=32, type_vocab_size=2))
    assert gc.model_flops_config(model) == {"params": 1288, "trainable": 1288, "layers": 2, "attention_dim": 8,
                                            "causal": False}
    for p in model.pooler.parameters():
        p.requires_grad_(False)
    assert gc.model_flops_config(model, causal=True)["trainable"] == 1288 - 72
    # A bitsandbytes 4-bit weight stores 2 values a byte: its count is its quant_state's shape, not its numel.
    packed = torch.nn.Parameter(torch.zeros(32, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = SimpleNamespace(shape=torch.Size([8, 8]))
    assert gc._param_count(packed) == 64


def test_peak_flops_by_gpu_name(gc):
    table = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
             "NVIDIA L4": 121e12}
    for name, peak in table.items():
        assert gc.gpu_peak_flops(name, env={})[0] == peak, name
    assert gc.gpu_peak_flops("NVIDIA H100 80GB HBM3", env={})[1] == "H100 SXM bf16 dense"
    # An L40S is not an L4 (a substring match would give it the L4's 121 TFLOP/s): unknown, MFU n/a.
    peak, why = gc.gpu_peak_flops("NVIDIA L40S", env={})
    assert peak is None and "GPU_PEAK_FLOPS" in why
    assert gc.gpu_peak_flops("NVIDIA L40S", env={"GPU_PEAK_FLOPS": "362e12"}) == (362e12, "$GPU_PEAK_FLOPS")
    assert gc.gpu_peak_flops(None, env={})[0] is None
    with pytest.raises(gc.CheckError):
        gc.gpu_peak_flops("NVIDIA H100", env={"GPU_PEAK_FLOPS": "fast"})


class _Embed(__import__("torch").nn.Module):
    def forward(self, features):
        return features["attention_mask"].float().sum(-1, keepdim=True)


def test_step_timer_times_the_loop_after_the_warm_up_step_and_counts_non_pad_tokens(gc):
    """The issue's row-2 bug: one side timed with model loading, the other without. The timer starts at the end of
    step 1 on every trainer; it counts non-pad tokens of forwards with autograd in training mode only (not GradCache's
    no-grad pass, not evaluation)."""
    import torch

    clock = iter([10.0, 12.5, 14.0]).__next__
    timer = gc.StepTimer("cpu", clock=clock)
    model = _Embed().train()
    timer.attach(model)

    def forward(rows):
        return model({"attention_mask": torch.tensor(rows)})

    forward([[1, 1, 1, 0], [1, 1, 0, 0]])  # step 1 (warm-up): 5 tokens, not timed
    timer.step()
    forward([[1, 1, 1, 1], [1, 0, 0, 0]])  # step 2: lengths 4 and 1
    with torch.no_grad():
        forward([[1, 1, 1, 1], [1, 1, 1, 1]])  # GradCache's first pass: recomputation, not counted
    model.eval()
    forward([[1, 1, 1, 1]])  # evaluation: not counted
    model.train()
    timer.step()
    forward([[1, 1, 1, 0]])  # step 3: length 3
    timer.step()
    s = timer.summary()
    assert (s["steps"], s["timed_steps"], s["seconds"]) == (3, 2, 14.0 - 10.0)
    assert (s["tokens"], s["sum_sq_lengths"], s["sequences"], s["padded_tokens"]) == (8, 4 * 4 + 1 + 3 * 3, 3, 12)
    config = {"params": 100, "trainable": 100, "layers": 1, "attention_dim": 2, "causal": False}
    t = gc.throughput(s, config, 1000.0)
    assert t["tokens_per_s"] == 8 / 4.0 == 2.0
    assert t["samples_per_s"] == 3 / 2 / 4.0  # pairs: 2 texts each
    assert t["padding"] == pytest.approx(1 - 8 / 12)
    # 600 FLOPs x 8 tokens + 12 x 1 x 2 x 26 = 4800 + 624 = 5424 FLOPs in 4 s against a 1000 FLOP/s peak.
    assert t["flops_per_token"] == 5424 / 8
    assert t["mfu"] == pytest.approx(5424 / 4.0 / 1000.0) == 1.356
    one = gc.StepTimer("cpu", clock=iter([1.0]).__next__)
    one.step()  # a single step is all warm-up: nothing timed, no rate
    assert one.summary()["seconds"] is None and gc.throughput(one.summary(), config, 1e3)["tokens_per_s"] is None


def test_rows_file_and_markdown_table(gc, tmp_path):
    rows = tmp_path / "gpu-check" / "rows.json"
    side = {"trainer": "embedkit", "timed_steps": 28, "seconds": 3.5, "samples_per_s": 262.857, "tokens_per_s": 61234.4,
            "padding": 0.4, "peak_gpu_gib": 1.25, "model_tflops_per_s": 12.345, "mfu": 0.0125}
    st = {**side, "trainer": "sentence-transformers", "mfu": None, "padding": None, "peak_gpu_gib": None}
    meta = {"title": "embedkit GPU check on cuda (NVIDIA H100 80GB HBM3)", "gpu": "NVIDIA H100 80GB HBM3",
            "peak_flops": 989e12, "peak_source": "H100 SXM bf16 dense"}
    gc.record_row(rows, gc.RowResult(2, gc.ROW_NAMES[2], "fail", "old", 1.0), meta)
    gc.record_row(rows, gc.RowResult(1, gc.ROW_NAMES[1], "pass", "cosine min 0.9999998", 12.0))
    gc.record_row(rows, gc.RowResult(2, gc.ROW_NAMES[2], "pass", "nDCG@10 ...", 30.0, {"throughput": [side, st]}))
    data = gc.load_rows(rows)
    assert [(r["row"], r["status"]) for r in data["rows"]] == [(1, "pass"), (2, "pass")]  # row 2 replaced
    assert data["meta"]["peak_flops"] == 989e12
    md = gc.render_markdown(data).splitlines()
    assert md[0] == "# embedkit GPU check on cuda (NVIDIA H100 80GB HBM3)"
    assert "| 2 | MiniLM SciFact 1 epoch bf16 vs ST trainer | pass | 30.0 | nDCG@10 ... |" in md
    assert "Total 42.0 s." in md
    at = md.index("## Training throughput")
    assert md[at + 2] == ("| # | trainer | timed steps | seconds | samples/s | tokens/s | padding | peak GPU GiB | "
                          "model TFLOP/s | MFU |")
    assert md[at + 4] == "| 2 | embedkit | 28 | 3.50 | 262.9 | 61,234 | 40% | 1.25 | 12.35 | 1.25% |"
    assert md[at + 5] == "| 2 | sentence-transformers | 28 | 3.50 | 262.9 | 61,234 | n/a | n/a | 12.35 | n/a |"
    # The peak the MFU assumed is printed with the table.
    assert "bf16 peak assumed for NVIDIA H100 80GB HBM3: 989 TFLOP/s (H100 SXM bf16 dense)" in md[-1]
    assert gc.main(["--table", str(rows)]) == 0
    assert gc.main(["--table", str(tmp_path / "none.json")]) == 2
