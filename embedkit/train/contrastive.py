"""Contrastive training of an embedding model: the `Step` that `embedkit train` plugs into the training engine.

The step owns the data (tokenized once, before the loop), the batch layout the loss expects, the forward (plain,
length-chunked or GradCache), dev evaluation, online re-mining, and the output folder; the engine
(embedkit/train/engine.py) owns devices, processes, the optimizer, checkpoints and logging.

Why attention dropout 0 in the recipes: attention dropout > 0 forces PyTorch's "math" attention on CPU, which
materialises [B, heads, L, L] probabilities (+ dropout masks) per layer; with attention dropout 0 the fused flash
kernel runs instead (several times faster, far less memory). Hidden dropout stays.

The output folder is written atomically: a sentence-transformers model with the manifest, a model card (README.md)
with the loss actually used and the dev results, probe vectors, the training log and the TensorBoard events.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from embedkit.atomic import atomic_dir, write_json, write_text
from embedkit.data.tuples import TrainingExample
from embedkit.device import torch_threads
from embedkit.errors import ConfigError
from embedkit.eval import runner as eval_runner
from embedkit.eval.tasks import load_task, parse_task_spec
from embedkit.manifest import MANIFEST_NAME, base_manifest, command_line
from embedkit.models.adapters import attach_lora, keep_4bit_layout, merge_adapter, prepare_kbit
from embedkit.models.distributed import sharded_encoding as shard
from embedkit.models.encoder import load_model
from embedkit.models.probes import write_probes
from embedkit.train.backends import backend_class
from embedkit.train.config import Recipe
from embedkit.train.engine import (LOG_FILE, Engine, FitResult, Phase, StepBase, copy_run_logs, peak_rss_gb,
                                   recipe_hash, rss_gb, seed_everything)
from embedkit.train.gradcache import cached_step, plain_step
from embedkit.train.losses import ContrastiveObjective, build_loss
from embedkit.train.mntp import mntp_phase
from embedkit.train.remining import OnlineMiner
from embedkit.train.trainset import TrainData, batch_inputs, epoch_batches, load_examples, prepare_data

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------- model
def build_encoder(recipe: Recipe, device: torch.device | str = "cpu"):
    """The recipe's encoder, ready to train: dropout set, adapters attached, unused weights frozen."""
    m, a = recipe.model, recipe.adapter
    encoder = load_model(m.name, pooling=m.pooling, prompts=m.prompts, max_length=m.max_length, dtype=m.dtype,
                         padding_side=m.padding_side, quantization="nf4" if a.type == "qlora" else None,
                         device=str(device), attention=m.attention,
                         sharded_storage=backend_class(recipe).flattens_parameters(recipe))
    if a.type == "qlora":
        keep_4bit_layout(encoder.backbone)
    set_dropout(encoder, attention=m.attention_dropout, hidden=m.hidden_dropout)
    freeze_unused(encoder)
    if a.type == "lora" and a.save in ("adapter", "both") and recipe.deepspeed.stage != "zero3":
        # The model the adapter is attached to, for `embedkit serve --adapter` to check it is served on that base
        # (its fingerprint: every weight, the tokenizer and the embedding settings). Not under ZeRO-3, whose
        # partitioned weights are not the model's; QLoRA's 4-bit base is not a base anything serves.
        encoder.adapter_base = {"name": m.name, "fingerprint": encoder.fingerprint}
    return apply_adapter(encoder, recipe)


def apply_adapter(model, recipe):
    """The recipe's adapter and gradient checkpointing on a model with a `.backbone` (an Encoder, a yes/no
    reranker), in place: QLoRA's k-bit preparation (which enables checkpointing itself), then LoRA; afterwards only
    the adapter trains. Without an adapter every weight trains and only checkpointing is set."""
    m, a = recipe.model, recipe.adapter
    if a.type != "none":
        if a.type == "qlora":
            prepare_kbit(model, gradient_checkpointing=m.gradient_checkpointing)
        attach_lora(model, r=a.r, alpha=a.alpha, dropout=a.dropout, target_modules=a.targets, dora=a.dora,
                    rslora=a.rslora)
    if m.gradient_checkpointing and a.type != "qlora":
        backbone = model.backbone
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if a.type != "none":  # the frozen embeddings' output must carry a gradient into the checkpointed layers
            backbone.enable_input_require_grads()
    return model


