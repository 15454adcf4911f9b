"""GPU memory a QLoRA or LoRA recipe should need, estimated from the model's shape: `embedkit train RECIPE
--estimate-memory [--nproc N]`. No model is loaded, nothing is measured, no GPU or hub is needed.

What it estimates, per GPU (and per process in CPU memory for ZeRO-3's offloaded optimizer):
- the QLoRA base: every decoder Linear in NF4, bitsandbytes' packed 4 bits (0.5 byte/param) + one fp32 absmax per
  block of 64 (no double quantisation: embedkit's BitsAndBytesConfig) = 0.5625 byte per weight. In one process PEFT's
  prepare_model_for_kbit_training upcasts everything else (embeddings, norms) to fp32; DeepSpeed keeps them in bf16
  and partitions them (the packed 4-bit storage too, stored as bf16 under ZeRO-3; the absmax constants stay whole on
  every GPU);
- ZeRO-3 per-process partitioning over N processes (--nproc): weights and optimizer state split N ways, plus the
  other processes' shards of one layer gathered for its forward / backward and the next prefetched;
- a LoRA (not QLoRA) base: every weight in model.dtype (fp32 with training.mixed_precision), frozen; one process
  (or DDP, each process holding the whole model): ZeRO-3 with LoRA is not estimated;
- the LoRA adapter: fp32 weights + fp32 gradients + AdamW's two fp32 moments = 16 bytes/param in one process; under
  ZeRO-3 bf16 weights + bf16 gradients on the GPU and fp32 master weights + moments (12 bytes) partitioned, in CPU
  memory with deepspeed.offload_optimizer;
- activations: the texts alive at once (GradCache's sub-batch, else every query and document of the batch; for a
  `task: rerank` recipe every (query, document) pair of the batch, 1 + hard_negatives per row) padded to
  max_length (the worst case: texts are padded to the batch's longest). With gradient checkpointing each decoder
  layer keeps its input and backward recomputes one layer at a time (its saved tensors, plus gradient buffers).
  Element size: 4 bytes in one process (PEFT's k-bit preparation leaves the embeddings, hence the residual stream
  and the activations, in fp32; `model.dtype: bf16` is the 4-bit compute dtype), 2 under DeepSpeed bf16;
- the MNTP warm-up (the phase before the contrastive one): its batch of documents (per process) through the same
  layers, plus fp32 logits over the vocabulary for the masked positions (the logits, cross-entropy's saved
  log-probabilities and their gradient);
- the yes/no reranker (`task: rerank` on a causal LM): its LM head (kept unquantised; shared with the embeddings
  when tied) and the last position's vocabulary logits of every pair (fp32, with their gradient).

What it leaves out: the CUDA context and the allocator's cached blocks (~0.5-1 GiB outside
torch.cuda.max_memory_allocated), DeepSpeed's communication buffers, evaluation, and the merged full-precision copy
written at the end. Only LoRA and QLoRA recipes are covered (LoRA without ZeRO-3), and ZeRO-2 is counted as one
process's layout.

These are estimates, not measurements: no GPU has been lent to this project's sessions so far. Checked on the CPU
only (tests/test_train_memory.py, tests/test_gpu_check.py): the parameter counts equal transformers' own for these
shapes, the weight bytes match what a small QLoRA model loads, and one layer's saved tensors match a count taken with
torch.autograd.graph.saved_tensors_hooks within 15%. The activation peak itself is not measured anywhere yet.

Model shapes: hub ids the recipes name come from KNOWN_SHAPES (their config.json, read once: the GPU machines and
this CPU machine have no hub to ask); any other model.name must be a local folder with a config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from embedkit.errors import ConfigError

ESTIMATE_NOTE = ("(estimates from the model's shape, not measurements: no GPU has been lent to this project's "
                 "sessions; not counted: the CUDA context, ~0.5-1 GiB, and DeepSpeed's buffers)")


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


def shape_of(name: str, *, source: str | Path | None = None) -> Shape:
    """The shape of a recipe's model.name: a known hub id, or a local folder's config.json (`source`: the recipe
    file, for the error)."""
    if name in KNOWN_SHAPES:
        return KNOWN_SHAPES[name]
    config = Path(name).expanduser() / "config.json"
    if config.is_file():
        return shape_from_config(json.loads(config.read_text()))
    raise ConfigError(f"no model shape for {name!r} to estimate from: not one of {', '.join(KNOWN_SHAPES)} "
                      "(embedkit.train.memory.KNOWN_SHAPES) and not a folder with a config.json", path=source,
                      field="model.name")


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


def estimate_recipe_memory(recipe, shape: Shape | None = None, *, processes: int = 1,
                           source: str | Path | None = None) -> dict:
    """Bytes per GPU (and per process in CPU memory, for ZeRO-3's offloaded optimizer) a recipe should need with
    `processes` processes. Returns the components, `peak_bytes` and the assumptions' inputs. An estimate: see the
    module's docstring. Raises ConfigError (naming `source`) for a model without a known shape or a non-QLoRA
    recipe."""
    if recipe.adapter.type not in ("qlora", "lora"):
        raise ConfigError("the memory estimate covers QLoRA and LoRA recipes only (adapter.type: qlora | lora)",
                          path=source, field="adapter.type")
    if processes < 1:
        raise ConfigError(f"processes must be at least 1, not {processes}", field="nproc")
    m, a, t, d = recipe.model, recipe.adapter, recipe.training, recipe.deepspeed
    zero3 = d.stage == "zero3"
    if a.type == "lora" and zero3:
        raise ConfigError("the memory estimate covers LoRA in one process (or DDP); under ZeRO-3 only QLoRA",
                          path=source, field="deepspeed.stage")
    shape = shape or shape_of(recipe.model.name, source=source)
    rerank = getattr(recipe, "task", "embed") == "rerank"
    n = processes if zero3 else 1  # ZeRO-3 partitions weights and optimizer state across the processes
    linear = sum(x * y for x, y in shape.linears().values()) * shape.layers
    # the yes/no reranker loads the causal LM with its LM head: a matrix of its own unless tied to the embeddings
    other = shape.parameters - linear + (shape.vocab * shape.hidden if rerank and not shape.tied else 0)
    if a.type == "qlora":
        nf4_bytes = linear // 2
        absmax_bytes = linear // 64 * 4
        other_element = 2 if zero3 else 4
        linear_bytes = nf4_bytes // n + absmax_bytes
    else:  # LoRA: the frozen base as stored
        nf4_bytes = absmax_bytes = 0
        other_element = 4 if m.dtype == "fp32" else 2
        linear_bytes = linear * other_element
    weights = linear_bytes + other * other_element // n
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
    if rerank:  # every (query, document) pair of the batch goes through the model at once
        texts = t.batch_size * (1 + recipe.loss.hard_negatives)
    else:
        texts = t.grad_cache or t.batch_size * (2 + recipe.loss.hard_negatives)
    length = m.max_length or 512
    bidirectional = getattr(m, "attention", None) == "bidirectional"
    contrastive = activation_bytes(shape, texts, length, element=element, checkpointing=m.gradient_checkpointing,
                                   bidirectional=bidirectional)
    # the yes/no reranker's last-position vocabulary logits of every pair, and their gradient (fp32)
    rerank_logits = 2 * texts * shape.vocab * 4 if rerank else 0
    contrastive += rerank_logits
    mntp = logits = 0
    mp = recipe.mntp
    if mp.steps and not rerank:
        masked = int(mp.batch_size * mp.max_length * mp.mask_ratio)
        logits = 3 * masked * shape.vocab * 4
        logits += 0 if shape.tied else shape.vocab * shape.hidden * 4  # the LM head, read from disk beside the model
        mntp = activation_bytes(shape, mp.batch_size, mp.max_length, element=element,
                                checkpointing=m.gradient_checkpointing, bidirectional=bidirectional) + logits
    fixed = weights + gathered + lora_gpu
    peak = fixed + max(contrastive, mntp)
    return {"model": recipe.model.name, "adapter": a.type, "base_dtype": "nf4" if a.type == "qlora" else m.dtype,
            "task": "rerank" if rerank else "embed", "rerank_logits_bytes": rerank_logits,
            "separate_lm_head": rerank and not shape.tied,
            "linear_weights_bytes": linear_bytes, "processes": processes, "zero3": zero3,
            "parameters": shape.parameters,
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
    if e["zero3"]:
        per = f"per GPU, {n} GPU{'s' if n > 1 else ''} (ZeRO-3)"
    else:
        per = "one GPU" if n == 1 else f"per GPU, {n} GPUs (each holds the whole model)"
    if e.get("adapter", "qlora") == "qlora":
        rows = [("weights: NF4 base (packed 4-bit + absmax)", g(e["nf4_bytes"] + e["absmax_bytes"])),
                ("weights: embeddings + norms (" + ("bf16, partitioned" if e["zero3"] else "fp32") + ")",
                 g(e["other_weights_bytes"]))]
    else:
        rows = [(f"weights: {e['base_dtype']} base, layers' Linears (frozen under LoRA)", g(e["linear_weights_bytes"])),
                (f"weights: {e['base_dtype']} embeddings + norms" + (" + LM head" if e["separate_lm_head"] else ""),
                 g(e["other_weights_bytes"]))]
    if e["zero3"]:
        rows.append(("ZeRO-3: layers gathered for compute", g(e["zero3_gathered_bytes"])))
    rows += [(f"LoRA {e['lora_parameters'] / 1e6:.1f}M params: weights + grads" +
              ("" if e["cpu_optimizer_bytes"] else " + AdamW states"), g(e["lora_state_bytes"])),
             (f"activations: {e['texts_at_once']} {'pairs' if e.get('task') == 'rerank' else 'texts'} x "
              f"{e['max_length']} tokens, {'checkpointed' if e['gradient_checkpointing'] else 'no checkpointing'}"
              + (" (+ their last-position vocabulary logits)" if e.get("rerank_logits_bytes") else ""),
              g(e["activations_bytes"]))]
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
