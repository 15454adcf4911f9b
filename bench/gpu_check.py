"""GPU check: the GPU-specific paths of embedkit, run once on one GPU, one table out (<= 10 minutes on an H200).

    bash scripts/gpu-check.sh                  # = pytest -m gpu tests/gpu, then the table of runs/gpu-check/rows.json
    bash scripts/gpu-check.sh -k "row1 or row2 or row5"       # some rows (pytest's -k; the rows file is appended to)
    .venv/bin/python bench/gpu_check.py --table runs/gpu-check/rows.json        # the Markdown table of a rows file
    .venv/bin/python bench/gpu_check.py --device cpu --quick  # the direct runner (no pytest): CPU smoke test

The rows are pytest tests marked `gpu` (tests/gpu/test_gpu_rows.py): each runs its row in its own process (through
run_row_process below), appends the row to the rows file ($GPU_CHECK_ROWS, default runs/gpu-check/rows.json) and
asserts what the row must show. The default pytest run deselects them (pyproject: -m "not gpu"); `pytest -m gpu`
without a CUDA device stops at once with a usage error ("no CUDA device"), never a silent skip. One GPU is visible
to the rows (CUDA_VISIBLE_DEVICES: the first of the given ones), so no library (HF Trainer: DataParallel) spreads a
one-GPU row over several.

Rows (each: result numbers, pass / fail / skipped, seconds):
  1  encode parity CPU vs GPU: MiniLM, 200 built-in texts, fp32; min / mean cosine; pass: min cosine >= 0.9999
  2  MiniLM on SciFact train, 1 epoch, bf16, vs sentence-transformers' SentenceTransformerTrainer + MNRL on the same
     GPU with matched settings (batch 32, lr 2e-5, warmup 0.1, weight decay 0.01, clipping 1.0, max length 256, seed
     42, the recipe's attention dropout 0 (hidden dropout 0.1) on both sides, ST's NO_DUPLICATES batch sampler where
     embedkit masks in-batch duplicates), each side in its own process: nDCG@10 on SciFact test; and, with the same
     timer on both sides (StepTimer), samples/s, tokens/s, MFU and peak GPU memory. Pass: embedkit's nDCG@10 >=
     ST's - 0.005 (one seeded run each; the speed ratio is reported, not gated)
  3  SmolLM2-135M QLoRA contrastive, recipes/smollm2-qlora.yaml with training.max_steps=20, bf16 autocast: steps,
     samples/s, tokens/s, MFU, peak GPU memory (torch.cuda.max_memory_allocated), loss first -> last; pass: all
     steps, finite loss
  4  DeepSpeed ZeRO-3 + QLoRA (one process): SmolLM2 for 6 steps, checkpoints every 2; a run SIGKILLed after step 5
     and resumed with --resume must end with the uninterrupted run's LoRA weights (max |diff| <= --resume-atol)
  5  `embedkit serve --model <row 2's model> --device cuda`: /v1/embeddings vectors vs in-process `encode` on the
     same device; pass: max |diff| <= 1e-5 (fp32)
  6  vLLM (only where `import vllm` works): row 2's model through `embedkit export --format hf` and
     `embedkit serve --engine vllm` (run_vllm): vLLM's probe vectors vs the stored ones (atol 1e-3)
  7  Qwen3-0.6B encoder recipe for a few steps: recipes/qwen3-0.6b-encoder.yaml (bidirectional attention, mean
     pooling, MNTP warm-up, QLoRA, bf16, gradient checkpointing) through row 3's code path on a randomly initialised
     Qwen3 of the real 0.6B shape (28 layers, hidden 1024, intermediate 3072, 16 heads, 8 KV heads, head_dim 128,
     Qwen3's 151,936-row tied vocabulary; the box has no hub) saved as a local folder with SmolLM2's tokenizer:
     4 MNTP steps, then training.max_steps=10 at the recipe's batch 128 / GradCache 32 / max length 512: steps,
     samples/s, tokens/s, MFU, peak GPU memory (beside embedkit.train.memory's estimate), loss first -> last of both
     stages; pass: all steps of both stages, finite losses. --quick: a 2-layer, 256-d Qwen3, 2 + 3 steps, batch 4
  8  Qwen3-0.6B yes/no reranker recipe for a few steps: recipes/qwen3-0.6b-rerank.yaml (task: rerank, LoRA r16, fp32
     weights with bf16 autocast, gradient checkpointing) through the same code path on row 7's random Qwen3, on a
     slice of SciFact train (200 queries, a pool of <= 2,000 documents from which the recipe's first stage, MiniLM,
     mines 7 negatives a row): training.max_steps=10 at the recipe's batch 16 rows x 8 pairs / max length 512:
     steps, samples/s (a sample: one query-document pair), tokens/s, MFU, peak GPU memory beside
     `embedkit train RECIPE --estimate-memory`'s peak, loss first -> last; then the saved folder reloaded
     (load_reranker) re-scores its probe pairs (rerank_probes.json); pass: all steps, finite loss, probe logits
     within their atol. --quick: row 7's quick Qwen3, 16 queries / <= 200 documents, 3 steps of 2 rows, length 192

Throughput (rows 2, 3, 7, 8; StepTimer, throughput): the training loop only, from the end of the first optimizer step
(a warm-up step: allocator, kernel selection) to the end of the last one -- not model loading, tokenization or
saving -- on CUDA between two CUDA events recorded after those steps (no synchronisation inside the loop; one
torch.cuda.synchronize at the end). tokens/s: the non-pad tokens of the forwards with autograd in those steps.
Model FLOPs per token: 4P + 2T (P: the backbone's non-embedding parameters, T: the trainable ones; 6P when all are
trained) plus attention 12 L d s (L layers, d = heads x head_dim, s the token's sequence length; half with a causal
mask); recomputation (GradCache's first pass, gradient checkpointing) is not counted. MFU = model FLOPs / s / the
GPU's bf16 dense peak (GPU_PEAK_BF16_FLOPS by device name; $GPU_PEAK_FLOPS overrides), printed with the table.
Peak GPU memory: torch.cuda.max_memory_allocated from the start of the row's process to its last step.

Rows 3, 4 and 7 train on SciFact's train pairs (the recipe's MedQuAD file is 20 MB more to carry to an offline GPU
box), row 8 on a slice of them; rows 5 and 6 serve base MiniLM when row 2's model is not in the output folder (e.g.
rows run in separate batches). Row 7 needs what rows 3-4 need (bitsandbytes, the SmolLM2 package for its tokenizer):
run it in their batch; row 8 needs the SmolLM2 package (the tokenizer) and MiniLM's (its first stage).

Each row runs in its own process (a crash, an OOM or a hung collective stays in its row); its log goes to
OUT/gpu_check.log, never to the console. An overall deadline is kept ($GPU_CHECK_BUDGET / --budget, default 570 s):
a row that cannot start in the time left says "skipped: time budget"; one still running at the deadline is stopped
and fails. The direct runner (main, without pytest) prints the table and writes OUT/gpu_check.json and
OUT/gpu_check.md; exit code 0 when no row failed, 1 when one did, 2 on a usage error (e.g. --device cuda without
CUDA).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from embedkit.errors import EmbedkitError  # noqa: E402  (light: no torch)

DEFAULT_BUDGET_S = 570.0  # 10 minutes on one GPU, with room for start-up and the report
QUICK_BUDGET_S = 2400.0  # --device cpu --quick: ~10 min on 2 idle cores, far more on a shared machine
REPORT_NAME = "gpu_check"

ROW_NAMES = {
    1: "encode parity CPU vs GPU (MiniLM, fp32)",
    2: "MiniLM SciFact 1 epoch bf16 vs ST trainer",
    3: "SmolLM2 QLoRA 20 steps bf16",
    4: "ZeRO-3 + QLoRA kill / resume",
    5: "embedkit serve vs encode",
    6: "vLLM serve (HF export) probes",
    7: "Qwen3-0.6B encoder recipe, few steps (random weights)",
    8: "Qwen3-0.6B yes/no reranker recipe, few steps (random weights)",
}
# Seconds a row needs at least; with less left before the deadline it is skipped rather than started.
ROW_MIN_S = {1: 20, 2: 90, 3: 60, 4: 120, 5: 30, 6: 120, 7: 120, 8: 120}
ALL_ROWS = tuple(ROW_NAMES)

PARITY_MIN_COSINE = 0.9999
NDCG_TOLERANCE = 0.005
SERVE_MAX_ABS_DIFF = 1e-5
RESUME_ATOL = 1e-5

# The settings both trainers of row 2 share (bench/bench_train.py's, on the chosen device, bf16).
SHARED = {"batch_size": 32, "lr": 2e-5, "epochs": 1, "max_length": 256, "seed": 42, "warmup_ratio": 0.1,
          "weight_decay": 0.01, "max_grad_norm": 1.0}


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class RowResult:
    row: int
    name: str
    status: str  # pass | fail | skipped
    result: str = ""  # the numbers in words (or the one-line reason)
    seconds: float = 0.0
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CheckError(EmbedkitError):
    """A check that could not be carried out (one line)."""


class Skip(Exception):
    """Raised by a row that does not apply here (its message is the reason)."""


def one_line(exc: BaseException, limit: int = 240) -> str:
    """An exception as one line: embedkit's own message, else `Type: first line`."""
    if isinstance(exc, EmbedkitError):
        text = exc.one_line()
    else:
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------- arguments
def parse_rows(text: str | None) -> list[int]:
    """'1,2,5' -> [1, 2, 5]; 'all' or empty -> every row; ranges '2-4' too. CheckError (one line) otherwise."""
    if text is None or not text.strip() or text.strip().lower() == "all":
        return list(ALL_ROWS)
    rows: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise CheckError(f"--rows: {part!r} is not a row number (use e.g. 1,2,5 or 2-4 or all)",
                             field="rows") from None
        if first > last or first not in ROW_NAMES or last not in ROW_NAMES:
            raise CheckError(f"--rows: no row {part!r} (rows are {min(ALL_ROWS)}-{max(ALL_ROWS)})", field="rows")
        rows.update(range(first, last + 1))
    if not rows:
        raise CheckError("--rows: no row given", field="rows")
    return sorted(rows)


def cuda_status() -> tuple[bool, int, str]:
    """(available, device count, what torch is) -- imports torch."""
    import torch

    build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
    available = torch.cuda.is_available()
    return available, torch.cuda.device_count() if available else 0, f"torch {torch.__version__}, {build}"


