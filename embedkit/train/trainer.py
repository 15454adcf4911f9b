"""The training loop: lean on purpose.

Where the time and memory of a generic trainer go, and what this loop does instead (measured on MiniLM, SciFact,
batch 32, max length 256, 2 CPU threads; see bench/bench_train.py):
- attention dropout > 0 forces PyTorch's "math" attention on CPU, which materialises [B, heads, L, L]
  probabilities (+ dropout masks) per layer; with attention dropout 0 the fused flash kernel runs instead.
  Recipes set `model.attention_dropout: 0.0` (hidden dropout stays).
- texts are tokenized once, before the loop; every batch is padded only to its own longest text;
- no datasets / accelerate / dataloader workers: batches are index lists into pre-tokenized ids;
- fused AdamW; gradients set to None between steps; only floats are kept from the graph for logging.

A run writes (atomically) a sentence-transformers folder with the manifest, a model card (README.md), probe
vectors and the training log. Checkpoints (model + optimizer + scheduler + RNG + data position; plain tensors and
dicts, loaded with weights_only=True) live in a hidden sibling work folder, `.<output name>.train/`, so `resume`
finds them and the final atomic save never touches them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from embedkit.data.tuples import TrainingExample
from embedkit.errors import ConfigError, DataError
from embedkit.train.config import Recipe, parse_train_source
from embedkit.train.gradcache import cached_step, plain_step
from embedkit.train.loss import ContrastiveLoss, text_keys

CHECKPOINT_FILE = "state.pt"
LOG_FILE = "train_log.jsonl"
_LENGTH_GROUP_BATCHES = 50  # length-grouped batching sorts within windows of this many batches


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class TrainData:
    examples: list[TrainingExample]
    source: dict[str, Any]  # what was read: spec, path, hash, count
    query_ids: list[list[int]] = field(default_factory=list)
    doc_ids: list[list[list[int]]] = field(default_factory=list)  # per example: [positive, negatives...]
    query_keys: torch.Tensor | None = None
    doc_keys: torch.Tensor | None = None  # [n, 1+k], -1 in padded slots
    doc_valid: torch.Tensor | None = None  # [n, 1+k] bool: False where a row is short of negatives
    teacher: torch.Tensor | None = None  # [n, 1+k]


def load_examples(recipe: Recipe) -> tuple[list[TrainingExample], dict[str, Any]]:
    """The training examples a recipe names (subset and hard negatives applied) plus their provenance."""
    data, loss = recipe.data, recipe.loss
    kind, path, split = parse_train_source(data.train)
    if kind == "beir":
        from embedkit.data.beir import load_beir
        from embedkit.data.tuples import pairs_from_beir

        ds = load_beir(path, split)
        examples = pairs_from_beir(ds)
        source = {"spec": data.train, "path": str(path), "split": split, "data_hash": ds.data_hash()}
    else:
        from embedkit.data.tuples import read_examples
        from embedkit.manifest import sha256_file

        cols = data.columns
        reader = read_examples(path, query=cols.query, positive=cols.positive, negatives=cols.negatives,
                               scores=cols.scores)
        if data.max_examples and data.sample == "first":
            examples = [ex for _, ex in zip(range(data.max_examples), reader)]
        else:
            examples = list(reader)
        source = {"spec": data.train, "path": str(path), "sha256": sha256_file(path)}
    source["available"] = len(examples)
    if data.max_examples and len(examples) > data.max_examples:
        if data.sample == "random":
            chosen = sorted(random.Random(recipe.training.seed).sample(range(len(examples)), data.max_examples))
            examples = [examples[i] for i in chosen]
        else:
            examples = examples[: data.max_examples]
    source.update(sample=data.sample, max_examples=data.max_examples, used=len(examples))
    k = loss.hard_negatives
    # Rows short of negatives (mining keeps queries with fewer survivors) are padded and masked out of the loss.
    short = [len(ex.negatives) for ex in examples if len(ex.negatives) < k]
    source["hard_negatives"] = {"wanted": k, "short_rows": len(short), "missing": sum(k - n for n in short)}
    for i, ex in enumerate(examples):
        if loss.distillation != "none" and ex.scores is None:
            raise DataError(f"example {i + 1} has no teacher scores; loss.distillation needs them", path=path,
                            field=data.columns.scores or "scores")
    return examples, source


def prepare_data(encoder, examples: list[TrainingExample], source: dict, recipe: Recipe) -> TrainData:
    """Tokenize once (never inside the loop) and compute the text keys used for false-negative masking."""
    data = TrainData(examples, source)
    data.query_ids = encoder._token_ids([ex.query for ex in examples], "query")
    data.query_keys = text_keys([ex.query for ex in examples])
    set_documents(data, encoder, recipe)
    return data


def set_documents(data: TrainData, encoder, recipe: Recipe, token_cache: dict[str, list[int]] | None = None) -> None:
    """(Re)build the per-example documents [positive, negatives...] from data.examples: token ids, text keys, the
    validity of each negative slot (rows short of negatives are padded) and teacher scores.

    `token_cache` (text -> ids) lets online re-mining tokenize only the texts it has not seen yet.
    """
    k = recipe.loss.hard_negatives
    examples = data.examples
    docs = [[ex.positive, *ex.negatives[:k]] for ex in examples]
    texts = [t for row in docs for t in row]
    if token_cache is None:
        flat = encoder._token_ids(texts, "document")
    else:
        new = list(dict.fromkeys(t for t in texts if t not in token_cache))
        if new:
            token_cache.update(zip(new, encoder._token_ids(new, "document")))
        flat = [token_cache[t] for t in texts]
    data.doc_ids, start = [], 0
    for row in docs:
        data.doc_ids.append(flat[start:start + len(row)])
        start += len(row)
    n = len(examples)
    valid = torch.zeros(n, 1 + k, dtype=torch.bool)
    keys = torch.full((n, 1 + k), -1, dtype=torch.long)  # -1: a padded slot (real keys are >= 0)
    all_keys = text_keys(texts) if texts else torch.zeros(0, dtype=torch.long)
    start = 0
    for i, row in enumerate(docs):
        valid[i, :len(row)] = True
        keys[i, :len(row)] = all_keys[start:start + len(row)]
        start += len(row)
    data.doc_keys, data.doc_valid = keys, valid
    if recipe.loss.distillation != "none":
        teacher = torch.zeros(n, 1 + k, dtype=torch.float32)  # padded slots stay 0 (masked in the loss)
        for i, ex in enumerate(examples):
            row = [ex.scores[0], *ex.scores[1:1 + min(k, len(ex.negatives))]]
            teacher[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
        data.teacher = teacher


def batch_inputs(data: TrainData, rows: list[int], k: int) -> tuple[list, list, dict[str, Any]]:
    """(query ids, real document ids, loss kwargs) of a batch in the loss layout: all positives, then each query's
    k negative slots in order. Padded slots have no ids; `document_valid` tells the loss which slots are real."""
    query_ids = [data.query_ids[i] for i in rows]
    doc_ids = [data.doc_ids[i][0] for i in rows] + [ids for i in rows for ids in data.doc_ids[i][1:1 + k]]
    idx = torch.tensor(rows)
    doc_keys = torch.cat([data.doc_keys[idx, 0], data.doc_keys[idx, 1:].reshape(-1)])
    kwargs: dict[str, Any] = {"query_keys": data.query_keys[idx], "document_keys": doc_keys}
    valid = torch.cat([data.doc_valid[idx, 0], data.doc_valid[idx, 1:].reshape(-1)])
    if not valid.all():
        kwargs["document_valid"] = valid
    if data.teacher is not None:
        kwargs["teacher_scores"] = data.teacher[idx]
    return query_ids, doc_ids, kwargs


def epoch_batches(data: TrainData, recipe: Recipe, epoch: int) -> list[list[int]]:
    """A deterministic batch order for `epoch` (seed + epoch), optionally grouped by length to cut padding."""
    t = recipe.training
    generator = torch.Generator().manual_seed(t.seed * 1000 + epoch)
    order = torch.randperm(len(data.examples), generator=generator).tolist()
    size = t.batch_size
    if t.group_by_length:
        window = size * _LENGTH_GROUP_BATCHES
        grouped = []
        for start in range(0, len(order), window):
            part = order[start:start + window]
            part.sort(key=lambda i: -(len(data.query_ids[i]) + len(data.doc_ids[i][0])))
            grouped.extend(part)
        batches = [grouped[i:i + size] for i in range(0, len(grouped), size)]
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in shuffle]
    else:
        batches = [order[i:i + size] for i in range(0, len(order), size)]
    if t.drop_last and batches and len(batches[-1]) < size:
        batches.pop()
    return batches


# ---------------------------------------------------------------------------------------------------- model
def build_encoder(recipe: Recipe):
    from embedkit.models.encoder import load_model

    m, a = recipe.model, recipe.adapter
    encoder = load_model(m.name, pooling=m.pooling, prompts=m.prompts, max_length=m.max_length, dtype=m.dtype,
                         padding_side=m.padding_side, quantization="nf4" if a.type == "qlora" else None)
    set_dropout(encoder, attention=m.attention_dropout, hidden=m.hidden_dropout)
    if a.type != "none":
        from embedkit.models.adapters import attach_lora, prepare_kbit

        if a.type == "qlora":
            prepare_kbit(encoder, gradient_checkpointing=m.gradient_checkpointing)
        attach_lora(encoder, r=a.r, alpha=a.alpha, dropout=a.dropout, target_modules=a.targets)
    if m.gradient_checkpointing and a.type != "qlora":
        backbone = encoder.backbone
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if a.type != "none":
            backbone.enable_input_require_grads()
    return encoder


def set_dropout(encoder, *, attention: float | None, hidden: float | None) -> dict[str, int]:
    """Set attention / hidden dropout in the modules (the saved config is untouched: inference has no dropout)."""
    changed = {"attention": 0, "hidden": 0}
    for module in encoder.backbone.modules():
        is_attention = "Attention" in type(module).__name__
        if attention is not None and is_attention:
            if isinstance(getattr(module, "dropout", None), torch.nn.Dropout):  # BERT-style: .dropout.p is read
                module.dropout.p = attention
                changed["attention"] += 1
            elif isinstance(getattr(module, "attention_dropout", None), float):  # Llama / Qwen style
                module.attention_dropout = attention
                changed["attention"] += 1
        elif hidden is not None and isinstance(module, torch.nn.Dropout):
            module.p = hidden
            changed["hidden"] += 1
    return changed


def param_groups(encoder, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in encoder.named_parameters():
        if not p.requires_grad:
            continue
        # Biases and norm weights are not decayed (the usual BERT/HF rule).
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def make_optimizer(encoder, loss_fn, recipe: Recipe):
    t = recipe.training
    groups = param_groups(encoder, t.weight_decay)
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    all_params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for p in all_params)
    return torch.optim.AdamW(groups, lr=t.lr, fused=fused or None)


def linear_schedule(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1) if warmup else 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------------- helpers
def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def rss_gb() -> float:
    """Resident memory now (GB), from /proc (0.0 where there is none)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1e6  # kB
    except OSError:
        pass
    return 0.0


