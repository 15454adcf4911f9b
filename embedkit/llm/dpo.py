"""Direct Preference Optimisation (Rafailov et al., 2023) on (question, chosen, rejected) pairs.

loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

with log-probs summed over the answer tokens (TRL's `loss_type="sigmoid"`, no label smoothing). The reference is
the starting model (normally the SFT model): its log-probs are computed once, before the first update (see DPOStep).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from embedkit.llm.data import encode_pairs, preference_pairs, subsample
from embedkit.llm.sft import collate_sft, sequence_logprobs
from embedkit.llm.training import LLMContext, LLMStep, run_llm
from embedkit.train.gradcache import chunks

log = logging.getLogger(__name__)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, chosen rewards, rejected rewards); rewards are beta * (policy - reference) log-probs."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses.mean(), chosen_rewards.detach(), rejected_rewards.detach()


def pair_logprobs(model, pairs: Sequence[tuple[dict, dict]], pad_id: int, *, runner=None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen sums, rejected sums, chosen counts, rejected counts); chosen and rejected go in one batch.
    With `runner` (the training engine) the forward goes through its wrapped model."""
    batch = collate_sft([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    if runner is not None:
        with runner.autocast():
            outputs = runner.model(batch, head="answer")
        sums, counts = sequence_logprobs(None, batch, outputs=outputs)
    else:
        sums, counts = sequence_logprobs(model, batch)
    n = len(pairs)
    return sums[:n], sums[n:], counts[:n], counts[n:]


@torch.no_grad()
def score_pairs(model, pairs: Sequence[tuple[dict, dict]], pad_id: int, *, batch_size: int = 4
                ) -> dict[str, torch.Tensor]:
    was_training = model.training
    model.eval()
    parts = [pair_logprobs(model, part, pad_id) for part in chunks(list(pairs), batch_size)]
    model.train(was_training)
    keys = ("chosen", "rejected", "chosen_n", "rejected_n")
    return {k: torch.cat([p[i] for p in parts]).float().cpu() for i, k in enumerate(keys)}


def preference_accuracy(scores: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None = None,
                        beta: float = 0.1) -> dict[str, float]:
    """How often the chosen answer scores above the rejected one.

    `logprob`: summed answer log-prob (the quantity DPO trains); `mean_logprob`: per-token (length-normalised);
    `reward` (with a reference): DPO's implicit reward, beta * (log pi - log ref).
    """
    out = {
        "accuracy_logprob": float((scores["chosen"] > scores["rejected"]).float().mean()),
        "accuracy_mean_logprob": float((scores["chosen"] / scores["chosen_n"]
                                        > scores["rejected"] / scores["rejected_n"]).float().mean()),
        "margin_logprob": float((scores["chosen"] - scores["rejected"]).mean()),
        "pairs": int(scores["chosen"].numel()),
    }
    if reference is not None:
        cr = beta * (scores["chosen"] - reference["chosen"])
        rr = beta * (scores["rejected"] - reference["rejected"])
        out["accuracy_reward"] = float((cr > rr).float().mean())
    return out


class DPOStep(LLMStep):
    """DPO against the starting model. The reference log-probs are those of the model before its first update
    (scored once at the start, kept in checkpoints): the same numbers a frozen copy or the adapter-disabled model
    would give, without a second model in memory and under every engine backend."""

    name = "dpo"

    def __init__(self, ctx: LLMContext) -> None:
        recipe = ctx.recipe
        m, t, d = recipe.model, recipe.training, recipe.data
        pairs, skipped = preference_pairs(ctx.train, seed=t.seed)
        pairs = subsample(pairs, d.max_examples, d.sample, t.seed)
        self.encoded, dropped = encode_pairs(ctx.tokenizer, pairs, max_length=m.max_length, system=m.system_prompt)
        ctx.source.update(pairs=len(self.encoded), skipped_without_same_topic_answer=skipped, dropped_too_long=dropped)
        log.info("%d preference pairs (%d questions had no other answer on their topic)", len(self.encoded), skipped)
        self.held = None
        if ctx.heldout:
            held_pairs, _ = preference_pairs(ctx.heldout, seed=t.seed + 1)
            held_pairs = subsample(held_pairs, d.heldout_examples, "random", t.seed)
            self.held = encode_pairs(ctx.tokenizer, held_pairs, max_length=m.max_length, system=m.system_prompt)[0]
        self.beta = recipe.dpo.beta
        self.micro = ctx.micro_batch or t.batch_size
        self.reference: dict[str, torch.Tensor] | None = None
        self.reference_held: dict[str, torch.Tensor] | None = None
        super().__init__(ctx, len(self.encoded))

    def start(self, engine, resumed: bool) -> None:
        if resumed:
            return  # the reference scores came back with the checkpoint
        lm = self.ctx.heads.lm
        self.reference = score_pairs(lm, self.encoded, self.ctx.pad_id, batch_size=self.micro)
        if self.held:
            self.reference_held = score_pairs(lm, self.held, self.ctx.pad_id, batch_size=self.micro)
            log.info("held-out preference accuracy of the starting model: %.4f",
                     preference_accuracy(self.reference_held)["accuracy_logprob"])
        self.ctx.heads.train()

    def run(self, rows: list[int], engine, weight: float) -> dict[str, float]:
        total, chosen_r, rejected_r = 0.0, [], []
        parts = chunks(rows, self.micro)
        for i, part in enumerate(parts):
            with engine.sync(last=i == len(parts) - 1):
                pc, pr, _, _ = pair_logprobs(None, [self.encoded[j] for j in part], self.ctx.pad_id, runner=engine)
                idx = torch.tensor(part)
                rc = self.reference["chosen"][idx].to(pc.device)
                rr = self.reference["rejected"][idx].to(pc.device)
                loss, cr, rj = dpo_loss(pc, pr, rc, rr, self.beta)
                engine.backward(loss * (len(part) / len(rows)) * weight)
            total += float(loss.detach()) * len(part) / len(rows)
            chosen_r.append(cr)
            rejected_r.append(rj)
        cr, rj = torch.cat(chosen_r), torch.cat(rejected_r)
        return {"loss": total, "reward_accuracy": float((cr > rj).float().mean()),
                "reward_margin": float((cr - rj).mean())}

    def evaluate(self, engine) -> dict[str, Any] | None:
        if not self.held:
            return None
        after = preference_accuracy(score_pairs(self.ctx.heads.lm, self.held, self.ctx.pad_id, batch_size=self.micro),
                                    self.reference_held, self.beta)
        self.ctx.heads.train()
        return {"task": "heldout", "metric": "preference_accuracy", "score": after["accuracy_logprob"],
                "metrics": after}

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "reference_held": self.reference_held}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference, self.reference_held = state["reference"], state["reference_held"]

    def summary(self, engine) -> dict[str, Any]:
        if not self.held:
            return {}
        before = preference_accuracy(self.reference_held)
        after = preference_accuracy(score_pairs(self.ctx.heads.lm, self.held, self.ctx.pad_id, batch_size=self.micro),
                                    self.reference_held, self.beta)
        log.info("held-out preference accuracy after: %.4f (per-token %.4f, reward %.4f)", after["accuracy_logprob"],
                 after["accuracy_mean_logprob"], after["accuracy_reward"])
        return {"heldout_preference_before": before, "heldout_preference": after,
                "heldout_preference_accuracy_before": before["accuracy_logprob"],
                "heldout_preference_accuracy": after["accuracy_logprob"]}


def train_dpo(recipe, *, resume: bool = False, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """DPO from `model.name` (normally an `llm sft` output); returns stats incl. held-out preference accuracy."""
    return run_llm(recipe, "dpo", DPOStep, resume=resume, on_step=on_step)