def device_error(device: str, status: Callable[[], tuple[bool, int, str]] | None = None) -> str | None:
    """The one-line error for a device this machine cannot give, else None."""
    from embedkit.device import validate_device

    try:
        spec = validate_device(device)
    except EmbedkitError as exc:
        return f"error: --device: {exc.message}"
    if spec in ("cpu", "auto"):
        return None
    available, count, what = (status or cuda_status)()
    if not available:
        return (f"error: --device {spec}: CUDA is not available on this machine ({what}); this check needs a GPU "
                "(run `--device cpu --quick` for the CPU smoke test)")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if index >= count:
        return f"error: --device {spec}: only {count} GPU(s) are visible"
    return None


# ---------------------------------------------------------------------------------------------------- the table
COLUMNS = ("#", "check", "status", "seconds", "result")


def _cells(r: RowResult) -> tuple[str, ...]:
    return (str(r.row), r.name, r.status, f"{r.seconds:.1f}", r.result)


def format_table(results: Sequence[RowResult], *, title: str | None = None, total_s: float | None = None) -> str:
    """A fixed-width text table, one line per row (the result column is last and not cut)."""
    rows = [COLUMNS] + [_cells(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = [title] if title else []
    for n, row in enumerate(rows):
        head = "  ".join(cell.rjust(w) if i in (0, 3) else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        lines.append(f"{head}  {row[-1]}".rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    if total_s is not None:
        counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skipped")}
        lines.append(f"total {total_s:.1f} s: {counts['pass']} pass, {counts['fail']} fail, "
                     f"{counts['skipped']} skipped")
    return "\n".join(lines)


def format_markdown(results: Sequence[RowResult], *, title: str | None = None, total_s: float | None = None) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"# {title}", ""] if title else []
    lines += ["| " + " | ".join(COLUMNS) + " |", "|---|---|---|---:|---|"]
    lines += ["| " + " | ".join(esc(c) for c in _cells(r)) + " |" for r in results]
    if total_s is not None:
        lines += ["", f"Total {total_s:.1f} s."]
    return "\n".join(lines) + "\n"


def write_report(folder: Path, results: Sequence[RowResult], meta: dict[str, Any]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    title = meta.get("title")
    paths = {"json": folder / f"{REPORT_NAME}.json", "md": folder / f"{REPORT_NAME}.md"}
    paths["json"].write_text(json.dumps({"meta": meta, "rows": [r.to_dict() for r in results]}, indent=2) + "\n")
    paths["md"].write_text(render_markdown({"meta": meta, "rows": [r.to_dict() for r in results]}))
    return paths


# ---------------------------------------------------------------------------------------------------- throughput
# bf16 dense tensor-core peak (no 2:4 sparsity) in FLOP/s, by torch.cuda.get_device_name(); the first match wins
# (so the H100 PCIe / NVL lines come before the SXM one). $GPU_PEAK_FLOPS overrides it and covers any other GPU.
GPU_PEAK_BF16_FLOPS: tuple[tuple[str, float, str], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756e12, "H100 PCIe"),
    (r"\bH100\b.*\bNVL\b", 835e12, "H100 NVL"),
    (r"\bH100\b", 989e12, "H100 SXM"),
    (r"\bH200\b", 989e12, "H200"),
    (r"\bA100\b", 312e12, "A100"),
    (r"\bL4\b", 121e12, "L4"),
)
PEAK_ENV = "GPU_PEAK_FLOPS"


def gpu_peak_flops(name: str | None, env: Mapping[str, str] | None = None) -> tuple[float | None, str]:
    """(the GPU's bf16 dense peak FLOP/s or None, where that number comes from) -- for MFU."""
    env = os.environ if env is None else env
    raw = (env.get(PEAK_ENV) or "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise CheckError(f"${PEAK_ENV}={raw!r} is not a number of FLOP/s (e.g. 989e12)", field=PEAK_ENV) from None
        if not value > 0:
            raise CheckError(f"${PEAK_ENV}={raw!r} must be > 0", field=PEAK_ENV)
        return value, f"${PEAK_ENV}"
    for pattern, flops, label in GPU_PEAK_BF16_FLOPS:
        if name and re.search(pattern, name, re.IGNORECASE):
            return flops, f"{label} bf16 dense"
    return None, f"no bf16 peak known for {name or 'this device'!r}: set ${PEAK_ENV} for MFU"


def _param_count(p) -> int:
    """Elements of a parameter; a bitsandbytes 4-bit weight counts its unpacked shape, not its packed bytes."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(math.prod(shape)) if shape is not None else int(p.numel())


def model_flops_config(backbone, *, causal: bool = False) -> dict[str, Any]:
    """What the model-FLOPs formula needs from a (possibly LoRA-wrapped, 4-bit) transformer: its non-embedding
    parameters (an embedding lookup is no matmul: counting MiniLM's 11.7M-entry word table would double its FLOPs),
    the trainable ones among them, layers, attention width (heads x head_dim) and whether attention is causal."""
    import torch

    embedding = {id(m.weight) for m in backbone.modules() if isinstance(m, torch.nn.Embedding)}
    params = trainable = 0
    for _name, p in backbone.named_parameters():  # shared (tied) weights once
        if id(p) in embedding:
            continue
        n = _param_count(p)
        params += n
        trainable += n if p.requires_grad else 0
    config = backbone.config
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"params": params, "trainable": trainable, "layers": int(config.num_hidden_layers),
            "attention_dim": heads * int(head_dim), "causal": bool(causal)}


def flops_per_token(params: int, trainable: int | None = None) -> float:
    """Dense training FLOPs per token: 2P forward, 2P backward to the activations, 2T backward to the trainable
    weights (= 6P when every weight trains; 4P + 2T for LoRA, whose frozen base still passes gradients down)."""
    trainable = params if trainable is None else trainable
    return 4.0 * params + 2.0 * trainable


def attention_flops(layers: int, attention_dim: int, sum_sq_lengths: float, *, causal: bool = False) -> float:
    """Training FLOPs of the scores (Q K^T) and the weighted sum (A V): 2 matmuls x 2 FLOPs x d x s per token and
    layer forward, x3 with the backward = 12 L d s per token, i.e. 12 L d sum(s_i^2) over the sequences; half of it
    under a causal mask."""
    flops = 12.0 * layers * attention_dim * sum_sq_lengths
    return flops / 2 if causal else flops


def training_flops(config: Mapping[str, Any], tokens: float, sum_sq_lengths: float) -> float:
    """Model FLOPs of `tokens` non-pad training tokens (their sequences' squared lengths summing to sum_sq)."""
    return (flops_per_token(config["params"], config["trainable"]) * tokens
            + attention_flops(config["layers"], config["attention_dim"], sum_sq_lengths, causal=config["causal"]))


def mfu(model_flops: float, seconds: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: model FLOPs per second / the GPU's peak (None without a peak or a time)."""
    if not peak_flops or not seconds or seconds <= 0:
        return None
    return model_flops / seconds / peak_flops


class StepTimer:
    """The one timer of every trainer the check measures (both sides of row 2, rows 3, 7 and 8).

    `attach(module)` on the module that receives the tokenized batch as its first argument (embedkit's Encoder and
    Reranker, sentence-transformers' Transformer module); `step()` at the end of every optimizer step; `summary()`
    after training. Timed: from the end of step `warmup` to the end of the last step. On CUDA both ends are CUDA events
    recorded on the stream after the steps' work, so nothing inside the loop synchronises (which would change what
    is timed); summary() synchronises once. Elsewhere, `clock` (perf_counter). Tokens: the attention mask of every
    forward with autograd in training mode (GradCache's no-grad first pass is recomputation, not more tokens), summed
    on the tensor's device without a sync. `peak_bytes`: torch.cuda.max_memory_allocated at the last step."""

    def __init__(self, device: str, warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> None:
        self.cuda = str(device).startswith("cuda")
        self.warmup = max(int(warmup), 1)
        self.clock = clock
        self.steps = 0
        self.peak_bytes: int | None = None
        self._parts: list[tuple[Any, int, int]] = []  # (tensor [non-pad tokens, sum of squared lengths], rows, cells)
        self._start: Any = None
        self._end: Any = None
        self._start_part = self._end_part = 0
        self.attached = 0

    def attach(self, module) -> Any:
        import torch

        def count(mod, args, kwargs):
            if not (mod.training and torch.is_grad_enabled()):
                return
            features = args[0] if args else kwargs.get("features")
            mask = features.get("attention_mask") if isinstance(features, Mapping) else None
            if mask is None or mask.dim() != 2:
                return
            lengths = mask.sum(-1)
            self._parts.append((torch.stack([lengths.sum(), (lengths * lengths).sum()]), int(mask.shape[0]),
                                int(mask.numel())))

        self.attached += 1
        return module.register_forward_pre_hook(count, with_kwargs=True)

    def _mark(self) -> Any:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self.clock()

    def step(self) -> None:
        self.steps += 1
        if self.cuda:
            import torch

            self.peak_bytes = int(torch.cuda.max_memory_allocated())
        if self.steps < self.warmup:
            return
        if self.steps == self.warmup:
            self._start, self._start_part = self._mark(), len(self._parts)
        else:
            self._end, self._end_part = self._mark(), len(self._parts)

    def summary(self) -> dict[str, Any]:
        """steps, timed_steps, seconds, tokens (non-pad), padded_tokens (mask cells), sequences, sum_sq_lengths,
        peak_gpu_bytes: of steps warmup+1 .. last (seconds None when no step was timed)."""
        out: dict[str, Any] = {"steps": self.steps, "warmup_steps": self.warmup, "timed_steps": 0, "seconds": None,
                               "tokens": 0, "padded_tokens": 0, "sequences": 0, "sum_sq_lengths": 0,
                               "peak_gpu_bytes": self.peak_bytes, "clock": "cuda events" if self.cuda else "perf_counter"}
        if self._end is None:
            return out
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            out["seconds"] = self._start.elapsed_time(self._end) / 1000.0
        else:
            out["seconds"] = self._end - self._start
        parts = self._parts[self._start_part:self._end_part]
        tokens = sum_sq = 0
        for values, _rows, _cells in parts:
            a, b = (int(v) for v in values.cpu().tolist())
            tokens, sum_sq = tokens + a, sum_sq + b
        out.update(timed_steps=self.steps - self.warmup, tokens=tokens, sum_sq_lengths=sum_sq,
                   sequences=sum(p[1] for p in parts), padded_tokens=sum(p[2] for p in parts))
        return out


def throughput(summary: Mapping[str, Any], config: Mapping[str, Any] | None, peak_flops: float | None, *,
               texts_per_example: int = 2) -> dict[str, Any]:
    """A timer's summary as rates: samples/s (= sequences / texts_per_example: a SciFact pair is 2 texts for a
    bi-encoder, 1 sequence for a reranker), tokens/s, padding (share of the mask's cells that are padding), model
    TFLOP/s and MFU against `peak_flops`."""
    seconds = summary.get("seconds")
    out: dict[str, Any] = {"timed_steps": summary.get("timed_steps", 0), "seconds": seconds,
                           "tokens": summary.get("tokens", 0), "samples_per_s": None, "tokens_per_s": None,
                           "padding": None, "model_tflops_per_s": None, "mfu": None, "peak_flops": peak_flops,
                           "flops_per_token": None}
    peak = summary.get("peak_gpu_bytes")
    out["peak_gpu_gib"] = peak / 2**30 if peak is not None else None
    if not seconds or seconds <= 0:
        return out
    out["samples_per_s"] = summary["sequences"] / texts_per_example / seconds
    out["tokens_per_s"] = summary["tokens"] / seconds
    if summary.get("padded_tokens"):
        out["padding"] = 1 - summary["tokens"] / summary["padded_tokens"]
    if config:
        flops = training_flops(config, summary["tokens"], summary["sum_sq_lengths"])
        out["flops_per_token"] = flops / summary["tokens"] if summary["tokens"] else None
        out["model_tflops_per_s"] = flops / seconds / 1e12
        out["mfu"] = mfu(flops, seconds, peak_flops)
    return out


# ---------------------------------------------------------------------------------------------------- rows file
def load_rows(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        return {"meta": {}, "rows": []}
    data = json.loads(path.read_text())
    return {"meta": data.get("meta") or {}, "rows": data.get("rows") or []}


def record_row(path: str | Path, result: RowResult, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Add (or replace: the same row number) `result` in the rows file, merging `meta`; written atomically."""
    path = Path(path)
    data = load_rows(path)
    data["meta"].update(meta or {})
    data["rows"] = sorted([r for r in data["rows"] if r.get("row") != result.row] + [result.to_dict()],
                          key=lambda r: r["row"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return data


def _num(value: Any, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


THROUGHPUT_COLUMNS = ("#", "trainer", "timed steps", "seconds", "samples/s", "tokens/s", "padding", "peak GPU GiB",
                      "model TFLOP/s", "MFU")


def throughput_lines(results: Sequence[RowResult]) -> list[str]:
    """The Markdown lines of the trainers' throughput (rows whose numbers hold "throughput": [side, ...])."""
    lines = []
    for r in results:
        for side in (r.numbers or {}).get("throughput") or []:
            mfu_value = side.get("mfu")
            cells = (str(r.row), side.get("trainer", "?"), str(side.get("timed_steps", 0)),
                     _num(side.get("seconds"), ".2f"), _num(side.get("samples_per_s"), ".1f"),
                     _num(side.get("tokens_per_s"), ",.0f"),
                     "n/a" if side.get("padding") is None else f"{side['padding'] * 100:.0f}%",
                     _num(side.get("peak_gpu_gib"), ".2f"), _num(side.get("model_tflops_per_s"), ".2f"),
                     "n/a" if mfu_value is None else f"{mfu_value * 100:.2f}%")
            lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return []
    return ["| " + " | ".join(THROUGHPUT_COLUMNS) + " |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|", *lines]


def peak_line(meta: Mapping[str, Any]) -> str:
    peak = meta.get("peak_flops")
    where = meta.get("gpu") or meta.get("device") or "?"
    assumed = (f"{peak / 1e12:,.0f} TFLOP/s ({meta.get('peak_source')})" if peak else
               f"none ({meta.get('peak_source') or 'unknown GPU'}): MFU n/a")
    return (f"MFU = model FLOPs / s / the bf16 peak assumed for {where}: {assumed}. Model FLOPs per token = 4P + 2T "
            "(P: non-embedding parameters, T: trainable ones; 6P for full fine-tuning) + attention 12·L·d·s "
            "(half when causal); tokens: non-pad. Timed: optimizer steps 2..N (after one warm-up step), training "
            "loop only, the same timer on every trainer. Peak GPU: torch.cuda.max_memory_allocated.")


def render_markdown(data: Mapping[str, Any]) -> str:
    """The rows file as Markdown: the rows table, then the trainers' throughput and the peak MFU assumed."""
    meta = data.get("meta") or {}
    results = [RowResult(**r) for r in data.get("rows") or []]
    total = meta.get("total_s")
    total = sum(r.seconds for r in results) if total is None else total
    text = format_markdown(results, title=meta.get("title") or "embedkit GPU check", total_s=total)
    extra = throughput_lines(results)
    if extra:
        text += "\n" + "\n".join(["## Training throughput", "", *extra, "", peak_line(meta)]) + "\n"
    return text


# ---------------------------------------------------------------------------------------------------- the runner
def run_rows(rows: Sequence[int], runner: Callable[[int, float], RowResult], *, budget_s: float,
             clock: Callable[[], float] = time.monotonic, min_s: dict[int, float] | None = None,
             say: Callable[[str], None] = lambda line: None) -> list[RowResult]:
    """Run `runner(row, seconds_left)` for each row in order, within one deadline.

    A row that cannot get its minimum time (ROW_MIN_S) is skipped with "time budget"; a runner that raises is a
    failed row with its one-line error, and the next row runs."""
    min_s = ROW_MIN_S if min_s is None else min_s
    deadline = clock() + budget_s
    results = []
    for row in rows:
        left = deadline - clock()
        if left < min_s.get(row, 0):
            result = RowResult(row, ROW_NAMES[row], "skipped",
                               f"skipped: time budget ({max(left, 0):.0f} s left, needs >= {min_s.get(row, 0):.0f} s)")
        else:
            started = clock()
            try:
                result = runner(row, left)
            except Exception as exc:  # the runner's own failure: reported in the row, never a traceback
                result = RowResult(row, ROW_NAMES[row], "fail", one_line(exc))
            if not result.seconds:
                result.seconds = clock() - started
        results.append(result)
        say(f"[gpu-check] row {row} ({result.name}): {result.status} in {result.seconds:.1f} s"
            + (f" -- {result.result}" if result.status != "pass" else ""))
    return results


@dataclass
class Settings:
    device: str
    quick: bool
    out: Path
    data: Path
    deadline: float  # time.time() by which the row must be done
    resume_atol: float = RESUME_ATOL

    @property
    def work(self) -> Path:
        return self.out / "work"

    def left(self) -> float:
        return self.deadline - time.time()

    def child_args(self) -> list[str]:
        return ["--device", self.device, "--out", str(self.out), "--data", str(self.data), "--deadline",
                f"{self.deadline:.3f}", "--resume-atol", str(self.resume_atol), *(["--quick"] if self.quick else [])]


def child_env() -> dict[str, str]:
    """The environment of every process this check starts: the repository importable (embedkit may not be
    installed), offline, unbuffered."""
    env = dict(os.environ)
    parts = [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_row_process(row: int, settings: Settings, log: Path, left: float) -> RowResult:
    """Run one row in a child process (its own session, so the deadline stops everything it started)."""
    result_file = settings.out / "rows" / f"row-{row}.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(row), *settings.child_args()]
    started = time.monotonic()
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"\n===== row {row}: {ROW_NAMES[row]} ({time.strftime('%H:%M:%S')}) =====\n")
        handle.flush()
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=child_env(),
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(left, 1.0))
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            return RowResult(row, ROW_NAMES[row], "fail",
                             f"stopped at the time budget after {time.monotonic() - started:.0f} s (see the log)",
                             time.monotonic() - started)
        finally:
            if proc.poll() is None:
                _stop_group(proc)
    seconds = time.monotonic() - started
    if result_file.is_file():
        data = json.loads(result_file.read_text())
        data["seconds"] = seconds
        return RowResult(**data)
    how = f"signal {-code}" if code < 0 else f"code {code}"
    return RowResult(row, ROW_NAMES[row], "fail", f"the row's process exited with {how} and no result "
                                                  f"(last log line: {_last_line(log)})", seconds)


def _stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "none"
    return " ".join(lines[-1].split())[:160] if lines else "none"


# ---------------------------------------------------------------------------------------------------- helpers
def run_step(cmd: Sequence[str], settings: Settings, what: str) -> str:
    """Run a command (output into this row's log) within the deadline; CheckError with its one-line error."""
    left = settings.left()
    if left < 5:
        raise CheckError(f"{what}: no time left in the budget")
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                              env=child_env(), timeout=left)
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        sys.stderr.write(partial)
        raise CheckError(f"{what}: stopped at the time budget") from None
    sys.stderr.write(proc.stdout)
    sys.stderr.flush()
    if proc.returncode != 0:
        raise CheckError(f"{what} failed ({_exit_text(proc.returncode)}): {error_line(proc.stdout)}")
    return proc.stdout


def _exit_text(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit code {code}"


def error_line(output: str) -> str:
    """The one-line error of a command's output: its last `error: ...` line, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    line = (errors or lines or ["no output"])[-1]
    return " ".join(line.split())[:240]


def builtin_texts(n: int = 200) -> list[str]:
    """`n` fixed texts: short and long (past 256 tokens), questions and statements, digits and punctuation."""
    base = [
        "what are the symptoms of diabetes?", "Insulin lowers the level of glucose in the blood.",
        "how do interest rates affect inflation", "The court ruled that the contract was void.",
        "A man is playing a guitar on the stage.", "COVID-19 vaccines reduced hospitalisation by 90% (n=12,000).",
        "How is asthma treated in children?", "The quick brown fox jumps over the lazy dog.",
        "Mitochondria produce most of the cell's supply of ATP.", "what causes high blood pressure in adults",
        "The central bank raised rates by 0.25 percentage points.", "Photosynthesis converts light into energy.",
        "a", "Gout is caused by uric acid crystals in the joints.", "Is coffee bad for your heart?",
        "The patient presented with fever, cough and fatigue for 3 days.", "Neural networks learn representations.",
        "Aspirin inhibits cyclooxygenase enzymes (COX-1 and COX-2).", "who wrote the origin of species",
        "Rain is expected across the north-west on Tuesday.", "BRCA1 mutations raise the risk of breast cancer.",
        "The stock fell 12% after the earnings report.", "Vitamin D deficiency is common in winter.",
        "How many moons does Jupiter have?", "The enzyme was purified by affinity chromatography.",
        "Children under 5 should not take this medicine.", "Antibiotics do not work against viruses.",
        "The bridge was closed for repairs until further notice.", "What is the half-life of caffeine?",
        "T cells recognise antigens presented by MHC molecules.", "She ordered a coffee and sat by the window.",
        "The protein folds into a beta-barrel structure.", "Smoking is the leading cause of lung cancer.",
        "Where is the nearest pharmacy?", "Statins lower LDL cholesterol by 30-50%.",
        "The experiment was repeated three times with similar results.", "Migraines often run in families.",
        "The algorithm runs in O(n log n) time.", "Exercise improves insulin sensitivity.",
        "Which vaccine is recommended for adults over 65?",
    ]
    texts: list[str] = []
    for i in range(n):
        s = base[i % len(base)]
        variant = (i // len(base)) % 5
        if variant == 0:
            texts.append(s)
        elif variant == 1:
            texts.append(f"question {i}: {s.lower().rstrip('.?')}?")
        elif variant == 2:
            texts.append(" ".join(base[(i + k) % len(base)] for k in range(3)))
        elif variant == 3:
            texts.append(f"{s} ({i} of {n}; ref. #{1000 + 7 * i}, p<0.0{i % 9 + 1})")
        else:
            texts.append(" ".join(base[(i + k) % len(base)] for k in range(40)))  # > 256 tokens: truncated
    return texts


def scifact_subset(source: Path, target: Path, *, n_queries: int = 20, n_docs: int = 300,
                   split: str = "test") -> Path:
    """A small BEIR folder (the first `n_queries` judged queries, their documents and other documents up to
    `n_docs`) for --quick, so evaluation takes seconds on a CPU."""
    qrels = [line.rstrip("\n").split("\t") for line in (source / "qrels" / f"{split}.tsv").read_text().splitlines()]
    header, rows = qrels[0], [r for r in qrels[1:] if len(r) >= 3]
    chosen: list[str] = []
    for qid, _doc, _score in rows:
        if qid not in chosen:
            chosen.append(qid)
        if len(chosen) == n_queries:
            break
    keep = [r for r in rows if r[0] in chosen]
    wanted = {r[1] for r in keep}
    corpus = []
    with open(source / "corpus.jsonl", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            if doc["_id"] in wanted or len(corpus) < n_docs - len(wanted):
                corpus.append(line if line.endswith("\n") else line + "\n")
    queries = [line for line in (source / "queries.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
               if json.loads(line)["_id"] in chosen]
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    (target / "corpus.jsonl").write_text("".join(corpus), encoding="utf-8")
    (target / "queries.jsonl").write_text("".join(q if q.endswith("\n") else q + "\n" for q in queries),
                                          encoding="utf-8")
    (target / "qrels" / f"{split}.tsv").write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in keep))
    return target


def _require_scifact(settings: Settings) -> Path:
    folder = settings.data / "scifact"
    if not (folder / "corpus.jsonl").is_file() or not (folder / "qrels" / "train.tsv").is_file():
        raise CheckError(f"SciFact not found in {folder} (a BEIR folder with qrels/train.tsv and test.tsv): "
                         "pass --data DIR")
    return folder


def _eval_task(settings: Settings) -> str:
    scifact = _require_scifact(settings)
    if settings.quick:
        target = settings.work / "scifact-quick"
        if not (target / "qrels" / "test.tsv").is_file():
            scifact_subset(scifact, target)
        return f"beir:{target}:test"
    return f"beir:{scifact}:test"


def _ndcg(model: str | Path, task: str, device: str) -> float:
    from embedkit.eval.runner import evaluate
    from embedkit.models.encoder import load_model

    encoder = load_model(model, max_length=SHARED["max_length"], device=device)
    # No embedding cache: its key (the model's fingerprint) does not include the device.
    report = evaluate(encoder, [task], batch_size=64, search="exact", use_cache=False)
    (name,) = report["results"]
    return float(report["results"][name]["metrics"]["ndcg_at_10"])


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def device_facts(device: str) -> dict[str, Any]:
    """The device a row's process trains on: how many GPUs it sees, the GPU's name and its bf16 peak (for MFU)."""
    facts: dict[str, Any] = {"device": device, "visible_gpus": 0, "gpu": None,
                             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if _is_cuda(device):
        import torch

        facts["visible_gpus"] = torch.cuda.device_count()
        facts["gpu"] = torch.cuda.get_device_name(torch.device(device))
    facts["peak_flops"], facts["peak_source"] = gpu_peak_flops(facts["gpu"])
    return facts


@contextmanager
def watch_model(callback: Callable[[Any], None], task: str = "embed"):
    """`embedkit train` builds its model inside train(): `callback(model)` sees the first one it builds (to attach the
    timer's token count and read the model's shape): the encoder (contrastive.build_encoder), or for `task: rerank`
    the reranker (rerank.build_reranker). Only this process's module attribute is swapped."""
    if task == "rerank":
        from embedkit.train import rerank as module

        name = "build_reranker"
    else:
        from embedkit.train import contrastive as module

        name = "build_encoder"
    original = getattr(module, name)
    seen: list[Any] = []

    def build(recipe, device="cpu"):
        model = original(recipe, device)
        if not seen:
            seen.append(model)
            callback(model)
        return model

    setattr(module, name, build)
    try:
        yield seen
    finally:
        setattr(module, name, original)


def _flops_config(backbone, causal: bool) -> dict[str, Any]:
    try:
        return model_flops_config(backbone, causal=causal)
    except Exception as exc:  # a number the row reports, never a reason for it to fail
        print(f"model FLOPs unavailable: {one_line(exc)}", file=sys.stderr, flush=True)
        return {}


def _causal_attention(model) -> bool:
    """Whether the model's attention is masked causally: a yes/no reranker (a causal LM, read as it was trained), or
    a decoder encoder (is_causal) not switched to bidirectional."""
    from embedkit.models.reranker import YesNoReranker

    if isinstance(model, YesNoReranker):
        return True
    return bool(getattr(model, "is_causal", False)) and getattr(model, "attention", "causal") != "bidirectional"


def side_numbers(trainer: str, timer: StepTimer, config: Mapping[str, Any], facts: Mapping[str, Any], *,
                 texts_per_example: int = 2) -> dict[str, Any]:
    """One trainer's throughput entry (the rows' numbers["throughput"]) from its timer."""
    summary = timer.summary()
    rates = throughput(summary, config or None, facts.get("peak_flops"), texts_per_example=texts_per_example)
    return {"trainer": trainer, **rates, "timer": summary, "flops_config": dict(config),
            "visible_gpus": facts.get("visible_gpus"), "gpu": facts.get("gpu")}


def _train_recording(recipe, cuda: bool):
    """`embedkit train`'s code path on `recipe` (its task's trainer): (result, the loss of every step, {"gpu": peak
    GiB} on CUDA, taken at the last step, i.e. from the reset on: the model's loading and the training; the StepTimer;
    the model's FLOPs config)."""
    import torch

    from embedkit.train import train

    losses: list[float] = []
    peak: dict[str, float] = {}
    timer = StepTimer("cuda" if cuda else "cpu")
    config: dict[str, Any] = {}
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def on_step(step: int, record: dict) -> None:
        losses.append(float(record.get("loss", float("nan"))))
        timer.step()
        if cuda:
            peak["gpu"] = timer.peak_bytes / 2**30

    def seen(model) -> None:
        timer.attach(model)
        config.update(_flops_config(model.backbone, _causal_attention(model)))

    with watch_model(seen, recipe.task):
        result = train(recipe, on_step=on_step)
    return result, losses, peak, timer, config


def _rate_text(side: Mapping[str, Any]) -> str:
    """'1.23e+04 tokens/s, MFU 4.56%' (n/a where unknown)."""
    mfu_value = side.get("mfu")
    return (f"{_num(side.get('tokens_per_s'), '.3g')} tokens/s, MFU "
            + ("n/a" if mfu_value is None else f"{mfu_value * 100:.2f}%"))


def _training_numbers(result, steps: int, side: Mapping[str, Any], losses: Sequence[float],
                      peak: Mapping[str, float]) -> dict[str, Any]:
    """What rows 3, 7 and 8 report of a training run (`_train_recording`'s): steps, samples, rates, losses, peaks."""
    from embedkit.train.engine import peak_rss_gb

    return {"steps": result.steps, "max_steps": steps, "samples": result.samples,
            "samples_per_s": side["samples_per_s"], "engine_samples_per_s": result.samples_per_second,
            "throughput": [side], "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "peak_gpu_gib": peak.get("gpu"), "peak_rss_gb": peak_rss_gb()}


def _training_text(numbers: Mapping[str, Any], device: str, estimate: Mapping[str, Any] | None = None, *,
                   unit: str = "samples") -> str:
    """'10/10 steps, 12.3 samples/s, 4.56e+04 tokens/s, MFU 7.89%, peak GPU 5.12 GiB (estimate 5.91 GiB), loss
    2.0794 -> 2.0712': the peak RSS where there is no GPU; `estimate` (embedkit.train.memory's) beside the peak."""
    (side,) = numbers["throughput"]
    if _is_cuda(device):
        memory, notes = f"peak GPU {_num(numbers['peak_gpu_gib'], '.2f')} GiB", []
    else:
        memory, notes = f"peak RSS {numbers['peak_rss_gb']:.2f} GB", [f"no GPU memory on {device}"]
    if estimate:
        notes.append(f"{'' if _is_cuda(device) else 'GPU '}estimate {estimate['peak_bytes'] / 2**30:.2f} GiB")
    if notes:
        memory += f" ({'; '.join(notes)})"
    return (f"{numbers['steps']}/{numbers['max_steps']} steps, {_num(side['samples_per_s'], '.3g')} {unit}/s, "
            f"{_rate_text(side)}, {memory}, loss {numbers['loss_first']:.4f} -> {numbers['loss_last']:.4f}")


def _row2_model(settings: Settings) -> tuple[str, str]:
    """(model, note) for rows 5 and 6: row 2's embedkit model when it is in --out, else base MiniLM."""
    folder = settings.work / "row2-embedkit"
    if (folder / "modules.json").is_file():
        return str(folder), "row 2's model"
    return "minilm", "base MiniLM (row 2's model not in --out)"


def _clean(path: Path) -> Path:
    import shutil

    from embedkit.train.engine import work_dir

    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(work_dir(path), ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------------- row 1
def row_encode_parity(settings: Settings) -> RowResult:
    import numpy as np
    import torch

    from embedkit.models.encoder import load_model

    texts = builtin_texts(24 if settings.quick else 200)
    cpu = load_model("minilm", device="cpu").encode(texts, batch_size=32)
    other = load_model("minilm", device=settings.device)
    assert other.dtype == torch.float32
    dev = other.encode(texts, batch_size=32)
    cos = (cpu * dev).sum(1) / np.maximum(np.linalg.norm(cpu, axis=1) * np.linalg.norm(dev, axis=1), 1e-12)
    numbers = {"texts": len(texts), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
               "max_abs_diff": float(np.abs(cpu - dev).max()), "device": str(other.device),
               "float32_matmul_precision": torch.get_float32_matmul_precision()}
    ok = bool(np.isfinite(dev).all()) and numbers["min_cosine"] >= PARITY_MIN_COSINE
    text = (f"{len(texts)} texts on {other.device}: cosine min {cos.min():.7f} mean {cos.mean():.7f}, max |diff| "
            f"{numbers['max_abs_diff']:.1e} (pass: min >= {PARITY_MIN_COSINE})")
    return RowResult(1, ROW_NAMES[1], "pass" if ok else "fail", text, numbers=numbers)


# ---------------------------------------------------------------------------------------------------- row 2
def _row2_recipe(settings: Settings, output: Path):
    from embedkit.train.config import load_recipe

    s = SHARED
    overrides = [f"data.train=beir:{_require_scifact(settings)}:train", "data.dev=null",
                 f"training.output_dir={output}", "training.progress=false", f"training.batch_size={s['batch_size']}",
                 f"training.lr={s['lr']}", f"training.epochs={s['epochs']}", f"model.max_length={s['max_length']}",
                 f"training.seed={s['seed']}", f"training.warmup_ratio={s['warmup_ratio']}",
                 f"training.weight_decay={s['weight_decay']}", f"training.max_grad_norm={s['max_grad_norm']}",
                 "training.mixed_precision=bf16", "model.attention_dropout=0.0", f"model.device={settings.device}"]
    if settings.quick:
        overrides.append("data.max_examples=64")
    return load_recipe(REPO / "recipes" / "minilm-scifact.yaml", overrides)


def child_row2_embedkit(settings: Settings) -> dict[str, Any]:
    """embedkit's side of row 2: `embedkit train`'s code path (contrastive.train) on the shared settings."""
    import torch

    from embedkit.train.contrastive import train

    cuda = _is_cuda(settings.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # both sides: from the start of their process (weights included)
    facts = device_facts(settings.device)
    output = _clean(settings.work / "row2-embedkit")
    recipe = _row2_recipe(settings, output)
    timer = StepTimer(settings.device)
    config: dict[str, Any] = {}
    dropout: dict[str, Any] = {}

    def seen(encoder) -> None:
        timer.attach(encoder)
        config.update(_flops_config(encoder.backbone, _causal_attention(encoder)))
        dropout.update(_attention_dropouts(encoder.backbone))

    with watch_model(seen):
        result = train(recipe, on_step=lambda step, record: timer.step())
    side = side_numbers("embedkit", timer, config, facts)
    out = {"samples": result.samples, "steps": result.steps, "final_loss": result.final_loss, "model": str(output),
           "side": side, "facts": facts, "attention_dropout": dropout,
           "processes": 1, "wrapped": "none (one process, one device)"}
    out["ndcg_at_10"] = _ndcg(output, _eval_task(settings), settings.device)
    return out


def _attention_dropouts(backbone) -> dict[str, Any]:
    """{"config": attention_probs_dropout_prob, "modules": the set of p of the self-attention dropouts}."""
    import torch

    ps = sorted({m.p for n, m in backbone.named_modules() if isinstance(m, torch.nn.Dropout) and "attention.self" in n})
    return {"config": getattr(backbone.config, "attention_probs_dropout_prob", None), "modules": ps}


def _st_batch_samplers():
    try:
        from sentence_transformers.training_args import BatchSamplers
    except ImportError:  # sentence-transformers >= 6 keeps it in base.sampler (the old path is a shim)
        from sentence_transformers.base.sampler import BatchSamplers
    return BatchSamplers


def child_row2_st(settings: Settings) -> dict[str, Any]:
    """sentence-transformers' side of row 2: SentenceTransformerTrainer + MNRL on the very same pairs, device and
    settings -- the recipe's attention dropout, bf16, NO_DUPLICATES (ST's way of keeping a text's copies out of each
    other's negatives, where embedkit masks them) -- and the same StepTimer, through a TrainerCallback."""
    from types import SimpleNamespace

    import torch
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)
    from transformers import TrainerCallback

    from embedkit.models.registry import minilm_path
    from embedkit.train.contrastive import load_examples, set_dropout

    cuda = _is_cuda(settings.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    facts = device_facts(settings.device)
    output = _clean(settings.work / "row2-st")
    recipe = _row2_recipe(settings, output)
    examples, _ = load_examples(recipe)  # the very same pairs as embedkit's
    if any(e.negatives for e in examples):
        raise CheckError("row 2 compares pairs; the data has hard negatives")
    m = recipe.model
    # The recipe's attention dropout in the config (what the model is built with) and, as embedkit sets it, in the
    # modules; hidden dropout: the recipe's (None: the model's 0.1, as on embedkit's side).
    model = SentenceTransformer(str(minilm_path()), device=settings.device,
                                config_kwargs={"attention_probs_dropout_prob": m.attention_dropout})
    model.max_seq_length = SHARED["max_length"]
    changed = set_dropout(SimpleNamespace(backbone=model[0].auto_model), attention=m.attention_dropout,
                          hidden=m.hidden_dropout)
    dropout = _attention_dropouts(model[0].auto_model)
    if not changed["attention"] or dropout["modules"] != [m.attention_dropout] \
            or dropout["config"] != m.attention_dropout:
        raise CheckError(f"could not set attention dropout {m.attention_dropout} in sentence-transformers' model: "
                         f"{dropout}")
    timer = StepTimer(settings.device)
    timer.attach(model[0])
    config = _flops_config(model[0].auto_model, causal=False)

    class Timed(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            timer.step()

    data = Dataset.from_dict({"anchor": [e.query for e in examples], "positive": [e.positive for e in examples]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output) + ".st-work", num_train_epochs=SHARED["epochs"],
        per_device_train_batch_size=SHARED["batch_size"], learning_rate=SHARED["lr"], seed=SHARED["seed"],
        data_seed=SHARED["seed"], batch_sampler=_st_batch_samplers().NO_DUPLICATES,
        warmup_ratio=SHARED["warmup_ratio"], weight_decay=SHARED["weight_decay"],
        max_grad_norm=SHARED["max_grad_norm"], bf16=True, use_cpu=not cuda, report_to=[], save_strategy="no",
        logging_steps=10, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                         loss=losses.MultipleNegativesRankingLoss(model), callbacks=[Timed()])
    result = trainer.train()
    side = side_numbers("sentence-transformers", timer, config, facts)
    wrapped = type(getattr(trainer, "model_wrapped", model)).__name__
    model.save(str(output))
    samples = min(len(examples), result.global_step * SHARED["batch_size"] * SHARED["epochs"])
    out = {"samples": samples, "steps": result.global_step, "final_loss": result.training_loss, "side": side,
           "facts": facts, "attention_dropout": dropout, "attention_dropout_layers": changed["attention"],
           "n_gpu": int(trainer.args.n_gpu), "wrapped": wrapped,
           "batch_sampler": str(getattr(trainer.args.batch_sampler, "value", trainer.args.batch_sampler)),
           "bf16": bool(trainer.args.bf16)}
    out["ndcg_at_10"] = _ndcg(output, _eval_task(settings), settings.device)
    return out


def row_train_vs_st(settings: Settings) -> RowResult:
    numbers: dict[str, Any] = {"settings": {**SHARED, "bf16": True, "attention_dropout": 0.0,
                                            "st_batch_sampler": "no_duplicates", "device": settings.device}}
    for kind in ("st", "embedkit"):  # each in its own process, as bench/bench_train.py does
        result_file = settings.out / "rows" / f"row-2-{kind}.json"
        result_file.unlink(missing_ok=True)
        run_step([sys.executable, str(Path(__file__).resolve()), "--child", f"2-{kind}", *settings.child_args()],
                 settings, f"{'sentence-transformers' if kind == 'st' else 'embedkit'} training")
        numbers[kind] = json.loads(result_file.read_text())
    st, ek = numbers["st"], numbers["embedkit"]
    numbers["throughput"] = [ek["side"], st["side"]]
    numbers["ndcg_delta"] = ek["ndcg_at_10"] - st["ndcg_at_10"]
    a, b = ek["side"].get("tokens_per_s"), st["side"].get("tokens_per_s")
    numbers["speed_ratio"] = a / b if a and b else None
    ok = numbers["ndcg_delta"] >= -NDCG_TOLERANCE
    memory = (f"peak GPU {_num(ek['side']['peak_gpu_gib'], '.2f')} / {_num(st['side']['peak_gpu_gib'], '.2f')} GiB"
              if _is_cuda(settings.device) else "no GPU memory on the CPU")
    text = (f"nDCG@10 embedkit {ek['ndcg_at_10']:.4f} / ST {st['ndcg_at_10']:.4f} ({numbers['ndcg_delta']:+.4f}); "
            f"embedkit {_rate_text(ek['side'])} / ST {_rate_text(st['side'])} "
            f"(x{_num(numbers['speed_ratio'], '.2f')} tokens/s), {memory}; {ek['samples']} pairs, "
            f"{ek['steps']} / {st['steps']} steps, timed from step 2 (pass: nDCG@10 >= ST - {NDCG_TOLERANCE})")
    return RowResult(2, ROW_NAMES[2], "pass" if ok else "fail", text, numbers=numbers)


# ---------------------------------------------------------------------------------------------------- rows 3, 4
def _smollm2_overrides(settings: Settings, output: Path) -> list[str]:
    overrides = [f"data.train=beir:{_require_scifact(settings)}:train", "data.dev=null",
                 f"training.output_dir={output}", "training.progress=false", "training.report_to=[]",
                 f"model.device={settings.device}", "mntp.steps=0"]  # MNTP: row 7
    if settings.quick:
        overrides += ["training.batch_size=4", "training.grad_cache=2", "model.max_length=64"]
    return overrides


def row_smollm2_qlora(settings: Settings) -> RowResult:
    import math

    from embedkit.models.registry import smollm2_path
    from embedkit.train.config import load_recipe

    t0 = time.perf_counter()
    smollm2_path()  # converted from its GGUF package on first use: timed apart from training
    convert_s = time.perf_counter() - t0
    steps = 3 if settings.quick else 20
    output = _clean(settings.work / "row3-smollm2-qlora")
    recipe = load_recipe(REPO / "recipes" / "smollm2-qlora.yaml",
                         [*_smollm2_overrides(settings, output), f"training.max_steps={steps}",
                          "training.mixed_precision=bf16"])
    cuda = _is_cuda(settings.device)
    result, losses, peak, timer, flops_config = _train_recording(recipe, cuda)
    side = side_numbers("embedkit QLoRA", timer, flops_config, device_facts(settings.device))
    numbers = {**_training_numbers(result, steps, side, losses, peak), "convert_s": convert_s,
               "batch_size": recipe.training.batch_size, "grad_cache": recipe.training.grad_cache,
               "max_length": recipe.model.max_length}
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    ok = result.steps == steps and finite
    text = (f"{_training_text(numbers, settings.device)} (batch {recipe.training.batch_size}, "
            f"max length {recipe.model.max_length})") if losses else f"{result.steps}/{steps} steps, no loss logged"
    return RowResult(3, ROW_NAMES[3], "pass" if ok else "fail", text, numbers=numbers)


def _row4_plan(settings: Settings) -> dict[str, int]:
    return {"steps": 3, "kill_at": 3, "every": 2} if settings.quick else {"steps": 6, "kill_at": 5, "every": 2}


def _row4_argv(settings: Settings, output: Path) -> list[str]:
    plan = _row4_plan(settings)
    sets = [*_smollm2_overrides(settings, output), f"training.max_steps={plan['steps']}",
            f"training.checkpoint_every={plan['every']}", "deepspeed.stage=zero3", "model.dtype=bf16",
            "training.log_every=1"]
    return [str(REPO / "recipes" / "smollm2-qlora.yaml"), *[a for s in sets for a in ("--set", s)]]


def child_row4_killed(settings: Settings) -> None:
    """The driver that SIGKILLs itself after step `kill_at` (tests/test_train_distributed.py's pattern)."""
    from embedkit.train.config import load_recipe
    from embedkit.train.contrastive import train

    argv = _row4_argv(settings, settings.work / "row4-killed")
    kill_at = _row4_plan(settings)["kill_at"]

    def kill(step: int, record: dict) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    train(load_recipe(argv[0], argv[2::2]), on_step=kill)
    raise CheckError(f"the run was not killed at step {kill_at}")


def _adapter_weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted((folder / "adapter").glob("*.safetensors"))
    if not files:
        raise CheckError(f"no adapter weights in {folder / 'adapter'}")
    return load_file(str(files[0]))


def row_zero3_resume(settings: Settings) -> RowResult:
    from embedkit.models.registry import smollm2_path
    from embedkit.train.engine import work_dir

    smollm2_path()
    plan = _row4_plan(settings)
    cli = [sys.executable, "-m", "embedkit.cli", "train"]
    full, killed = _clean(settings.work / "row4-full"), _clean(settings.work / "row4-killed")
    t0 = time.perf_counter()
    run_step([*cli, *_row4_argv(settings, full)], settings, "the uninterrupted ZeRO-3 run")
    full_s = time.perf_counter() - t0
    left = settings.left()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "4-kill", *settings.child_args()],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=child_env(),
                          timeout=max(left, 1))
    sys.stderr.write(proc.stdout)
    if proc.returncode != -signal.SIGKILL:
        raise CheckError(f"the killed run ended with {_exit_text(proc.returncode)}, not SIGKILL: "
                         f"{error_line(proc.stdout)}")
    if killed.exists():
        raise CheckError(f"the killed run left an output folder {killed}")
    checkpoints = sorted(p.name for p in (work_dir(killed) / "checkpoints").glob("step-*"))
    run_step([*cli, *_row4_argv(settings, killed), "--resume"], settings, "the resumed ZeRO-3 run")
    a, b = _adapter_weights(full), _adapter_weights(killed)
    if a.keys() != b.keys():
        raise CheckError("the resumed and uninterrupted adapters have different tensors")
    max_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    gap = sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in a) ** 0.5
    norm = sum(float((a[k].float() ** 2).sum()) for k in a) ** 0.5
    log = [json.loads(line) for line in (killed / "train_log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in log if r.get("event") == "train"]
    stats = json.loads((full / "embedkit_manifest.json").read_text())["training"]["stats"]
    numbers = {"steps": plan["steps"], "killed_after_step": plan["kill_at"], "checkpoints_at_kill": checkpoints,
               "resumed_steps": train_steps, "max_abs_diff": max_diff, "relative_gap": gap / max(norm, 1e-12),
               "atol": settings.resume_atol, "backend": stats.get("backend"), "full_run_s": full_s,
               "adapter_tensors": len(a), "dtype": str(next(iter(a.values())).dtype).replace("torch.", "")}
    ok = max_diff <= settings.resume_atol and stats.get("backend") == "deepspeed-zero3"
    text = (f"{stats.get('backend')}, {plan['steps']} steps, SIGKILL after step {plan['kill_at']} "
            f"(checkpoints {', '.join(checkpoints) or 'none'}), resumed: LoRA max |diff| {max_diff:.2e}, "
            f"relative gap {numbers['relative_gap']:.1e} (pass: <= {settings.resume_atol:.0e})")
    return RowResult(4, ROW_NAMES[4], "pass" if ok else "fail", text, numbers=numbers)


# ---------------------------------------------------------------------------------------------------- row 5
def row_serve(settings: Settings) -> RowResult:
    """The served vectors against in-process `encode` on the same device. The folder's probe vectors (written by the
    trainer) are checked here too and reported apart; the server runs with --allow-mismatch so that a probe mismatch
    (a training-side problem) does not hide the serving comparison."""
    import numpy as np

    from embedkit.models.probes import check_probes, has_probes
    from embedkit.launch import free_port
    from embedkit.models.encoder import load_model
    from embedkit.serve.engines import remote_vectors_fn, stop_process, wait_healthy

    model, note = _row2_model(settings)
    texts = builtin_texts(16 if settings.quick else 64)
    encoder = load_model(model, device=settings.device)
    probes = None
    if Path(model).is_dir() and has_probes(model):
        probes = check_probes(lambda t, kind: encoder.encode(list(t), kind=kind), model)
        print(f"{model}: {probes.summary()}", file=sys.stderr, flush=True)
    port = free_port()
    cmd = [sys.executable, "-m", "embedkit.cli", "serve", "--model", f"checked={model}", "--backend", "torch",
           "--device", settings.device, "--port", str(port), "--log-level", "warning", "--no-chat",
           "--allow-mismatch"]
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    server_log = settings.work / "row5-serve.log"
    server_log.parent.mkdir(parents=True, exist_ok=True)
    with open(server_log, "w", encoding="utf-8") as handle:
        server = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=child_env(),
                                  start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(base, timeout=min(180.0, max(settings.left() - 20, 5)), process=server, interval=0.5)
        except EmbedkitError as exc:
            output = server_log.read_text(errors="replace")
            raise CheckError(f"embedkit serve did not start: {error_line(output)}" if server.poll() is not None
                             else exc.one_line()) from None
        embed = remote_vectors_fn(base, "checked")
        t0 = time.perf_counter()
        served = np.concatenate([embed(texts[i:i + 16], "document") for i in range(0, len(texts), 16)])
        request_s = time.perf_counter() - t0
    finally:
        stop_process(server)
        sys.stderr.write(server_log.read_text(errors="replace"))
    local = encoder.encode(texts, batch_size=32)
    diff = float(np.abs(served - local).max())
    cos = (served * local).sum(1) / np.maximum(np.linalg.norm(served, axis=1) * np.linalg.norm(local, axis=1), 1e-12)
    numbers = {"model": model, "texts": len(texts), "max_abs_diff": diff, "min_cosine": float(cos.min()),
               "request_s": request_s, "device": settings.device,
               "probes": probes.to_dict() if probes is not None else None}
    ok = diff <= SERVE_MAX_ABS_DIFF and (probes is None or probes.ok)
    if probes is None:
        probe_text = "no probe vectors"
    elif probes.ok:
        probe_text = f"probes match ({probes.max_abs_diff:.1e})"
    else:
        probe_text = (f"PROBES MISMATCH: the folder's probe_vectors.json differs from its model by "
                      f"{probes.max_abs_diff:.1e} > {probes.atol:.0e} (serve refuses it without --allow-mismatch)")
    text = (f"{note} on {settings.device}: {len(texts)} texts over /v1/embeddings vs encode: max |diff| {diff:.1e}, "
            f"min cosine {cos.min():.7f} (pass: <= {SERVE_MAX_ABS_DIFF:.0e}); {probe_text}")
    return RowResult(5, ROW_NAMES[5], "pass" if ok else "fail", text, numbers=numbers)


# ---------------------------------------------------------------------------------------------------- row 6
def vllm_skip_reason(device: str, find_spec: Callable[[str], Any] | None = None) -> str | None:
    """Why row 6 cannot run here (None: try it). Cheap: no import of vllm."""
    import importlib.util

    if device == "cpu":
        return "skipped: vLLM needs CUDA (--device cpu)"
    if (find_spec or importlib.util.find_spec)("vllm") is None:
        return "skipped: vllm not importable"
    return None


def row_vllm(settings: Settings) -> RowResult:
    import shutil

    reason = vllm_skip_reason(settings.device)
    if reason:
        raise Skip(reason)
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # a broken install counts as not importable
        raise Skip(f"skipped: vllm not importable ({one_line(exc, 120)})") from None
    from embedkit.export.hf import export_hf
    from embedkit.launch import free_port
    from embedkit.serve.engines import REMOTE_PROBE_ATOL, run_vllm, stop_process

    binary = shutil.which("vllm") or str(Path(sys.executable).parent / "vllm")
    if not Path(binary).exists():
        raise CheckError("vllm imports but there is no `vllm` executable on PATH or beside python")
    model, note = _row2_model(settings)
    folder = settings.work / "row6-hf"
    shutil.rmtree(folder, ignore_errors=True)
    # The export checks the source's probes first; row 5 reports them, this row checks vLLM against the export's.
    export_hf(model, folder, allow_probe_mismatch=True)  # its lines: through the row's logging (configure_logging)
    started = time.perf_counter()
    outcome = run_vllm(folder, port=free_port(), vllm_bin=binary, extra=["--enforce-eager"], foreground=False,
                       startup_timeout=max(settings.left() - 30, 10), atol=REMOTE_PROBE_ATOL, allow_mismatch=True)
    startup_s = time.perf_counter() - started
    stop_process(outcome["process"])
    check = outcome["check"]
    if check is None:
        raise CheckError(f"no probe vectors in {folder}")
    numbers = {"model": model, **check.to_dict(), "startup_s": startup_s}
    text = (f"{note}, HF export via vLLM {getattr(sys.modules.get('vllm'), '__version__', '?')}: {check.n} probes, "
            f"max |diff| {check.max_abs_diff:.1e}, min cosine {check.min_cosine:.6f} (pass: <= {check.atol:.0e}); "
            f"start-up {startup_s:.0f} s")
    return RowResult(6, ROW_NAMES[6], "pass" if check.ok else "fail", text, numbers=numbers)


# ---------------------------------------------------------------------------------------------------- rows 7, 8
# Qwen3-0.6B's shape (Qwen/Qwen3-0.6B's config.json): the GPU box has no hub, so rows 7 and 8 train a randomly
# initialised model of this shape. The vocabulary stays Qwen3's 151,936 rows (tied input/output embeddings, a quarter
# of the parameters and the MNTP logits' width) although the tokenizer that can be supplied offline (SmolLM2's, 49,152
# ids) uses only its first ids: memory and speed are those of the real model, the numbers it learns are not.
QWEN3_SHAPES: dict[str, dict[str, int]] = {
    "full": {"num_hidden_layers": 28, "hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936},
    # --quick (the CPU smoke test): 2 layers, 256-d (multiples of 64 for bitsandbytes' CPU 4-bit path); vocabulary =
    # the tokenizer's.
    "quick": {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 0},
}
QWEN3_RECIPE = REPO / "recipes" / "qwen3-0.6b-encoder.yaml"
ROW7_STEPS = {"full": (10, 4), "quick": (3, 2)}  # (contrastive steps, MNTP steps)
QWEN3_RERANK_RECIPE = REPO / "recipes" / "qwen3-0.6b-rerank.yaml"
# (steps, SciFact training queries, most documents in the mining pool: scifact_subset's n_docs): a slice of SciFact
# train, so that the first stage (MiniLM) mines the negatives in seconds, not over the 5,183-document corpus; the full
# slice (225 pairs, 1,922 documents) holds the 10 steps' 160 rows.
ROW8_PLAN = {"full": (10, 200, 2000), "quick": (3, 16, 200)}


def encoder_tokenizer():
    """The tokenizer rows 7 and 8's random Qwen3 is given: SmolLM2's (byte-level BPE, 49,152 ids, "yes" and "no"
    single tokens for row 8's reranker), available offline from the converted SmolLM2 folder (rows 3-4 use it too)."""
    from transformers import AutoTokenizer

    from embedkit.models.registry import smollm2_path

    return AutoTokenizer.from_pretrained(str(smollm2_path()))


def build_random_qwen3(folder: Path, tokenizer, shape: dict[str, int], *, device: str = "cpu", seed: int = 0
                       ) -> tuple[Path, dict[str, Any]]:
    """A randomly initialised Qwen3ForCausalLM of `shape` saved (bf16, as Qwen3's checkpoints) with `tokenizer` as a
    model folder; reused when a folder of the same shape and tokenizer is already there. Returns (folder, config)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    vocab = max(int(shape.get("vocab_size") or 0), len(tokenizer))
    vocab = -(-vocab // 64) * 64  # whole rows of 64 (Qwen3's own vocabulary is padded the same way)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    settings = {**shape, "vocab_size": vocab, "tie_word_embeddings": True, "max_position_embeddings": 40960,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "rms_norm_eps": 1e-6,
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": pad}
    record = {"shape": settings, "tokenizer_size": len(tokenizer), "seed": seed}
    marker = folder / "gpu_check_random_qwen3.json"
    if marker.is_file() and json.loads(marker.read_text()) == record and (folder / "config.json").is_file():
        return folder, settings
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    config = Qwen3Config(**settings)
    torch.manual_seed(seed)
    with torch.device(device):  # a GPU initialises the 0.6B weights in a fraction of the CPU's time
        model = Qwen3ForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the row measures training's peak, not this
    marker.write_text(json.dumps(record, indent=2))
    return folder, settings


def random_qwen3(settings: Settings) -> tuple[Path, dict[str, Any], float]:
    """Rows 7 and 8's random Qwen3 (QWEN3_SHAPES; built by the first of them, reused by the other): (folder, config,
    seconds it took)."""
    size = "quick" if settings.quick else "full"
    t0 = time.perf_counter()
    folder, config = build_random_qwen3(settings.work / f"qwen3-random-{size}", encoder_tokenizer(),
                                        QWEN3_SHAPES[size], device=settings.device)
    return folder, config, time.perf_counter() - t0


def _qwen3_overrides(settings: Settings, model: Path, output: Path, steps: int, train: str) -> list[str]:
    """What rows 7 and 8 override in their recipe: the random Qwen3, the training data (`train`), the output, a few
    steps, no dev evaluation, checkpoints or reporting."""
    return [f"model.name={model}", f"data.train={train}", "data.dev=null", "training.eval_every=null",
            f"training.output_dir={output}", "training.progress=false", "training.report_to=[]",
            f"model.device={settings.device}", f"training.max_steps={steps}",
            "training.epochs=5",  # several epochs' worth of a small data set, so that max_steps is reached
            "training.checkpoint_every=null", "training.log_every=1"]


def _row7_overrides(settings: Settings, model: Path, output: Path) -> list[str]:
    steps, mntp_steps = ROW7_STEPS["quick" if settings.quick else "full"]
    overrides = [*_qwen3_overrides(settings, model, output, steps, f"beir:{_require_scifact(settings)}:train"),
                 f"mntp.steps={mntp_steps}"]
    if settings.quick:
        overrides += ["training.batch_size=4", "training.grad_cache=2", "model.max_length=64", "mntp.batch_size=4",
                      "mntp.max_length=64"]
    return overrides


def _memory_estimate(recipe) -> dict[str, Any] | None:
    """What `embedkit train RECIPE --estimate-memory` estimates for the row's recipe, overrides included (the shape:
    the config.json of its model.name, the random Qwen3's folder); None when it cannot be computed."""
    try:
        from embedkit.train.memory import estimate_recipe_memory

        return estimate_recipe_memory(recipe)
    except Exception as exc:  # an estimate is context, never a reason to fail the row
        print(f"memory estimate unavailable: {one_line(exc)}", file=sys.stderr, flush=True)
        return None


def row_qwen3_encoder(settings: Settings) -> RowResult:
    """recipes/qwen3-0.6b-encoder.yaml (bidirectional attention, mean pooling, MNTP warm-up, QLoRA, bf16, gradient
    checkpointing) on a random Qwen3 of the real 0.6B shape, through row 3's code path (load_recipe + train)."""
    import math

    from embedkit.train.config import load_recipe
    from embedkit.train.engine import MNTP_LOG_FILE

    steps, mntp_steps = ROW7_STEPS["quick" if settings.quick else "full"]
    model, config, build_s = random_qwen3(settings)
    output = _clean(settings.work / "row7-qwen3-encoder")
    recipe = load_recipe(QWEN3_RECIPE, _row7_overrides(settings, model, output))
    cuda = _is_cuda(settings.device)
    result, losses, peak, timer, flops_config = _train_recording(recipe, cuda)  # peak GPU: loading + MNTP + steps
    side = side_numbers("embedkit QLoRA (random Qwen3)", timer, flops_config, device_facts(settings.device))
    mntp_losses = [float(r["loss"]) for r in map(json.loads, (output / MNTP_LOG_FILE).read_text().splitlines())
                   if r.get("event") == "train"] if (output / MNTP_LOG_FILE).is_file() else []
    manifest = json.loads((output / "embedkit_manifest.json").read_text())
    memory = manifest["training"]["stats"]["memory"]
    estimate = _memory_estimate(recipe)
    numbers = {**_training_numbers(result, steps, side, losses, peak), "mntp_steps": len(mntp_losses),
               "mntp_max_steps": mntp_steps, "mntp_loss_first": mntp_losses[0] if mntp_losses else None,
               "mntp_loss_last": mntp_losses[-1] if mntp_losses else None, "build_s": build_s, "shape": config,
               "batch_size": recipe.training.batch_size, "grad_cache": recipe.training.grad_cache,
               "max_length": recipe.model.max_length, "attention": recipe.model.attention,
               "pooling": recipe.model.pooling, "weights_bytes": memory["parameters"]["total_bytes"],
               "estimate": estimate}
    finite = bool(losses) and all(math.isfinite(x) for x in losses + mntp_losses)
    ok = result.steps == steps and len(mntp_losses) == mntp_steps and finite
    if not losses:
        return RowResult(7, ROW_NAMES[7], "fail", f"{result.steps}/{steps} steps, no loss logged", numbers=numbers)
    mntp_text = (f"MNTP {len(mntp_losses)}/{mntp_steps} steps loss {mntp_losses[0]:.3f} -> {mntp_losses[-1]:.3f}"
                 if mntp_losses else f"MNTP 0/{mntp_steps} steps")
    text = (f"random Qwen3 {config['num_hidden_layers']} layers x {config['hidden_size']}: {mntp_text}; "
            f"{_training_text(numbers, settings.device, estimate)} (batch {recipe.training.batch_size}, "
            f"grad cache {recipe.training.grad_cache}, max length {recipe.model.max_length})")
    return RowResult(7, ROW_NAMES[7], "pass" if ok else "fail", text, numbers=numbers)


def reloaded_probes(folder: Path, device: str) -> dict[str, Any]:
    """A saved reranker folder loaded as `embedkit eval --rerank` loads it (load_reranker), its probe pairs re-scored
    against the logits recorded when it was saved (rerank_probes.json): {"ok", "max_abs_diff", "atol", "n", "kind"}."""
    from embedkit.models.reranker import check_rerank_probes, load_reranker

    reranker = load_reranker(folder, device=device)
    return {**check_rerank_probes(lambda q, d: reranker.score(q, d, logits=True), folder), "kind": reranker.kind}


def row_qwen3_rerank(settings: Settings) -> RowResult:
    """recipes/qwen3-0.6b-rerank.yaml (a yes/no LLM reranker: LoRA, fp32 weights with bf16 autocast, gradient
    checkpointing) on row 7's random Qwen3 through the same code path (load_recipe + train), its negatives mined by
    the recipe's first stage on a slice of SciFact train; then the saved folder is reloaded as `embedkit eval
    --rerank` loads it and must give the logits its probe pairs were saved with (rerank_probes.json)."""
    import math

    from embedkit.train.config import load_recipe

    steps, queries, documents = ROW8_PLAN["quick" if settings.quick else "full"]
    model, config, build_s = random_qwen3(settings)
    data = scifact_subset(_require_scifact(settings), settings.work / f"row8-scifact-train-{queries}q-{documents}d",
                          n_queries=queries, n_docs=documents, split="train")
    output = _clean(settings.work / "row8-qwen3-rerank")
    overrides = _qwen3_overrides(settings, model, output, steps, f"beir:{data}:train")
    if settings.quick:  # the prompt alone is ~90 of SmolLM2's tokens: 192 leaves room for the pair
        overrides += ["training.batch_size=2", "model.max_length=192"]
    recipe = load_recipe(QWEN3_RERANK_RECIPE, overrides)
    cuda = _is_cuda(settings.device)
    result, losses, peak, timer, flops_config = _train_recording(recipe, cuda)  # peak GPU: mining, loading, steps
    # A sample is one (query, document) pair, one sequence (a training row is 1 + k of them, fewer where it is short
    # of negatives): the throughput table's samples/s are pairs/s here.
    side = side_numbers("embedkit LoRA yes/no reranker (random Qwen3), samples = pairs", timer, flops_config,
                        device_facts(settings.device), texts_per_example=1)
    mined = json.loads((output / "embedkit_manifest.json").read_text())["training"]["data"].get("mined") or {}
    estimate = _memory_estimate(recipe)
    t0 = time.perf_counter()
    probes = reloaded_probes(output, settings.device)
    pairs = 1 + recipe.loss.hard_negatives
    numbers = {**_training_numbers(result, steps, side, losses, peak), "build_s": build_s, "shape": config,
               "train_queries": queries, "pool": mined.get("pool"), "rows_short": mined.get("rows_short"),
               "first_stage": recipe.rerank.first_stage, "batch_size": recipe.training.batch_size,
               "pairs_per_step": recipe.training.batch_size * pairs, "max_length": recipe.model.max_length,
               "estimate": estimate, "reload_s": time.perf_counter() - t0, "probes": probes,
               "reranker": probes["kind"]}
    if cuda and estimate and numbers["peak_gpu_gib"]:
        numbers["peak_vs_estimate"] = numbers["peak_gpu_gib"] * 2**30 / estimate["peak_bytes"]
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    ok = result.steps == steps and finite and probes["ok"]
    if not losses:
        return RowResult(8, ROW_NAMES[8], "fail", f"{result.steps}/{steps} steps, no loss logged", numbers=numbers)
    text = (f"random Qwen3 {config['num_hidden_layers']} layers x {config['hidden_size']}, {probes['kind']} "
            f"reranker: {recipe.rerank.first_stage} mined {recipe.loss.hard_negatives} negatives a row from "
            f"{mined.get('pool')} documents; {_training_text(numbers, settings.device, estimate, unit='pairs')} "
            f"(batch {recipe.training.batch_size} rows x {pairs} pairs, max length {recipe.model.max_length}); "
            f"reloaded: {probes['n']} probe logits {'match' if probes['ok'] else 'DIFFER'}, max |diff| "
            f"{probes['max_abs_diff']:.1e} (pass: <= {probes['atol']:.0e})")
    return RowResult(8, ROW_NAMES[8], "pass" if ok else "fail", text, numbers=numbers)


ROW_FUNCTIONS: dict[int, Callable[[Settings], RowResult]] = {
    1: row_encode_parity, 2: row_train_vs_st, 3: row_smollm2_qlora, 4: row_zero3_resume, 5: row_serve, 6: row_vllm,
    7: row_qwen3_encoder, 8: row_qwen3_rerank}


# ---------------------------------------------------------------------------------------------------- processes
def child_main(which: str, settings: Settings) -> int:
    """A row (or a part of one) in its own process: the result goes to OUT/rows/row-<which>.json."""

    def interrupted(signum, frame):  # the deadline: unwind, so servers started by this row are stopped
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    import logging

    from embedkit.logs import configure_logging

    configure_logging("gpu-check", level=logging.INFO)
    result_file = settings.out / "rows" / f"row-{which}.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        if which == "2-st":
            payload: dict[str, Any] = child_row2_st(settings)
        elif which == "2-embedkit":
            payload = child_row2_embedkit(settings)
        elif which == "4-kill":
            child_row4_killed(settings)
            return 1
        else:
            row = int(which)
            try:
                payload = ROW_FUNCTIONS[row](settings).to_dict()
            except Skip as why:
                payload = RowResult(row, ROW_NAMES[row], "skipped", str(why)).to_dict()
    except Exception as exc:
        traceback.print_exc()  # into the row's log, not onto the console
        if "-" in which:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 1
        payload = RowResult(int(which), ROW_NAMES[int(which)], "fail", one_line(exc)).to_dict()
    result_file.write_text(json.dumps(payload, indent=2, default=str))
    return 0


def environment_summary(device: str) -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "device": device}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available() and device != "cpu":
            props = torch.cuda.get_device_properties(0 if ":" not in device else int(device.split(":")[1]))
            info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
            info["gpu_name"] = props.name
            info["cuda"] = torch.version.cuda
        else:
            info["cpu_threads"] = torch.get_num_threads()
    except Exception as exc:  # the report still gets written
        info["torch"] = one_line(exc)
    info["peak_flops"], info["peak_source"] = gpu_peak_flops(info.get("gpu_name"))
    for name in ("transformers", "sentence-transformers", "peft", "bitsandbytes", "deepspeed", "vllm"):
        try:
            import importlib.metadata

            info[name] = importlib.metadata.version(name)
        except Exception:
            info[name] = None
    return info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (24 texts, 64 SciFact pairs evaluated on a 20-query subset, 3 QLoRA steps, "
                             "a 2-layer Qwen3 for rows 7 and 8)")
    parser.add_argument("--rows", default="all", help="rows to run: 1,2,5 or 2-4 or all (default)")
    parser.add_argument("--out", default=str(REPO / "runs" / "gpu-check"),
                        help="folder for the models, the log and the report (default runs/gpu-check)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"),
                        help="folder holding scifact/ (a BEIR folder); default ../shared/data")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for all rows (default {DEFAULT_BUDGET_S:.0f}; {QUICK_BUDGET_S:.0f} with "
                             "--quick)")
    parser.add_argument("--resume-atol", type=float, default=RESUME_ATOL,
                        help="row 4: the largest LoRA weight difference resumed vs uninterrupted that passes")
    parser.add_argument("--table", metavar="ROWS_JSON",
                        help="print the Markdown table of a rows file (what `pytest -m gpu tests/gpu` wrote) and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table:
        if not Path(args.table).is_file():
            print(f"error: --table: no rows file {args.table} (run `pytest -m gpu tests/gpu` first)", file=sys.stderr)
            return 2
        print(render_markdown(load_rows(args.table)), end="")
        return 0
    out = Path(args.out).resolve()
    if args.child:
        settings = Settings(args.device, args.quick, out, Path(args.data).resolve(), args.deadline or time.time() + 600,
                        args.resume_atol)
        return child_main(args.child, settings)
    try:
        rows = parse_rows(args.rows)
    except EmbedkitError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2
    problem = device_error(args.device)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.device.strip().lower() == "auto":
        args.device = "cuda" if cuda_status()[0] else "cpu"
    shown_device = args.device
    if args.device.startswith("cuda"):
        # One GPU per row process: cuda:N (cuda: N = 0) becomes that process's only (and default) GPU, so that
        # libraries that pick GPUs themselves use the same one and no more (HF Trainer wraps its model in
        # DataParallel over every GPU it sees; vLLM takes the default one).
        index = int(args.device.split(":")[1]) if ":" in args.device else 0
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)
        args.device = "cuda"
    budget = args.budget if args.budget is not None else (QUICK_BUDGET_S if args.quick else DEFAULT_BUDGET_S)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{REPORT_NAME}.log"
    log.write_text("")
    started, wall0 = time.monotonic(), time.time()
    data = Path(args.data).resolve()

    def runner(row: int, left: float) -> RowResult:
        if row == 6:
            reason = vllm_skip_reason(args.device)
            if reason:
                return RowResult(6, ROW_NAMES[6], "skipped", reason)
        settings = Settings(args.device, args.quick, out, data, time.time() + left, args.resume_atol)
        return run_row_process(row, settings, log, left)

    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    say(f"[gpu-check] rows {','.join(map(str, rows))} on {shown_device}{' (quick)' if args.quick else ''}, budget "
        f"{budget:.0f} s; log {log}")
    results = run_rows(rows, runner, budget_s=budget, say=say)
    total = time.monotonic() - started
    env = environment_summary(shown_device)  # this process saw every GPU (torch read the variable before the remap)
    where = env.get("gpu") or f"cpu, {env.get('cpu_threads')} threads"
    title = (f"embedkit GPU check on {shown_device} ({where}; torch {env.get('torch')})"
             + (" -- quick" if args.quick else ""))
    meta = {"title": title, "device": shown_device, "gpu": env.get("gpu_name"), "peak_flops": env.get("peak_flops"),
            "peak_source": env.get("peak_source"), "quick": args.quick, "rows": rows, "budget_s": budget,
            "total_s": round(total, 1), "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(wall0)),
            "environment": env, "command": [sys.executable, *sys.argv]}
    paths = write_report(out, results, meta)
    print(format_table(results, title=title, total_s=total))
    speed = throughput_lines(results)
    if speed:
        print("\n".join(["", *speed, "", peak_line(meta)]))
    say(f"[gpu-check] report: {paths['json']}, {paths['md']}; log: {log}")
    return 1 if any(r.status == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
