"""What `llm sft`, `llm dpo` and `llm joint` share: reading the QA data, building the two-headed model inside the
training engine, running the mode's step through `Engine.fit`, and writing the one output folder (both heads).

Each mode is a `Step` (embedkit/train/engine.py) in its own module (sft.py, dpo.py, joint.py); the engine does the
rest: devices, DDP / DeepSpeed / FSDP, checkpoints and --resume, dev evaluation with the best step kept, logging.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from embedkit.device import torch_threads
from embedkit.errors import DataError
from embedkit.llm.config import LLMRecipe
from embedkit.llm.data import read_qa
from embedkit.llm.model import (TwoHeads, attach_adapter, embedding_settings, load_causal_lm, make_embedder, merged_lm,
                                save_llm_folder)
from embedkit.manifest import command_line
from embedkit.models.adapters import keep_4bit_layout
from embedkit.train.backends import backend_class
from embedkit.train.engine import Engine, StepBase, copy_run_logs, seed_everything
from embedkit.train.losses import build_loss

log = logging.getLogger(__name__)


@dataclass
class LLMContext:
    """Everything a mode's step needs, built once per run."""

    recipe: LLMRecipe
    mode: str
    engine: Engine
    heads: Any  # embedkit.llm.model.TwoHeads: what the engine trains
    tokenizer: Any
    path: Path  # the source model folder
    settings: dict[str, Any]  # the embedding side: pooling, prompts, padding side, attention
    train: list  # QAExample
    heldout: list | None
    source: dict[str, Any]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def micro_batch(self) -> int | None:
        return self.recipe.training.micro_batch_size


def build_heads(recipe: LLMRecipe, device) -> tuple[Any, Any, Path, dict[str, Any]]:
    """(TwoHeads, tokenizer, source folder, embedding settings): the causal LM with its adapter and embedder."""
    m = recipe.model
    quant = "nf4" if recipe.adapter.type == "qlora" else None
    lm, tokenizer, path, st = load_causal_lm(m.name, dtype=m.dtype, quantization=quant, device=str(device),
                                             sharded_storage=backend_class(recipe).flattens_parameters(recipe))
    keep_4bit_layout(lm)
    seed_everything(recipe.training.seed)  # adapter initialisation draws from the RNG: same seed, same adapter
    lm = attach_adapter(lm, recipe.adapter, gradient_checkpointing=m.gradient_checkpointing)
    settings = embedding_settings(m, st)
    embedder = make_embedder(lm, tokenizer, settings, name=m.name, source_path=str(path))
    return TwoHeads(lm, embedder), tokenizer, path, settings


class LLMStep(StepBase):
    """Batches of example indices (seeded per epoch), as every LLM mode draws them."""

    def __init__(self, ctx: LLMContext, size: int) -> None:
        self.ctx = ctx
        self.size = size

    def batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.ctx.recipe.training.seed * 1000 + epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        return [order[i:i + batch_size] for i in range(0, self.size, batch_size)]

    def summary(self, engine: Engine) -> dict[str, Any]:
        """Measurements after training (every rank runs it: a ZeRO-3 forward is collective)."""
        return {}