def parameter_memory(encoder) -> dict[str, Any]:
    """Bytes held by the weights: all of them, the trainable ones, and per storage type.

    A 4-bit (bitsandbytes Params4bit) weight counts its packed uint8 storage plus its quantisation constants, so this
    is what the weights really occupy: it shows the saving of QLoRA that peak RSS (dominated by activations) hides.
    """
    total = trainable = 0
    by_kind: dict[str, int] = {}
    for p in encoder.parameters():
        size = p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            for part in (getattr(state, "absmax", None), getattr(state, "code", None)):
                if isinstance(part, torch.Tensor):
                    size += part.numel() * part.element_size()
            kind = "nf4 (packed uint8 + absmax)"
        else:
            kind = str(p.dtype).replace("torch.", "")
        total += size
        trainable += size if p.requires_grad else 0
        by_kind[kind] = by_kind.get(kind, 0) + size
    for b in encoder.buffers():
        total += b.numel() * b.element_size()
    return {"total_bytes": total, "trainable_bytes": trainable, "by_kind_bytes": by_kind}


def recipe_hash(recipe: Recipe) -> str:
    """What must not change between a run and its resume (progress and logging settings may)."""
    dump = recipe.model_dump(mode="json")
    for volatile in ("progress", "log_every", "checkpoint_every", "keep_checkpoints", "threads"):
        dump["training"].pop(volatile, None)
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def work_dir(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.train"


def trainable_state(encoder, loss_fn) -> dict[str, torch.Tensor]:
    state = {f"encoder.{n}": p.detach().clone() for n, p in encoder.named_parameters() if p.requires_grad}
    state.update({f"loss.{n}": p.detach().clone() for n, p in loss_fn.named_parameters()})
    return state


def load_trainable_state(encoder, loss_fn, state: dict[str, torch.Tensor]) -> None:
    params = {f"encoder.{n}": p for n, p in encoder.named_parameters() if p.requires_grad}
    params.update({f"loss.{n}": p for n, p in loss_fn.named_parameters()})
    if set(params) != set(state):
        raise ConfigError("the checkpoint does not match this model (different trainable parameters)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


class _Logger:
    def __init__(self, folder: Path, append: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / LOG_FILE
        self.file = open(self.path, "a" if append else "w", encoding="utf-8")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # only when tensorboard is installed

            self.tb = SummaryWriter(str(folder / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{record.get('event', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    samples: int
    train_seconds: float
    samples_per_second: float
    peak_rss_gb: float
    final_loss: float | None
    dev: dict[str, Any] | None
    best_step: int | None
    log_path: Path


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    output_dir: str | Path | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train the recipe's model; returns where the model went and what was measured.

    `on_step(step, record)` is called after every optimizer step (tests use it to simulate a killed run).
    """
    say = say or (lambda msg: print(f"embedkit train: {msg}", file=sys.stderr, flush=True))
    t = recipe.training
    if output_dir is not None:
        recipe = recipe.model_copy(deep=True)
        recipe.training.output_dir = str(output_dir)
        t = recipe.training
    if recipe.deepspeed.stage != "none":
        from embedkit.train.distributed import train_deepspeed

        return train_deepspeed(recipe, resume=resume)
    threads_before = torch.get_num_threads()
    if t.threads:
        torch.set_num_threads(t.threads)
    try:
        return _train(recipe, resume=resume, on_step=on_step, say=say)
    finally:
        torch.set_num_threads(threads_before)  # the setting is process-wide: give it back


def _train(recipe: Recipe, *, resume: bool, on_step, say) -> TrainResult:
    t = recipe.training
    output = Path(t.output_dir)
    work = work_dir(output)

    checkpoint = _latest_checkpoint(work) if resume else None
    if resume and checkpoint is None:
        say(f"no checkpoint in {work}; starting from the beginning")
    seed_everything(t.seed)  # before the model: LoRA initialisation draws from the RNG
    examples, source = load_examples(recipe)
    say(f"{len(examples)} training examples from {recipe.data.train}")
    short = source["hard_negatives"]
    if short["short_rows"] and not (recipe.mining.online and recipe.mining.at_start):  # else mining fills them
        say(f"{short['short_rows']} rows have fewer than {short['wanted']} negatives ({short['missing']} slots "
            "padded and left out of the loss)")
    encoder = build_encoder(recipe)
    memory = {"parameters": parameter_memory(encoder), "rss_after_load_gb": round(rss_gb(), 3),
              "peak_rss_after_load_gb": round(peak_rss_gb(), 3)}
    data = prepare_data(encoder, examples, source, recipe)
    miner = None
    if recipe.mining.online:
        from embedkit.train.remining import OnlineMiner

        miner = OnlineMiner(recipe, examples)
        say(f"online mining: pool of {len(miner.state.task.corpus_ids)} documents, every {recipe.mining.every}"
            + (" step(s)" if recipe.mining.every != "epoch" else ""))
    lc = recipe.loss
    loss_fn = ContrastiveLoss(
        temperature=lc.temperature, learn_temperature=lc.learn_temperature, symmetric=lc.symmetric,
        mask_false_negatives=lc.mask_false_negatives, margin=lc.margin, matryoshka_dims=lc.matryoshka_dims,
        distillation=None if lc.distillation == "none" else lc.distillation,
        distillation_weight=lc.distillation_weight, distillation_temperature=lc.distillation_temperature,
        contrastive_weight=lc.contrastive_weight,
    )
    optimizer = make_optimizer(encoder, loss_fn, recipe)
    batches_per_epoch = len(epoch_batches(data, recipe, 0))
    if batches_per_epoch == 0:
        raise DataError("no complete batch: fewer examples than batch_size with drop_last", field="training.batch_size")
    total_steps = batches_per_epoch * t.epochs
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    scheduler = linear_schedule(optimizer, math.ceil(total_steps * t.warmup_ratio), total_steps)

    dev_task = None
    if recipe.data.dev:
        from embedkit.eval.tasks import load_task, parse_task_spec

        dev_task = load_task(parse_task_spec(recipe.data.dev))

    state = {"step": 0, "epoch": 0, "batch": 0, "best_score": None, "best_step": None, "samples": 0,
             "train_seconds": 0.0, "history": []}
    if checkpoint is not None:
        payload = torch.load(checkpoint / CHECKPOINT_FILE, weights_only=True)
        if payload["recipe_hash"] != recipe_hash(recipe):
            raise ConfigError("the recipe changed since the checkpoint was written; resume needs the same recipe "
                              f"(or delete {work} to start again)", path=checkpoint)
        load_trainable_state(encoder, loss_fn, payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        _set_rng(payload["rng"])
        state.update(payload["position"])
        if miner is not None:
            miner.restore(payload["mining"], encoder, data)  # the negatives in use when the checkpoint was written
        say(f"resumed from {checkpoint.name} (step {state['step']})")
    else:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
    logger = _Logger(work, append=checkpoint is not None)

    from tqdm.auto import tqdm

    progress = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", file=sys.stderr,
                    disable=not t.progress, dynamic_ncols=True)
    encoder.train()
    grad_scale = loss_fn.grad_scale
    last_loss = None
    try:
        while state["step"] < total_steps:
            if miner is not None and state["batch"] == 0 and miner.due_before_epoch(state["step"], state["epoch"]):
                logger.log({"event": "remine", **miner.refresh(encoder, data, step=state["step"],
                                                              epoch=state["epoch"], say=say)})
            batches = epoch_batches(data, recipe, state["epoch"])
            while state["batch"] < len(batches) and state["step"] < total_steps:
                rows = batches[state["batch"]]
                started = time.perf_counter()
                out = _train_step(encoder, loss_fn, data, rows, recipe, grad_scale)
                grad_norm = None
                if t.max_grad_norm:
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                elapsed = time.perf_counter() - started
                state["step"] += 1
                state["batch"] += 1
                state["samples"] += len(rows)
                state["train_seconds"] += elapsed
                last_loss = float(out.loss)
                record = {"event": "train", "step": state["step"], "epoch": state["epoch"], "loss": last_loss,
                          "contrastive": out.contrastive, "lr": scheduler.get_last_lr()[0], "scale": out.scale,
                          "masked": out.masked, "padded": out.padded, "grad_norm": grad_norm,
                          "samples_per_s": len(rows) / elapsed}
                if out.distillation:
                    record["distillation"] = out.distillation
                progress.update(1)
                progress.set_postfix(loss=f"{last_loss:.4f}", sps=f"{state['samples'] / state['train_seconds']:.2f}")
                if state["step"] % t.log_every == 0 or state["step"] == total_steps:
                    logger.log(record)
                if miner is not None and miner.due_after_step(state["step"], total_steps):
                    logger.log({"event": "remine", **miner.refresh(encoder, data, step=state["step"],
                                                                  epoch=state["epoch"], say=say)})
                if dev_task is not None and t.eval_every and state["step"] % t.eval_every == 0:
                    _dev_eval(encoder, dev_task, recipe, state, logger, work, loss_fn, say)
                if t.checkpoint_every and state["step"] % t.checkpoint_every == 0 and state["step"] < total_steps:
                    _save_checkpoint(work, encoder, loss_fn, optimizer, scheduler, state, recipe,
                                     mining=miner.checkpoint_state(data) if miner is not None else None)
                if on_step is not None:
                    on_step(state["step"], record)
            if state["batch"] >= len(batches):
                state["epoch"] += 1
                state["batch"] = 0
    finally:
        progress.close()

    # Best-checkpoint selection: the dev-best weights win over the last ones.
    dev_result = None
    if dev_task is not None and t.eval_every and state["best_step"] is not None:
        if state["step"] % t.eval_every:  # the final weights were not evaluated yet
            _dev_eval(encoder, dev_task, recipe, state, logger, work, loss_fn, say)
        if state["best_step"] != state["step"]:
            load_trainable_state(encoder, loss_fn, torch.load(work / "best.pt", weights_only=True))
            say(f"using the dev-best weights of step {state['best_step']}")
    encoder.invalidate_fingerprint()
    if dev_task is not None and (t.eval_at_end or t.eval_every):
        dev_result = _evaluate(encoder, dev_task, recipe)
        logger.log({"event": "final_eval", "step": state["step"], **_main_metric(dev_result)})

    stats = {"steps": state["step"], "samples": state["samples"], "train_seconds": round(state["train_seconds"], 3),
             "samples_per_second": round(state["samples"] / max(state["train_seconds"], 1e-9), 4),
             "peak_rss_gb": round(peak_rss_gb(), 3), "memory": memory, "final_loss": last_loss,
             "best_step": state["best_step"],
             "history": state["history"]}
    logger.log({"event": "done", **{k: v for k, v in stats.items() if k != "history"}})
    logger.close()
    save_output(encoder, recipe, output, data.source, stats, dev_result, work,
                online_mining=miner.manifest() if miner is not None else None)
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    say(f"saved {output} ({stats['samples_per_second']} samples/s, peak RSS {stats['peak_rss_gb']} GB)")
    return TrainResult(output, state["step"], state["samples"], stats["train_seconds"], stats["samples_per_second"],
                       stats["peak_rss_gb"], last_loss, dev_result, state["best_step"], output / LOG_FILE)


def _train_step(encoder, loss_fn, data: TrainData, rows: list[int], recipe: Recipe, grad_scale: int):
    query_ids, doc_ids, kwargs = batch_inputs(data, rows, recipe.loss.hard_negatives)
    if recipe.training.grad_cache:
        return cached_step(encoder, loss_fn, query_ids, doc_ids, mini_batch=recipe.training.grad_cache,
                           loss_scale=grad_scale, **kwargs)
    return plain_step(encoder, loss_fn, query_ids, doc_ids, length_chunk=recipe.training.length_chunk,
                      loss_scale=grad_scale, **kwargs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _get_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _latest_checkpoint(work: Path) -> Path | None:
    folder = work / "checkpoints"
    candidates = sorted((p for p in folder.glob("step-*") if (p / CHECKPOINT_FILE).is_file()),
                        key=lambda p: int(p.name.split("-")[1])) if folder.is_dir() else []
    return candidates[-1] if candidates else None


def _save_checkpoint(work: Path, encoder, loss_fn, optimizer, scheduler, state: dict, recipe: Recipe,
                     mining: dict | None = None) -> Path:
    from embedkit.atomic import atomic_dir

    target = work / "checkpoints" / f"step-{state['step']}"
    payload = {"model": trainable_state(encoder, loss_fn), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "rng": _get_rng(), "position": dict(state),
               "recipe_hash": recipe_hash(recipe)}
    if mining is not None:
        payload["mining"] = mining
    with atomic_dir(target) as tmp:
        torch.save(payload, tmp / CHECKPOINT_FILE)
    old = sorted((p for p in target.parent.glob("step-*")), key=lambda p: int(p.name.split("-")[1]))
    for stale in old[: -recipe.training.keep_checkpoints]:
        shutil.rmtree(stale, ignore_errors=True)
    return target


def _evaluate(encoder, task, recipe: Recipe) -> dict[str, Any]:
    from embedkit.eval.runner import evaluate

    encoder.invalidate_fingerprint()
    with torch.random.fork_rng():  # evaluation must not shift the training RNG stream
        report = evaluate(encoder, [task.spec], batch_size=recipe.data.dev_batch_size, seed=recipe.training.seed,
                          use_cache=False)
    result = report["results"][task.spec.name]
    return {"task": task.spec.name, "main_metric": task.spec.main_metric, "metrics": result["metrics"]}


def _main_metric(result: dict[str, Any]) -> dict[str, Any]:
    return {"task": result["task"], "metric": result["main_metric"],
            "score": result["metrics"][result["main_metric"]]}


def _dev_eval(encoder, task, recipe, state, logger, work, loss_fn, say) -> None:
    result = _evaluate(encoder, task, recipe)
    main = _main_metric(result)
    state["history"].append({"step": state["step"], "score": main["score"]})
    logger.log({"event": "eval", "step": state["step"], **main})
    say(f"step {state['step']}: dev {main['metric']} = {main['score']:.4f}")
    if state["best_score"] is None or main["score"] > state["best_score"]:
        state["best_score"], state["best_step"] = main["score"], state["step"]
        from embedkit.atomic import atomic_path

        with atomic_path(work / "best.pt") as tmp:
            torch.save(trainable_state(encoder, loss_fn), tmp)
    encoder.train()


# ---------------------------------------------------------------------------------------------------- output
def save_output(encoder, recipe: Recipe, output: Path, source: dict, stats: dict, dev: dict | None, work: Path,
                online_mining: dict | None = None) -> Path:
    """One atomic folder: model (ST layout) + manifest + README.md + probe vectors + training log."""
    from embedkit.atomic import atomic_dir, write_json, write_text
    from embedkit.manifest import MANIFEST_NAME, command_line
    from embedkit.export.probes import write_probes

    a = recipe.adapter
    base = encoder.base_model
    manifest = {
        "training": {"recipe": recipe.model_dump(mode="json"), "recipe_hash": recipe_hash(recipe),
                     "data": source, "seed": recipe.training.seed, "stats": {k: v for k, v in stats.items()},
                     "online_mining": online_mining},
        "dev_eval": dev,
    }
    # The adapter goes to the work folder first: Encoder.save replaces the folder it writes and merges in place.
    adapter_dir = None
    if a.type != "none" and (a.save in ("adapter", "both") or a.type == "qlora"):
        adapter_dir = encoder.save_adapter(work / "adapter")
    with atomic_dir(output) as tmp:
        if a.type == "none" or a.save in ("merged", "both"):
            merged = _merged_from_4bit(encoder, recipe, adapter_dir) if a.type == "qlora" else encoder
            merged.save(tmp, manifest=manifest)
            merged.invalidate_fingerprint()
            write_probes(merged, tmp, created_by="train")
            # Encoder.save records the path it wrote to (the temporary folder): record the final one.
            record = json.loads((tmp / MANIFEST_NAME).read_text())
            record["model"]["path"] = str(output)
            record["model"]["fingerprint"] = merged.fingerprint
            write_json(tmp / MANIFEST_NAME, record)
        else:
            from embedkit.manifest import base_manifest

            write_json(tmp / MANIFEST_NAME, base_manifest("adapter", base_model=base, model=encoder.describe(),
                                                          **manifest))
            write_probes(encoder, tmp, created_by="train")
        if adapter_dir is not None and a.save in ("adapter", "both"):
            shutil.copytree(adapter_dir, tmp / "adapter")
        if (work / LOG_FILE).is_file():
            shutil.copyfile(work / LOG_FILE, tmp / LOG_FILE)
        write_text(tmp / "README.md", model_card(recipe, source, stats, dev, base, command_line()))
    return output


def _merged_from_4bit(encoder, recipe: Recipe, adapter_dir: Path):
    """QLoRA: merging into a 4-bit base is lossy, so reload the base in full precision with the adapter, then merge."""
    from embedkit.models.adapters import merge_adapter
    from embedkit.models.encoder import load_model

    m = recipe.model
    full = load_model(m.name, pooling=encoder.pooling, prompts=encoder.prompts, max_length=encoder.max_length,
                      dtype="fp32", padding_side=encoder.padding_side, adapter=adapter_dir)
    return merge_adapter(full)


def model_card(recipe: Recipe, source: dict, stats: dict, dev: dict | None, base: dict | None, argv: list[str]) -> str:
    m, a, lc, t = recipe.model, recipe.adapter, recipe.loss, recipe.training
    lines = [
        f"# {Path(t.output_dir).name}",
        "",
        f"A sentence-embedding model fine-tuned with embedkit from `{m.name}` on `{recipe.data.train}`.",
        "",
        "## Training",
        "",
        f"- base model: `{m.name}`" + (f" (fingerprint `{base.get('fingerprint', '')[:16]}`)" if base else ""),
        f"- data: {source.get('used')} examples from `{source.get('spec')}`"
        + (f" (sha256 `{source['sha256'][:16]}`)" if source.get("sha256") else "")
        + (f" (data hash `{source['data_hash'][:16]}`)" if source.get("data_hash") else ""),
        f"- adapter: {a.type}" + (f" (r={a.r}, alpha={a.alpha})" if a.type != "none" else ""),
        f"- loss: InfoNCE, temperature {lc.temperature}{' (learned)' if lc.learn_temperature else ''}, "
        f"{lc.hard_negatives} hard negatives, symmetric={lc.symmetric}"
        + (f", Matryoshka {lc.matryoshka_dims}" if lc.matryoshka_dims else "")
        + (f", distillation {lc.distillation}" if lc.distillation != "none" else ""),
        *([f"- online hard-negative mining every {recipe.mining.every}"
           + (" steps" if recipe.mining.every != "epoch" else "")
           + f", window {recipe.mining.range}, {recipe.mining.sampling} sampling"] if recipe.mining.online else []),
        f"- {stats['steps']} steps, batch {t.batch_size}, lr {t.lr}, epochs {t.epochs}, seed {t.seed}, "
        f"max length {m.max_length or 'model default'}",
        f"- throughput {stats['samples_per_second']} samples/s, peak RSS {stats['peak_rss_gb']} GB",
        f"- command: `{' '.join(argv)}`",
        "",
    ]
    if dev:
        lines += ["## Evaluation", "", f"Task `{dev['task']}` (main metric {dev['main_metric']}):", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in dev["metrics"].items() if isinstance(v, (int, float))]
        lines.append("")
    lines += ["## Use", "", "```python", "from sentence_transformers import SentenceTransformer",
              f"model = SentenceTransformer('{t.output_dir}')", "```", "",
              "`probe_vectors.json` holds reference vectors of fixed texts: an exported or served copy must "
              "reproduce them.", ""]
    return "\n".join(lines)