def freeze_unused(encoder) -> int:
    """Freeze weights the embedding never uses (BERT's pooler: embedkit pools the hidden states itself).

    They would get no gradient, which DDP reports as an error and DeepSpeed's AdamW still decays. The saved model
    keeps them unchanged. Returns how many tensors were frozen."""
    frozen = 0
    for name, p in encoder.backbone.named_parameters():
        if name.startswith("pooler.") or ".pooler." in name:
            p.requires_grad_(False)
            frozen += 1
    return frozen


def set_dropout(encoder, *, attention: float | None, hidden: float | None) -> dict[str, int]:
    """Set attention / hidden dropout in the modules (the saved config is untouched: inference has no dropout)."""
    changed = {"attention": 0, "hidden": 0}
    # An attention module's own nn.Dropout is visited again after it as a plain Dropout: it must keep the
    # attention rate, not take the hidden one.
    attention_dropouts = {id(m.dropout) for m in encoder.backbone.modules()
                          if "Attention" in type(m).__name__ and isinstance(getattr(m, "dropout", None), torch.nn.Dropout)}
    for module in encoder.backbone.modules():
        is_attention = "Attention" in type(module).__name__
        if attention is not None and is_attention:
            if isinstance(getattr(module, "dropout", None), torch.nn.Dropout):  # BERT-style: .dropout.p is read
                module.dropout.p = attention
                changed["attention"] += 1
            elif isinstance(getattr(module, "attention_dropout", None), float):  # Llama / Qwen style
                module.attention_dropout = attention
                changed["attention"] += 1
        elif hidden is not None and isinstance(module, torch.nn.Dropout) and id(module) not in attention_dropouts:
            module.p = hidden
            changed["hidden"] += 1
    return changed


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


# ---------------------------------------------------------------------------------------------------- the step
class ContrastiveStep(StepBase):
    name = "train"

    def __init__(self, recipe: Recipe, encoder, loss_fn: ContrastiveObjective, data: TrainData,
                 dev_task=None, miner=None) -> None:
        self.recipe, self.encoder, self.loss_fn, self.data = recipe, encoder, loss_fn, data
        self.dev_task, self.miner = dev_task, miner

    def batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        return epoch_batches(self.data, self.recipe, epoch, batch_size)

    def run(self, rows: list[int], engine: Engine, weight: float) -> dict[str, float]:
        t, k = self.recipe.training, self.recipe.loss.hard_negatives
        query_ids, doc_ids, kwargs = batch_inputs(self.data, rows, k)
        if engine.world > 1:
            # Every rank must pass the same arguments to the gathering loss: always send the validity mask.
            kwargs.setdefault("document_valid", torch.ones(len(rows) * (1 + k), dtype=torch.bool))
        scale = self.loss_fn.grad_scale * weight
        if t.grad_cache:
            out = cached_step(self.encoder, self.loss_fn, query_ids, doc_ids, mini_batch=t.grad_cache,
                              loss_scale=scale, runner=engine, **kwargs)
        else:
            out = plain_step(self.encoder, self.loss_fn, query_ids, doc_ids, length_chunk=t.length_chunk,
                             loss_scale=scale, runner=engine, **kwargs)
        record = {"loss": float(out.loss), "contrastive": out.contrastive, "scale": out.scale, "masked": out.masked,
                  "padded": out.padded}
        if out.distillation:
            record["distillation"] = out.distillation
        return record

    def evaluate(self, engine: Engine) -> dict[str, Any] | None:
        if self.dev_task is None:
            return None
        return evaluate_dev(self.encoder, self.dev_task, self.recipe, sharded=engine.world > 1)

    def before_epoch(self, engine: Engine, step: int, epoch: int) -> dict | None:
        if self.miner is not None and self.miner.due_before_epoch(step, epoch):
            return self._remine(engine, step, epoch)
        return None

    def after_step(self, engine: Engine, step: int, total: int) -> dict | None:
        if self.miner is not None and self.miner.due_after_step(step, total):
            return self._remine(engine, step, engine.position.get("epoch"))
        return None

    def _remine(self, engine: Engine, step: int, epoch: int | None) -> dict:
        with sharded_encoding(self.encoder, engine.world > 1):
            record = self.miner.refresh(self.encoder, self.data, step=step, epoch=epoch)
        self.encoder.train()
        return {"event": "remine", **record}

    def state_dict(self) -> dict[str, Any]:
        return {"mining": self.miner.checkpoint_state(self.data)} if self.miner is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.miner is not None:
            self.miner.restore(state["mining"], self.encoder, self.data)