def run_llm(recipe: LLMRecipe, mode: str, make_step: Callable[[LLMContext], LLMStep], *, resume: bool = False,
            on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train one LLM mode end to end; returns the stats (and `output_dir`) on every rank."""
    t, d = recipe.training, recipe.data
    output = Path(t.output_dir)
    with torch_threads(t.threads):
        engine = Engine(recipe, output, kind=f"llm-{mode}")
        seed_everything(t.seed)
        cols = d.columns
        load = dict(question=cols.question, answer=cols.answer, topic=cols.topic, seed=t.seed)
        # DPO draws rejected answers from the same topic, so it reads every row and subsamples the pairs instead.
        train, source = read_qa(d.train, max_examples=None if mode == "dpo" else d.max_examples, sample=d.sample,
                                **load)
        heldout = None
        if d.heldout:
            heldout, _ = read_qa(d.heldout, max_examples=None if mode == "dpo" else d.heldout_examples,
                                 sample="random", **load)
        with engine.model_init():
            heads, tokenizer, path, settings = build_heads(recipe, engine.device)
        engine.set_model_builder(lambda: build_heads(recipe, "cpu")[0])
        log.info("%d training examples from %s; model %s (%s, %s)", len(train), d.train, recipe.model.name,
                 recipe.adapter.type, engine.device)
        ctx = LLMContext(recipe, mode, engine, heads, tokenizer, path, settings, train, heldout, source)
        step = make_step(ctx)
        if step.size == 0:
            raise DataError("no training examples left after encoding (prompts longer than model.max_length?)")
        fit = engine.fit(step, heads, n_examples=step.size, resume=resume, on_step=on_step)
        stats = {**fit.stats(), **step.summary(engine), "processes": engine.world, "backend": engine.backend.name,
                 "device": str(engine.device)}
        if fit.dev is not None:
            stats["dev"] = fit.dev
        full = engine.full_model()
        if engine.is_main:
            save(ctx, full, stats, engine.work)
        engine.finish()
    return {"output_dir": str(output), **stats}


def save(ctx: LLMContext, heads, stats: dict[str, Any], work: Path) -> Path:
    """Merge adapters, save the one folder (both heads), write the card and logs; returns the output folder."""
    recipe, mode = ctx.recipe, ctx.mode
    output = Path(recipe.training.output_dir)
    lm = merged_lm(heads.lm, adapter_type=recipe.adapter.type, source=recipe.model.name, dtype=recipe.model.dtype,
                   work=work)
    manifest = {"llm": {"mode": mode, "recipe": recipe.model_dump(mode="json"), "data": ctx.source,
                        "stats": stats}}
    card = model_card(recipe, mode, ctx.source, stats, command_line())
    save_llm_folder(lm, ctx.tokenizer, output, settings=ctx.settings, name=output.name,
                    base_model={"name": recipe.model.name, "path": str(ctx.path)}, manifest=manifest, card=card,
                    extra_files=lambda tmp: copy_run_logs(work, tmp))
    log.info("saved %s (embedding side: load_model; generative side: load_generator)", output)
    return output


def model_card(recipe, mode: str, source: dict, stats: dict, argv: list[str]) -> str:
    m, a, t = recipe.model, recipe.adapter, recipe.training
    what = {"sft": "supervised fine-tuning (loss on answer tokens only)",
            "dpo": f"DPO on preference pairs (beta {recipe.dpo.beta}, reference = the starting model)",
            "joint": f"joint {build_loss(recipe.loss).describe()} + {recipe.joint.sft_weight} x SFT (GritLM-style), "
                     f"embedding attention {m.embedding_attention}"}[mode]
    lines = [f"# {Path(t.output_dir).name}", "",
             f"One model with two heads, trained by embedkit from `{m.name}`: {what}.", "",
             f"- data: {source.get('used')} examples from `{source.get('spec')}`",
             f"- adapter: {a.type}" + (f" (r={a.r}, alpha={a.alpha}{', DoRA' if a.dora else ''}"
                                       f"{', rsLoRA' if a.rslora else ''}), merged" if a.type != "none" else ""),
             f"- {stats.get('steps')} steps, batch {t.batch_size}, lr {t.lr}, max length {m.max_length}, seed {t.seed}",
             f"- peak RSS {stats.get('peak_rss_gb')} GB, {stats.get('processes', 1)} process(es) "
             f"({stats.get('backend')}), device {stats.get('device')}",
             f"- command: `{' '.join(argv)}`", ""]
    for key, value in stats.items():
        if key.startswith("heldout") and isinstance(value, (int, float)):
            lines.append(f"- {key}: {value:.4f}")
    if stats.get("dev"):
        lines.append(f"- dev {stats['dev']['task']} {stats['dev']['metric']}: {stats['dev']['score']:.4f}")
    lines += ["", "## Use", "", "```python", "from embedkit.models import load_model",
              "from embedkit.llm.generate import load_generator",
              f"vectors = load_model('{t.output_dir}').encode(['what causes asthma?'], kind='query')",
              f"print(load_generator('{t.output_dir}').answer('what causes asthma?', ['passage ...']))", "```",
              "", f"Serve both: `embedkit serve --model {t.output_dir}` (/v1/embeddings and /v1/chat/completions).", ""]
    return "\n".join(lines)
