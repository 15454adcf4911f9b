"""Supervised fine-tuning of the generative head: loss on the answer tokens only.

Labels are -100 on the prompt (system + question + the assistant header) and on padding (`encode_sft`,
`collate_sft`). The loss is the mean cross-entropy over the answer tokens of a whole step (micro-batches weighted
by their token counts, so splitting a step does not change it). Only answer positions go through lm_head: with a
49k vocabulary that is most of the compute a full-logits loss would spend on prompt tokens.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from embedkit.llm.data import IGNORE_INDEX, encode_sft_many
from embedkit.llm.model import answer_logits
from embedkit.llm.training import LLMContext, LLMStep, run_llm
from embedkit.train.gradcache import chunks

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- batches
def collate_sft(features: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (-100 on padding)."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[row, :n] = torch.as_tensor(f["input_ids"])
        labels[row, :n] = torch.as_tensor(f["labels"])
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------------- losses
def sft_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy where labels != -100 (logits [B, L, V] at position t predict token t+1)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def sft_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the answer tokens, their count)."""
    logits, targets, _ = answer_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


def sequence_logprobs(model, batch: dict[str, torch.Tensor], *, outputs=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: (sum of answer-token log-probs [B], answer-token count [B]). `outputs`: answer_logits'
    result when the forward already ran (through the training engine)."""
    from trl.trainer.utils import selective_log_softmax  # TRL's memory-light log_softmax + gather

    logits, targets, rows = outputs if outputs is not None else answer_logits(model, batch)
    token_logps = selective_log_softmax(logits, targets)
    b = batch["input_ids"].shape[0]
    sums = torch.zeros(b, device=token_logps.device, dtype=token_logps.dtype).index_add(0, rows, token_logps)
    counts = torch.zeros(b, device=token_logps.device).index_add(0, rows, torch.ones_like(token_logps))
    return sums, counts


def sft_backward(runner, features: Sequence[dict], pad_id: int, *, micro_batch: int | None, weight: float = 1.0,
                 last: bool = True) -> float:
    """Backward of `weight` x (token-mean answer loss over `features`), micro-batched; returns the loss.

    `runner`: the training engine, or `DirectRunner(TwoHeads(lm))`; `runner.model(batch, head="answer")` gives the
    answer logits. Gradients are synchronised on the last micro-batch when `last`."""
    total_tokens = sum(sum(1 for x in f["labels"][1:] if x != IGNORE_INDEX) for f in features)
    if total_tokens == 0:
        return 0.0
    total = 0.0
    parts = chunks(list(features), micro_batch)
    for i, part in enumerate(parts):
        with runner.sync(last=last and i == len(parts) - 1):
            with runner.autocast():
                logits, targets, _ = runner.model(collate_sft(part, pad_id), head="answer")
            loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
            runner.backward(loss_sum * (weight / total_tokens))
        total += float(loss_sum.detach())
    return total / total_tokens


@torch.no_grad()
def answer_loss(model, features: Sequence[dict], pad_id: int, *, batch_size: int = 8) -> float:
    """Held-out token-mean answer loss (nats per answer token)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for part in chunks(list(features), batch_size):
        loss_sum, n = sft_loss_sum(model, collate_sft(part, pad_id))
        total += float(loss_sum)
        count += n
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------------- training
def heldout_answer_loss(ctx: LLMContext, held: Sequence[dict], when: str) -> float:
    """The held-out answer loss as `llm sft` and `llm joint` report it, before or after training."""
    loss = answer_loss(ctx.heads.lm, held, ctx.pad_id, batch_size=ctx.micro_batch or 8)
    log.info("held-out answer loss %s: %.4f", when, loss)
    return loss


def answer_loss_summary(ctx: LLMContext, held: Sequence[dict] | None, before: float | None) -> dict[str, Any]:
    """The held-out answer loss before and after training, as the stats of `llm sft` and `llm joint` report it."""
    out: dict[str, Any] = {}
    if before is not None:
        out["heldout_answer_loss_before"] = before
    if held:
        out["heldout_answer_loss"] = heldout_answer_loss(ctx, held, "after")
        out["heldout_examples"] = len(held)
    return out


class SFTStep(LLMStep):
    name = "sft"

    def __init__(self, ctx: LLMContext) -> None:
        m = ctx.recipe.model
        self.features, self.dropped = encode_sft_many(ctx.tokenizer, ctx.train, max_length=m.max_length,
                                                      system=m.system_prompt)
        self.held = encode_sft_many(ctx.tokenizer, ctx.heldout, max_length=m.max_length, system=m.system_prompt)[0] \
            if ctx.heldout else None
        self.before: float | None = None
        super().__init__(ctx, len(self.features))

    def start(self, engine, resumed: bool) -> None:
        if self.held and self.ctx.recipe.data.heldout_before and not resumed:
            self.before = heldout_answer_loss(self.ctx, self.held, "before")

    def run(self, rows: list[int], engine, weight: float) -> dict[str, float]:
        loss = sft_backward(engine, [self.features[i] for i in rows], self.ctx.pad_id, micro_batch=self.ctx.micro_batch,
                            weight=weight)
        return {"loss": loss, "sft": loss}

    def evaluate(self, engine) -> dict[str, Any] | None:
        if not self.held:
            return None
        loss = answer_loss(self.ctx.heads.lm, self.held, self.ctx.pad_id, batch_size=self.ctx.micro_batch or 8)
        self.ctx.heads.train()
        return {"task": "heldout", "metric": "answer_loss", "score": loss, "greater_is_better": False,
                "metrics": {"answer_loss": loss}}

    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before = state.get("before")

    def summary(self, engine) -> dict[str, Any]:
        return {"dropped_examples": self.dropped, **answer_loss_summary(self.ctx, self.held, self.before)}


def train_sft(recipe, *, resume: bool = False, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Fine-tune on question -> answer chat examples; returns stats (held-out answer loss before/after)."""
    return run_llm(recipe, "sft", SFTStep, resume=resume, on_step=on_step)
