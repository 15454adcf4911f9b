"""Joint training, GritLM-style: one model, one run, loss = contrastive + sft_weight * answer loss.

The same question/answer pairs feed both terms: (question, answer) is an InfoNCE pair for the embedding side
(`embedkit.train.losses.build_loss(recipe.loss)`, in-batch negatives, the query instruction on questions) and a chat example
for the generative side (loss on the answer tokens only). The embedding side runs the decoder with causal
attention (default) or bidirectional attention (`model.embedding_attention`); the generative side always runs it
causally. Both terms are backpropagated into the same adapter before one optimizer step; since gradients add, this
is exactly the gradient of the summed loss (GradCache, `training.micro_batch_size`, splits the contrastive part
without changing it). `joint.sft_weight: 0` is the embedding-only ablation through the same code path.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from embedkit.eval.runner import evaluate
from embedkit.eval.tasks import load_task, parse_task_spec
from embedkit.llm.data import encode_sft, encode_sft_many
from embedkit.llm.sft import answer_loss_summary, heldout_answer_loss, sft_backward
from embedkit.llm.training import LLMContext, LLMStep, run_llm
from embedkit.models.distributed import is_main_process
from embedkit.models.encoder import load_model
from embedkit.train.contrastive import evaluate_dev
from embedkit.train.gradcache import cached_step, plain_step
from embedkit.train.losses import ContrastiveObjective, build_loss, text_keys

log = logging.getLogger(__name__)


def joint_loss(contrastive: torch.Tensor, sft: torch.Tensor, weight: float) -> torch.Tensor:
    """The objective the joint step optimises (and reports)."""
    return contrastive + weight * sft


def joint_step(embedder, runner, loss_fn: ContrastiveObjective, query_ids: Sequence[Sequence[int]],
               doc_ids: Sequence[Sequence[int]], sft_features: Sequence[dict], *, pad_id: int, weight: float,
               micro_batch: int | None = None, query_keys=None, document_keys=None, scale: float = 1.0
               ) -> dict[str, float]:
    """Forward + backward of one joint batch; gradients accumulate in the parameters. Returns the loss terms.

    `runner`: the training engine (or `DirectRunner(TwoHeads(lm, embedder))`): its model embeds (head "embed") and
    answers (head "answer"). `scale` multiplies the whole objective (the engine's gradient-accumulation weight)."""
    kwargs = {"query_keys": query_keys, "document_keys": document_keys}
    with_sft = weight > 0 and bool(sft_features)
    if micro_batch and micro_batch < len(query_ids):
        out = cached_step(embedder, loss_fn, list(query_ids), list(doc_ids), mini_batch=micro_batch, runner=runner,
                          loss_scale=loss_fn.grad_scale * scale, last=not with_sft, **kwargs)
    else:
        out = plain_step(embedder, loss_fn, list(query_ids), list(doc_ids), runner=runner,
                         loss_scale=loss_fn.grad_scale * scale, last=not with_sft, **kwargs)
    contrastive = float(out.loss)
    sft = 0.0
    if with_sft:
        sft = sft_backward(runner, sft_features, pad_id, micro_batch=micro_batch, weight=weight * scale)
    total = float(joint_loss(torch.tensor(contrastive), torch.tensor(sft), weight))
    return {"loss": total, "contrastive": contrastive, "sft": sft, "scale": out.scale}


class JointStep(LLMStep):
    name = "joint"

    def __init__(self, ctx: LLMContext) -> None:
        recipe = ctx.recipe
        m = recipe.model
        self.embedder = ctx.heads.embedder
        # Keep only pairs whose chat example fits, so both terms always see the same examples.
        examples, self.sft_features = [], []
        for ex in ctx.train:
            feature = encode_sft(ctx.tokenizer, ex.question, ex.answer, max_length=m.max_length,
                                 system=m.system_prompt)
            if feature is not None:
                examples.append(ex)
                self.sft_features.append(feature)
        self.query_ids = self.embedder.token_ids([ex.question for ex in examples], "query")
        self.doc_ids = self.embedder.token_ids([ex.answer for ex in examples], "document")
        self.q_keys = text_keys([ex.question for ex in examples])
        self.d_keys = text_keys([ex.answer for ex in examples])
        self.loss_fn = build_loss(recipe.loss).to(ctx.engine.device)
        self.held = encode_sft_many(ctx.tokenizer, ctx.heldout, max_length=m.max_length, system=m.system_prompt)[0] \
            if ctx.heldout else None
        self.dev_task = None
        if recipe.data.dev:
            self.dev_task = load_task(parse_task_spec(recipe.data.dev))
        self.before: float | None = None
        if recipe.joint.sft_weight == 0 and recipe.adapter.type == "none":
            ctx.heads.lm.get_output_embeddings().requires_grad_(False)  # the embedding-only ablation never uses it
        super().__init__(ctx, len(examples))

    def start(self, engine, resumed: bool) -> None:
        if self.held and self.ctx.recipe.data.heldout_before and not resumed:
            self.before = heldout_answer_loss(self.ctx, self.held, "before")
            self.ctx.heads.train()

    def run(self, rows: list[int], engine, weight: float) -> dict[str, float]:
        idx = torch.tensor(rows)
        return joint_step(self.embedder, engine, self.loss_fn, [self.query_ids[i] for i in rows],
                          [self.doc_ids[i] for i in rows], [self.sft_features[i] for i in rows], pad_id=self.ctx.pad_id,
                          weight=self.ctx.recipe.joint.sft_weight, micro_batch=self.ctx.micro_batch,
                          query_keys=self.q_keys[idx], document_keys=self.d_keys[idx], scale=weight)

    def evaluate(self, engine) -> dict[str, Any] | None:
        if self.dev_task is None:
            return None
        result = evaluate_dev(self.embedder, self.dev_task, self.ctx.recipe, sharded=engine.world > 1)
        self.ctx.heads.train()
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before = state.get("before")

    def summary(self, engine) -> dict[str, Any]:
        return {"sft_weight": self.ctx.recipe.joint.sft_weight,
                "embedding_attention": self.ctx.recipe.model.embedding_attention, "loss": self.loss_fn.describe(),
                **answer_loss_summary(self.ctx, self.held, self.before)}


def train_joint(recipe, *, resume: bool = False, on_step: Callable[[int, dict], None] | None = None
                ) -> dict[str, Any]:
    """Train both heads together; saves one folder; returns stats (dev nDCG@10, held-out answer loss).

    With data.dev the saved folder itself is evaluated at the end (`dev`): with QLoRA it is the full-precision
    base with the adapter merged, which embeds a little differently from the 4-bit model trained (`dev_training`,
    the engine's dev evaluation)."""
    stats = run_llm(recipe, "joint", JointStep, resume=resume, on_step=on_step)
    if recipe.data.dev and is_main_process():
        stats["dev_training"] = stats.get("dev")
        stats["dev"] = evaluate_retrieval(stats["output_dir"], recipe.data.dev, batch_size=recipe.data.dev_batch_size,
                                          seed=recipe.training.seed)
        log.info("dev %s = %.4f (of the saved folder)", stats["dev"]["main_metric"], stats["dev"]["score"])
    return stats


def evaluate_retrieval(model_dir: str | Path, spec: str, *, batch_size: int = 32, seed: int = 42,
                       encoder=None) -> dict[str, Any]:
    """nDCG@10 etc. of a saved folder (as `load_model` reads it) on one retrieval task spec."""
    encoder = encoder or load_model(model_dir)
    report = evaluate(encoder, [spec], batch_size=batch_size, seed=seed, use_cache=False)
    name, result = next(iter(report["results"].items()))
    main = result["task"]["main_metric"]
    metrics = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    return {"task": name, "metric": main, "main_metric": main, "score": float(metrics[main]), "metrics": metrics}