def sharded_encoding(encoder, enabled: bool):
    """Encoding spread over the processes of the run (every one takes part); a no-op for one process."""
    if not enabled:
        return contextlib.nullcontext()
    return shard(encoder)


def evaluate_dev(encoder, task, recipe, *, sharded: bool = False) -> dict[str, Any]:
    """The dev task's metrics with the encoder as it is now; the training RNG stream is left untouched."""
    encoder.invalidate_fingerprint()
    with torch.random.fork_rng(), sharded_encoding(encoder, sharded):
        report = eval_runner.evaluate(encoder, [task.spec], batch_size=recipe.data.dev_batch_size,
                                      seed=recipe.training.seed, use_cache=False)
    encoder.train()
    result = report["results"][task.spec.name]
    main = task.spec.main_metric
    # per query: `embedkit tune` pools the queries of its dev folds and compares trials query by query
    per_query = {q: values[main] for q, values in result.get("per_query", {}).items() if main in values}
    return {"task": task.spec.name, "metric": main, "main_metric": main, "score": result["metrics"][main],
            "metrics": result["metrics"], "per_query": per_query}


# ---------------------------------------------------------------------------------------------------- training
@dataclass(kw_only=True)
class TrainResult(FitResult):
    """What the engine measured, and where the model and its log went."""

    output_dir: Path
    log_path: Path


def train(recipe: Recipe, *, resume: bool = False, output_dir: str | Path | None = None,
          on_step: Callable[[int, dict], None] | None = None,
          on_eval: Callable[[int, dict, int], None] | None = None) -> TrainResult:
    """Train the recipe's model through the engine; returns where the model went and what was measured.

    `on_step(step, record)` is called after every optimizer step (tests use it to simulate a killed run);
    `on_eval(step, dev_result, total_steps)` after every dev evaluation (`embedkit tune` feeds its pruner with it).
    """
    if output_dir is not None:
        recipe = recipe.model_copy(deep=True)
        recipe.training.output_dir = str(output_dir)
    with torch_threads(recipe.training.threads):
        return _train(recipe, resume=resume, on_step=on_step, on_eval=on_eval)


def _train(recipe: Recipe, *, resume: bool, on_step, on_eval=None) -> TrainResult:
    t = recipe.training
    output = Path(t.output_dir)
    engine = Engine(recipe, output, kind="train")
    if recipe.mining.online and engine.world > 1:
        raise ConfigError("mining.online is not supported with several processes yet: train it with --nproc 1",
                          field="mining.online")
    seed_everything(t.seed)  # before the model: LoRA initialisation draws from the RNG
    examples, source = load_examples(recipe)
    log.info("%d training examples from %s", len(examples), recipe.data.train)
    short = source["hard_negatives"]
    if short["short_rows"] and not (recipe.mining.online and recipe.mining.at_start):  # else mining fills them
        log.info("%d rows have fewer than %d negatives (%d slots padded and left out of the loss)",
                 short["short_rows"], short["wanted"], short["missing"])
    with engine.model_init():
        encoder = build_encoder(recipe, engine.device)
    engine.set_model_builder(lambda: build_encoder(recipe, "cpu"))
    memory = {"parameters": parameter_memory(encoder), "rss_after_load_gb": round(rss_gb(), 3),
              "peak_rss_after_load_gb": round(peak_rss_gb(), 3)}
    data = prepare_data(encoder, examples, source, recipe)
    miner = None
    if recipe.mining.online:
        miner = OnlineMiner(recipe, examples)
        log.info("online mining: pool of %d documents, every %s%s", len(miner.state.task.corpus_ids),
                 recipe.mining.every, " step(s)" if recipe.mining.every != "epoch" else "")
    loss_fn = build_loss(recipe.loss).to(engine.device)
    dev_task = None
    if recipe.data.dev:
        dev_task = load_task(parse_task_spec(recipe.data.dev))
    phases = []
    if recipe.mntp.steps:  # the LLM2Vec warm-up: a first phase of the same fit, on the same model and adapter
        phases.append(mntp_phase(recipe, encoder, mntp_documents(examples)))
    step = ContrastiveStep(recipe, encoder, loss_fn, data, dev_task, miner)
    phases.append(Phase(step.name, step, len(data.examples)))
    fit = engine.fit(phases, encoder, extra=[p for p in loss_fn.parameters() if p.requires_grad], resume=resume,
                     on_step=on_step, on_eval=on_eval)
    if "mntp" in fit.phases:  # absent when resumed from a checkpoint of an earlier run's contrastive phase
        memory["mntp"] = fit.phases["mntp"]
    stats = {**fit.stats(), "memory": memory, "processes": engine.world, "backend": engine.backend.name,
             "device": str(engine.device), "loss": loss_fn.describe()}
    if engine.world > 1 or recipe.deepspeed.stage != "none":
        stats["deepspeed"] = recipe.deepspeed.model_dump()
    model = engine.full_model()
    if engine.is_main:
        save_output(model, recipe, output, data.source, stats, fit.dev, engine.work,
                    online_mining=miner.manifest() if miner is not None else None)
        log.info("saved %s (%s samples/s, peak RSS %s GB)", output, stats["samples_per_second"], stats["peak_rss_gb"])
    engine.finish()
    return TrainResult(**vars(fit), output_dir=output, log_path=output / LOG_FILE)


