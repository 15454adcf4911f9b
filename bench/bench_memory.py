"""Peak memory of QLoRA vs LoRA vs full fine-tuning of SmolLM2-135M as an embedding model (CPU).

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/bench_memory.py --steps 3

Each variant runs recipes/smollm2-qlora.yaml for a few steps in its own subprocess with only `adapter.type`
changed (qlora | lora | none), the adapter saved alone (no merge, so the peak is the training's); prints the peak
RSS of each child (ru_maxrss from wait4), its RSS once the model is loaded, the bytes its weights occupy (packed
4-bit storage + quantisation constants for QLoRA) and its time per step.

Why QLoRA's peak RSS barely differs at batch 8 x 128 tokens: the weights of a 135M model are 0.54 GB in fp32 and
0.17 GB with NF4 (the 113 MB embedding matrix is not quantised), while the activations of one forward/backward of
16 sequences through 30 layers are ~3 GB, the same for all three variants. --grad-cache 2 or
--gradient-checkpointing bound the activations, and the weight saving becomes a visible share of the peak.

GPU recipes: `--estimate RECIPE` loads no model and measures nothing; it computes the memory a recipe should need
per GPU from the model's shape (estimate_recipe_memory: NF4 4-bit base, LoRA weights + gradients + AdamW states,
activations at the recipe's batch / max length with gradient checkpointing, the MNTP warm-up's logits) and prints
it as a table. No GPU has been lent to this project's sessions so far: none of these figures is measured on a GPU.

    .venv/bin/python bench/bench_memory.py --estimate recipes/qwen3-0.6b-encoder.yaml
    .venv/bin/python bench/bench_memory.py --estimate recipes/mistral-7b-encoder-zero3.yaml --processes 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VARIANTS = ("qlora", "lora", "none")


# ---------------------------------------------------------------------------------------------------- estimates
# What a recipe should need on a GPU, computed from the model's shape: no model is loaded and nothing is measured.
# The assumptions are embedkit's own code paths (checked on the CPU with small models where the dtype matters):
# - QLoRA base: every decoder Linear in NF4, bitsandbytes' packed 4 bits (0.5 byte/param) + one fp32 absmax per block
#   of 64 (no double quantisation: embedkit's BitsAndBytesConfig) = 0.5625 byte/param. PEFT's
#   prepare_model_for_kbit_training upcasts everything else (embeddings, norms) to fp32 in one process; DeepSpeed
#   keeps them in bf16 and partitions them (the packed 4-bit storage too, stored as bf16 under ZeRO-3; the absmax
#   constants stay whole on every GPU).
# - LoRA (the adapter): fp32 weights + fp32 gradients + AdamW's two fp32 moments = 16 bytes/param in one process;
#   under ZeRO-3 bf16 weights + bf16 gradients on the GPU and fp32 master weights + moments (12 bytes) partitioned,
#   in CPU memory with deepspeed.offload_optimizer.
# - Activations: the texts alive at once (GradCache's sub-batch, else every query and document of the batch) padded
#   to max_length (the worst case). With gradient checkpointing each decoder layer keeps its input; backward
#   recomputes one layer at a time (its saved tensors below, plus gradient buffers). Element size: 4 bytes in one
#   process (the fp32 embeddings keep the residual stream fp32; bitsandbytes returns its input's dtype), 2 under
#   DeepSpeed bf16.
# - MNTP warm-up (one process): its batch of documents through the same layers, plus fp32 logits over the vocabulary
#   for the masked positions: the logits, cross-entropy's saved log-probabilities and their gradient.
# Not counted: the CUDA context and the allocator's cached blocks (~0.5-1 GiB outside torch.cuda.max_memory_allocated),
# DeepSpeed's communication buffers, evaluation, and the merged full-precision copy written at the end.
# Checked on the CPU only (tests/test_train_memory.py, tests/test_gpu_check.py): the parameter counts equal transformers' own for these shapes,
# the weight bytes match what a small QLoRA model loads, and one layer's saved tensors match a count taken with
# torch.autograd.graph.saved_tensors_hooks within 15%. The activation peak itself is not measured anywhere yet.
@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # input and output embeddings are one matrix (MNTP then needs no separate LM head)
    qk_norm: bool = False  # Qwen3's RMSNorm on every head's queries and keys
    qkv_bias: bool = False  # Qwen2's biases on q, k and v (kept unquantised)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder Linear, by PEFT target name."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
                "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def parameters(self) -> int:
        """The backbone's parameters (AutoModel: embeddings, layers, final norm; no LM head), what an encoder loads."""
        per_layer = sum(a * b for a, b in self.linears().values()) + 2 * self.hidden + \
            (2 * self.head_dim if self.qk_norm else 0) + \
            ((self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0)
        return self.layers * per_layer + self.vocab * self.hidden + self.hidden


# Hub models the recipes name (their config.json, read once; the GPU machines have no hub to ask).
KNOWN_SHAPES: dict[str, Shape] = {
    "Qwen/Qwen3-0.6B": Shape(28, 1024, 3072, 16, 8, 128, 151936, tied=True, qk_norm=True),
    "Qwen/Qwen3-Embedding-0.6B": Shape(28, 1024, 3072, 16, 8, 128, 151669, tied=True, qk_norm=True),
    "mistralai/Mistral-7B-v0.1": Shape(32, 4096, 14336, 32, 8, 128, 32000, tied=False),
    "intfloat/e5-mistral-7b-instruct": Shape(32, 4096, 14336, 32, 8, 128, 32000, tied=False),
    "Qwen/Qwen2.5-7B": Shape(28, 3584, 18944, 28, 4, 128, 152064, tied=False, qkv_bias=True),
    "smollm2-135m": Shape(30, 576, 1536, 9, 3, 64, 49152, tied=True),
}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shape_from_config(config: dict) -> Shape:
    """A Shape from a Llama / Mistral / Qwen2 / Qwen3 config.json (as a dict)."""
    heads = int(config["num_attention_heads"])
    return Shape(layers=int(config["num_hidden_layers"]), hidden=int(config["hidden_size"]),
                 intermediate=int(config["intermediate_size"]), heads=heads,
                 kv_heads=int(config.get("num_key_value_heads") or heads),
                 head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
                 vocab=int(config["vocab_size"]), tied=bool(config.get("tie_word_embeddings", False)),
                 qk_norm=config.get("model_type") == "qwen3",
                 qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")))


def shape_of(name: str) -> Shape:
    """The shape of a recipe's model.name: a known hub id, or a local folder's config.json."""
    if name in KNOWN_SHAPES:
        return KNOWN_SHAPES[name]
    config = Path(name).expanduser() / "config.json"
    if config.is_file():
        return shape_from_config(json.loads(config.read_text()))
    raise SystemExit(f"no shape for {name!r}: add it to KNOWN_SHAPES or point model.name at a folder with config.json")


def _layer_elements_per_token(shape: Shape) -> int:
    """Elements one decoder layer saves for backward per token (LoRA without dropout on the frozen 4-bit base: each
    Linear's input is saved once for its adapter; SDPA saves q, k, v, its output and a per-row statistic)."""
    h, q, kv, i = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    norms = 2 * (h + h)                      # two RMSNorms: input and output
    projections = q + 2 * kv                 # q, k, v
    qk_norm = (q + kv) if shape.qk_norm else 0
    rotary = q + kv                          # rotated q and k
    attention = q + shape.heads              # SDPA output (+ logsumexp)
    mlp = 4 * i                              # gate, up, SiLU(gate), SiLU(gate) * up
    return norms + projections + qk_norm + rotary + attention + mlp


def activation_bytes(shape: Shape, texts: int, length: int, *, element: int, checkpointing: bool,
                     bidirectional: bool = False) -> int:
    """Peak activation bytes of one forward + backward of `texts` sequences of `length` tokens (padded)."""
    tokens = texts * length
    layer = _layer_elements_per_token(shape) * tokens * element
    # bidirectional attention passes an explicit [texts, 1, L, L] bool mask (causal SDPA builds none)
    mask = texts * length * length if bidirectional else 0
    biggest = max(a * b for a, b in shape.linears().values())
    dequantised = 2 * biggest * 2  # bitsandbytes dequantises a weight to bf16 in forward and again in backward
    if not checkpointing:
        return shape.layers * layer + mask + dequantised + 2 * tokens * shape.hidden * element
    kept = shape.layers * tokens * shape.hidden * element  # every layer's input
    grads = 2 * tokens * (shape.intermediate + shape.hidden) * element  # gradient buffers of the layer in backward
    return kept + layer + grads + mask + dequantised


def estimate_recipe_memory(recipe, shape: Shape | None = None, *, processes: int = 1) -> dict:
    """Bytes per GPU (and per process in CPU memory, for ZeRO-3's offloaded optimizer) a recipe should need.
    Returns the components, `peak_bytes` and the assumptions' inputs. An estimate: see the notes above."""
    shape = shape or shape_of(recipe.model.name)
    m, a, t, d = recipe.model, recipe.adapter, recipe.training, recipe.deepspeed
    zero3 = d.stage == "zero3"
    n = processes if zero3 else 1  # ZeRO-3 partitions weights and optimizer state across the processes
    if a.type != "qlora":
        raise SystemExit("the estimate covers QLoRA recipes (adapter.type: qlora)")
    linear = sum(x * y for x, y in shape.linears().values()) * shape.layers
    other = shape.parameters - linear
    nf4_bytes = linear // 2
    absmax_bytes = linear // 64 * 4
    other_element = 2 if zero3 else 4
    weights = nf4_bytes // n + absmax_bytes + other * other_element // n
    gathered = 0
    if zero3:  # the other processes' shards of one layer gathered for its forward / backward, and the next prefetched
        gathered = 2 * (nf4_bytes // shape.layers) * (n - 1) // n
    targets = ALL_LINEAR if a.targets == "all-linear" else [x for x in ([a.targets] if isinstance(a.targets, str)
                                                                          else a.targets) if x in ALL_LINEAR]
    lora = shape.layers * sum(a.r * sum(shape.linears()[x]) for x in targets)
    if zero3:
        lora_gpu = lora * (2 + 2) // n + (0 if d.offload_optimizer else lora * 12 // n)
        lora_cpu = lora * 12 // n if d.offload_optimizer else 0
    else:
        lora_gpu, lora_cpu = lora * 16, 0
    element = 2 if zero3 else 4
    texts = t.grad_cache or t.batch_size * (2 + recipe.loss.hard_negatives)
    length = m.max_length or 512
    bidirectional = m.attention == "bidirectional"
    contrastive = activation_bytes(shape, texts, length, element=element, checkpointing=m.gradient_checkpointing,
                                   bidirectional=bidirectional)
    mntp = logits = 0
    mp = recipe.mntp
    if mp.steps:
        masked = int(mp.batch_size * mp.max_length * mp.mask_ratio)
        logits = 3 * masked * shape.vocab * 4
        logits += 0 if shape.tied else shape.vocab * shape.hidden * 4  # the LM head, read from disk beside the model
        mntp = activation_bytes(shape, mp.batch_size, mp.max_length, element=element,
                                checkpointing=m.gradient_checkpointing, bidirectional=bidirectional) + logits
    fixed = weights + gathered + lora_gpu
    peak = fixed + max(contrastive, mntp)
    return {"model": recipe.model.name, "processes": processes, "zero3": zero3, "parameters": shape.parameters,
            "lora_parameters": lora, "weights_bytes": weights, "nf4_bytes": nf4_bytes // n,
            "absmax_bytes": absmax_bytes, "other_weights_bytes": other * other_element // n,
            "zero3_gathered_bytes": gathered, "lora_state_bytes": lora_gpu, "cpu_optimizer_bytes": lora_cpu,
            "activations_bytes": contrastive, "mntp_bytes": mntp, "mntp_logits_bytes": logits,
            "mntp_texts": mp.batch_size, "mntp_max_length": mp.max_length, "peak_bytes": peak,
            "texts_at_once": texts, "max_length": length, "activation_element_bytes": element,
            "gradient_checkpointing": m.gradient_checkpointing}


def format_estimate(e: dict) -> str:
    """A markdown table of one estimate (GiB)."""
    g = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    n = e["processes"]
    per = f"per GPU, {n} GPU{'s' if n > 1 else ''} (ZeRO-3)" if e["zero3"] else "one GPU"
    rows = [("weights: NF4 base (packed 4-bit + absmax)", g(e["nf4_bytes"] + e["absmax_bytes"])),
            ("weights: embeddings + norms (" + ("bf16, partitioned" if e["zero3"] else "fp32") + ")",
             g(e["other_weights_bytes"]))]
    if e["zero3"]:
        rows.append(("ZeRO-3: layers gathered for compute", g(e["zero3_gathered_bytes"])))
    rows += [(f"LoRA {e['lora_parameters'] / 1e6:.1f}M params: weights + grads" +
              ("" if e["cpu_optimizer_bytes"] else " + AdamW states"), g(e["lora_state_bytes"])),
             (f"activations: {e['texts_at_once']} texts x {e['max_length']} tokens, "
              f"{'checkpointed' if e['gradient_checkpointing'] else 'no checkpointing'}", g(e["activations_bytes"]))]
    if e["mntp_bytes"]:
        rows.append((f"MNTP warm-up (before training): activations, {e['mntp_texts']} texts x {e['mntp_max_length']} "
                     "tokens", g(e["mntp_bytes"] - e["mntp_logits_bytes"])))
        rows.append(("MNTP warm-up: fp32 vocabulary logits of the masked tokens (+ LM head if untied)",
                     g(e["mntp_logits_bytes"])))
    rows.append((f"**peak, {per}** (weights + LoRA + the larger stage)", f"**{g(e['peak_bytes'])}**"))
    if e["cpu_optimizer_bytes"]:
        rows.append(("CPU memory per process: offloaded fp32 master LoRA + AdamW", g(e["cpu_optimizer_bytes"])))
    lines = [f"| {e['model']} (backbone {e['parameters'] / 1e9:.2f}B params) | GiB (estimate) |", "|---|---:|"]
    return "\n".join(lines + [f"| {a} | {b} |" for a, b in rows])


def child(variant: str, steps: int, batch: int, max_length: int, data: str, output: str,
          grad_cache: int | None = None, checkpointing: bool = False) -> dict:
    from embedkit.manifest import MANIFEST_NAME
    from embedkit.train.config import load_recipe
    from embedkit.train.contrastive import train

    overrides = [f"adapter.type={variant}", "adapter.save=adapter" if variant != "none" else "adapter.save=merged",
                 f"training.max_steps={steps}", f"training.batch_size={batch}",
                 f"training.grad_cache={grad_cache or 'null'}", f"model.gradient_checkpointing={checkpointing}",
                 f"model.max_length={max_length}", f"data.train={data}/medquad/train_pairs.jsonl", "data.dev=null",
                 f"data.max_examples={steps * batch}", f"training.output_dir={output}", "training.progress=false",
                 "training.checkpoint_every=null", "mntp.steps=0"]  # the contrastive step's memory alone
    recipe = load_recipe(REPO / "recipes" / "smollm2-qlora.yaml", overrides)
    result = train(recipe)
    from embedkit.models.adapters import trainable_parameters  # noqa: F401  (import cost outside the timing)

    memory = json.loads((Path(output) / MANIFEST_NAME).read_text())["training"]["stats"]["memory"]
    return {"steps": result.steps, "seconds_per_step": result.train_seconds / max(result.steps, 1),
            "final_loss": result.final_loss, "memory": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default="/tmp/embedkit-bench-memory")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--grad-cache", type=int, default=None,
                        help="GradCache sub-batch (default: none, the whole batch's activations are alive at once)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in backward (bounds the activation memory per layer)")
    parser.add_argument("--json")
    parser.add_argument("--estimate", metavar="RECIPE",
                        help="print the GPU memory RECIPE should need (an estimate from the model's shape; loads no "
                             "model, runs nothing) and exit")
    parser.add_argument("--processes", type=int, default=1,
                        help="with --estimate: processes (GPUs) a ZeRO-3 recipe is partitioned over")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="with --estimate: a recipe override, as `embedkit train --set`")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.estimate:
        from embedkit.train.config import load_recipe

        recipe = load_recipe(args.estimate, args.overrides, validate=False)
        estimate = estimate_recipe_memory(recipe, processes=args.processes)
        print(format_estimate(estimate))
        print("(estimates from the model's shape, not measurements: no GPU has been lent to this project's sessions)")
        if args.json:
            Path(args.json).write_text(json.dumps(estimate, indent=2))
        return
    if args.child:
        out = child(args.child, args.steps, args.batch_size, args.max_length, args.data, f"{args.out}/{args.child}",
                    args.grad_cache, args.gradient_checkpointing)
        Path(args.result).write_text(json.dumps(out))
        return

    from embedkit.models.registry import smollm2_path

    smollm2_path()  # convert once, outside the measured children
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = {}
    for variant in args.variants.split(","):
        result_file = Path(args.out) / f"{variant}.result.json"
        cmd = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--max-length", str(args.max_length), "--data", args.data, "--out", args.out,
               "--result", str(result_file)]
        if args.grad_cache:
            cmd += ["--grad-cache", str(args.grad_cache)]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{variant} failed")
        row = json.loads(result_file.read_text())
        row["peak_rss_gb"] = usage.ru_maxrss / 1e6
        row["wall_s"] = time.perf_counter() - t0
        rows[variant] = row
        name = {"qlora": "QLoRA (NF4 base + LoRA)", "lora": "LoRA (fp32 base)", "none": "full fine-tuning"}[variant]
        mem = row["memory"]
        weights = mem["parameters"]
        kinds = ", ".join(f"{k} {v / 1e6:.0f}" for k, v in weights["by_kind_bytes"].items())
        print(f"{name:26s} peak RSS {row['peak_rss_gb']:.2f} GB (after loading {mem['rss_after_load_gb']:.2f} GB)   "
              f"weights {weights['total_bytes'] / 1e6:.0f} MB [{kinds}], "
              f"trainable {weights['trainable_bytes'] / 1e6:.1f} MB   {row['seconds_per_step']:.1f} s/step", flush=True)
    print(f"(batch {args.batch_size}, max length {args.max_length}, GradCache {args.grad_cache or 'off'}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; peak RSS = activations + weights "
          "+ gradients/optimizer state + the Python runtime)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
