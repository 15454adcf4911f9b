"""Direct Preference Optimisation (Rafailov et al., 2023) on (question, chosen, rejected) pairs.

loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

with log-probs summed over the answer tokens (TRL's `loss_type="sigmoid"`, no label smoothing). The reference is
the starting model (normally the SFT model): with an adapter it is the same weights with the adapter disabled (no
second copy in memory); with full training, a frozen copy. Reference log-probs are computed once, before training.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from embedkit.llm.sft import collate_sft, sequence_logprobs


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, chosen rewards, rejected rewards); rewards are beta * (policy - reference) log-probs."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses.mean(), chosen_rewards.detach(), rejected_rewards.detach()


@contextmanager
def reference_mode(model, reference=None):
    """Run the block as the reference model: the adapter disabled, or nothing to do with a separate copy."""
    if reference is not None:
        yield reference
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        raise ValueError("full-parameter DPO needs a frozen reference copy")


def pair_logprobs(model, pairs: Sequence[tuple[dict, dict]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor, torch.Tensor]:
    """(chosen sums, rejected sums, chosen counts, rejected counts); chosen and rejected go in one batch."""
    batch = collate_sft([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    sums, counts = sequence_logprobs(model, batch)
    n = len(pairs)
    return sums[:n], sums[n:], counts[:n], counts[n:]


@torch.no_grad()
def score_pairs(model, pairs: Sequence[tuple[dict, dict]], pad_id: int, *, batch_size: int = 4
                ) -> dict[str, torch.Tensor]:
    from embedkit.llm.loop import chunks

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


def train_dpo(recipe, *, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """DPO from `model.name` (normally an `llm sft` output); returns stats incl. held-out preference accuracy."""
    from embedkit.llm.data import encode_pairs, preference_pairs, subsample
    from embedkit.llm.loop import chunks, run_loop
    from embedkit.llm.sft import _say, finish, prepare, work_dir

    say = say or _say("dpo")
    ctx = prepare(recipe, "dpo", say)
    m, t, d = recipe.model, recipe.training, recipe.data
    tok, model = ctx["tokenizer"], ctx["model"]
    pad, beta = tok.pad_token_id, recipe.dpo.beta
    pairs, skipped = preference_pairs(ctx["train"], seed=t.seed)
    pairs = subsample(pairs, d.max_examples, d.sample, t.seed)
    encoded, dropped = encode_pairs(tok, pairs, max_length=m.max_length, system=m.system_prompt)
    ctx["source"].update(pairs=len(encoded), skipped_without_same_topic_answer=skipped, dropped_too_long=dropped)
    say(f"{len(encoded)} preference pairs ({skipped} questions had no other answer on their topic)")
    held = None
    if ctx["heldout"]:
        held_pairs, _ = preference_pairs(ctx["heldout"], seed=t.seed + 1)
        held_pairs = subsample(held_pairs, d.heldout_examples, "random", t.seed)
        held = encode_pairs(tok, held_pairs, max_length=m.max_length, system=m.system_prompt)[0]

    reference = None
    if recipe.adapter.type == "none":
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    micro = t.micro_batch_size or t.batch_size
    with reference_mode(model, reference) as ref:
        ref_train = score_pairs(ref, encoded, pad, batch_size=micro)
        ref_held = score_pairs(ref, held, pad, batch_size=micro) if held else None
    stats_before = preference_accuracy(ref_held) if ref_held is not None else None
    if stats_before:
        say(f"held-out preference accuracy of the starting model: {stats_before['accuracy_logprob']:.4f}")

    def step(rows: list[int]) -> dict[str, float]:
        total, chosen_r, rejected_r = 0.0, [], []
        for part in chunks(rows, micro):
            pc, pr, _, _ = pair_logprobs(model, [encoded[i] for i in part], pad)
            idx = torch.tensor(part)
            rc, rr = ref_train["chosen"][idx].to(pc.device), ref_train["rejected"][idx].to(pc.device)
            loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta)
            (loss * (len(part) / len(rows))).backward()
            total += float(loss.detach()) * len(part) / len(rows)
            chosen_r.append(cr)
            rejected_r.append(rj)
        cr, rj = torch.cat(chosen_r), torch.cat(rejected_r)
        return {"loss": total, "reward_accuracy": float((cr > rj).float().mean()), "reward_margin": float((cr - rj).mean())}

    output = Path(t.output_dir)
    work = work_dir(output)
    stats = run_loop(recipe, model, len(encoded), step, work=work, say=say, desc="dpo")
    if held:
        after = preference_accuracy(score_pairs(model, held, pad, batch_size=micro), ref_held, beta)
        stats["heldout_preference_before"] = stats_before
        stats["heldout_preference"] = after
        stats["heldout_preference_accuracy_before"] = stats_before["accuracy_logprob"]
        stats["heldout_preference_accuracy"] = after["accuracy_logprob"]
        say(f"held-out preference accuracy after: {after['accuracy_logprob']:.4f} "
            f"(per-token {after['accuracy_mean_logprob']:.4f}, reward {after['accuracy_reward']:.4f})")
    finish(recipe, "dpo", ctx, stats, work, say)
    return {"output_dir": str(output), **stats}