def mntp_documents(examples: list[TrainingExample]) -> list[str]:
    """The distinct documents of the training rows (positives first, then negatives), in a fixed order."""
    return list(dict.fromkeys([e.positive for e in examples] + [n for e in examples for n in e.negatives]))


# ---------------------------------------------------------------------------------------------------- output
def save_output(encoder, recipe: Recipe, output: Path, source: dict, stats: dict, dev: dict | None, work: Path,
                online_mining: dict | None = None) -> Path:
    """One atomic folder: model (ST layout) + manifest + README.md + probe vectors + training log."""
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
            write_json(tmp / MANIFEST_NAME, base_manifest("adapter", base_model=base, model=encoder.describe(),
                                                          **manifest))
            write_probes(encoder, tmp, created_by="train")
        if adapter_dir is not None and a.save in ("adapter", "both"):
            shutil.copytree(adapter_dir, tmp / "adapter")
            adapter_base = getattr(encoder, "adapter_base", None)
            if adapter_base is not None:
                record = json.loads((tmp / MANIFEST_NAME).read_text())
                record["adapter"] = {"path": "adapter", "base": adapter_base}
                write_json(tmp / MANIFEST_NAME, record)
        copy_run_logs(work, tmp)
        write_text(tmp / "README.md", model_card(recipe, source, stats, dev, base, command_line()))
    return output


def _merged_from_4bit(encoder, recipe: Recipe, adapter_dir: Path):
    """QLoRA: merging into a 4-bit base is lossy, so reload the base in full precision with the adapter, then merge."""
    m = recipe.model
    full = load_model(m.name, pooling=encoder.pooling, prompts=encoder.prompts, max_length=encoder.max_length,
                      dtype="fp32", padding_side=encoder.padding_side, adapter=adapter_dir, attention=encoder.attention)
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
        f"- loss: {stats.get('loss') or build_loss(lc).describe()}; {lc.hard_negatives} hard negatives per query",
        *([f"- online hard-negative mining every {recipe.mining.every}"
           + (" steps" if recipe.mining.every != "epoch" else "")
           + f", window {recipe.mining.range}, {recipe.mining.sampling} sampling"] if recipe.mining.online else []),
        f"- {stats['steps']} steps, batch {t.batch_size}, lr {t.lr}, epochs {t.epochs}"
        + (f" (min_steps {t.min_steps})" if t.min_steps else "") + f", seed {t.seed}, "
        f"max length {m.max_length or 'model default'}",
        f"- throughput {stats['samples_per_second']} samples/s, peak RSS {stats['peak_rss_gb']} GB"
        + (f", {stats.get('processes', 1)} processes ({stats.get('backend')})" if stats.get("processes", 1) > 1 else "")
        + (f", device {stats['device']}" if stats.get("device") else ""),
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
