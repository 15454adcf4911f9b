"""Supervised fine-tuning of the generative head: loss on the answer tokens only.

Labels are -100 on the prompt (system + question + the assistant header) and on padding (`encode_sft`,
`collate_sft`). The loss is the mean cross-entropy over the answer tokens of a whole step (micro-batches weighted
by their token counts, so splitting a step does not change it). Only answer positions go through lm_head: with a
49k vocabulary that is most of the compute a full-logits loss would spend on prompt tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from embedkit.llm.data import IGNORE_INDEX


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


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [N, V], targets [N], row [N]) for the N answer tokens of the batch only.

    Generation attention is always causal: the decoder runs with its own (causal) mask here.
    """
    from embedkit.llm.model import decoder_of, lm_head_of

    device = next(p for p in model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    hidden = decoder_of(model)(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device),
                               use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=device)[:, None].expand_as(targets)[keep]
    logits = lm_head_of(model)(hidden[:, :-1][keep]).float()
    return logits, targets[keep], rows


def sft_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the answer tokens, their count)."""
    logits, targets, _ = answer_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: (sum of answer-token log-probs [B], answer-token count [B])."""
    from trl.trainer.utils import selective_log_softmax  # TRL's memory-light log_softmax + gather

    logits, targets, rows = answer_logits(model, batch)
    token_logps = selective_log_softmax(logits, targets)
    b = batch["input_ids"].shape[0]
    sums = torch.zeros(b, device=token_logps.device, dtype=token_logps.dtype).index_add(0, rows, token_logps)
    counts = torch.zeros(b, device=token_logps.device).index_add(0, rows, torch.ones_like(token_logps))
    return sums, counts


def sft_backward(model, features: Sequence[dict], pad_id: int, *, micro_batch: int | None, weight: float = 1.0
                 ) -> float:
    """Backward of `weight` x (token-mean answer loss over `features`), micro-batched; returns the loss."""
    from embedkit.llm.loop import chunks

    total_tokens = sum(sum(1 for x in f["labels"][1:] if x != IGNORE_INDEX) for f in features)
    if total_tokens == 0:
        return 0.0
    total = 0.0
    for part in chunks(list(features), micro_batch):
        loss_sum, _ = sft_loss_sum(model, collate_sft(part, pad_id))
        (loss_sum * (weight / total_tokens)).backward()
        total += float(loss_sum.detach())
    return total / total_tokens


@torch.no_grad()
def answer_loss(model, features: Sequence[dict], pad_id: int, *, batch_size: int = 8) -> float:
    """Held-out token-mean answer loss (nats per answer token)."""
    from embedkit.llm.loop import chunks

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
def heldout_answer_loss(model, held: Sequence[dict], pad_id: int, recipe, say, when: str) -> float:
    """The held-out answer loss as `llm sft` and `llm joint` report it, before or after training."""
    loss = answer_loss(model, held, pad_id, batch_size=recipe.training.micro_batch_size or 8)
    say(f"held-out answer loss {when}: {loss:.4f}")
    return loss


def _say(mode: str) -> Callable[[str], None]:
    return lambda msg: print(f"embedkit llm {mode}: {msg}", file=sys.stderr, flush=True)


def prepare(recipe, mode: str, say):
    """Seeded start, data read, model loaded with its adapter. Returns a dict of what the modes share."""
    from embedkit.llm.data import read_qa
    from embedkit.llm.model import attach_adapter, embedding_settings, load_causal_lm, pick_device
    from embedkit.train.trainer import seed_everything

    t, m, d = recipe.training, recipe.model, recipe.data
    if t.threads:
        torch.set_num_threads(t.threads)
    seed_everything(t.seed)
    cols = d.columns
    load = dict(question=cols.question, answer=cols.answer, topic=cols.topic, seed=t.seed)
    # DPO draws rejected answers from the same topic, so it reads every row and subsamples the pairs instead.
    train, source = read_qa(d.train, max_examples=None if mode == "dpo" else d.max_examples, sample=d.sample, **load)
    heldout = None
    if d.heldout:
        heldout, _ = read_qa(d.heldout, max_examples=None if mode == "dpo" else d.heldout_examples, sample="random",
                             **load)
    device = pick_device(t.device)
    quant = "nf4" if recipe.adapter.type == "qlora" else None
    model, tokenizer, path, st = load_causal_lm(m.name, dtype=m.dtype, quantization=quant, device=device)
    seed_everything(t.seed)  # adapter initialisation draws from the RNG: same seed, same adapter
    model = attach_adapter(model, recipe.adapter, gradient_checkpointing=m.gradient_checkpointing)
    say(f"{len(train)} training examples from {d.train}; model {m.name} ({recipe.adapter.type}, {device})")
    return {"train": train, "source": source, "heldout": heldout, "model": model, "tokenizer": tokenizer,
            "path": path, "settings": embedding_settings(m, st), "device": device}


def work_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.llm"


def finish(recipe, mode: str, ctx: dict, stats: dict[str, Any], work: Path, say, extra: dict | None = None) -> Path:
    """Merge adapters, save the one folder (both heads), write the card; returns the output folder."""
    import shutil

    from embedkit.llm.model import merged_lm, save_llm_folder
    from embedkit.manifest import command_line

    output = Path(recipe.training.output_dir)
    lm = merged_lm(ctx["model"], adapter_type=recipe.adapter.type, source=recipe.model.name, dtype=recipe.model.dtype,
                   work=work)
    manifest = {"llm": {"mode": mode, "recipe": recipe.model_dump(mode="json"), "data": ctx["source"],
                        "stats": stats, **(extra or {})}}
    card = model_card(recipe, mode, ctx["source"], stats, command_line())
    save_llm_folder(lm, ctx["tokenizer"], output, settings=ctx["settings"], name=output.name,
                    base_model={"name": recipe.model.name, "path": str(ctx["path"])}, manifest=manifest, card=card)
    if (work / "train_log.jsonl").is_file():
        shutil.copyfile(work / "train_log.jsonl", output / "train_log.jsonl")
    say(f"saved {output} (embedding side: load_model; generative side: load_generator)")
    return output


def model_card(recipe, mode: str, source: dict, stats: dict, argv: list[str]) -> str:
    m, a, t = recipe.model, recipe.adapter, recipe.training
    what = {"sft": "supervised fine-tuning (loss on answer tokens only)",
            "dpo": f"DPO on preference pairs (beta {recipe.dpo.beta}, reference = the starting model)",
            "joint": f"joint contrastive + {recipe.joint.sft_weight} x SFT (GritLM-style), embedding attention "
                     f"{m.embedding_attention}"}[mode]
    lines = [f"# {Path(t.output_dir).name}", "",
             f"One model with two heads, trained by embedkit from `{m.name}`: {what}.", "",
             f"- data: {source.get('used')} examples from `{source.get('spec')}`",
             f"- adapter: {a.type}" + (f" (r={a.r}, alpha={a.alpha}), merged" if a.type != "none" else ""),
             f"- {stats.get('steps')} steps, batch {t.batch_size}, lr {t.lr}, max length {m.max_length}, seed {t.seed}",
             f"- peak RSS {stats.get('peak_rss_gb')} GB",
             f"- command: `{' '.join(argv)}`", ""]
    for key, value in stats.items():
        if key.startswith("heldout") and isinstance(value, (int, float)):
            lines.append(f"- {key}: {value:.4f}")
    lines += ["", "## Use", "", "```python", "from embedkit.models import load_model",
              "from embedkit.llm.generate import load_generator",
              f"vectors = load_model('{t.output_dir}').encode(['what causes asthma?'], kind='query')",
              f"print(load_generator('{t.output_dir}').answer('what causes asthma?', ['passage ...']))", "```",
              "", f"Serve both: `embedkit serve --model {t.output_dir}` (/v1/embeddings and /v1/chat/completions).", ""]
    return "\n".join(lines)


def train_sft(recipe, *, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fine-tune on question -> answer chat examples; returns stats (held-out answer loss before/after)."""
    from embedkit.llm.data import encode_sft_many
    from embedkit.llm.loop import run_loop

    say = say or _say("sft")
    ctx = prepare(recipe, "sft", say)
    m, t = recipe.model, recipe.training
    tok, model = ctx["tokenizer"], ctx["model"]
    features, dropped = encode_sft_many(tok, ctx["train"], max_length=m.max_length, system=m.system_prompt)
    held = encode_sft_many(tok, ctx["heldout"], max_length=m.max_length, system=m.system_prompt)[0] \
        if ctx["heldout"] else None
    pad = tok.pad_token_id
    extra: dict[str, Any] = {"dropped_examples": dropped}
    if held and recipe.data.heldout_before:
        extra["heldout_answer_loss_before"] = heldout_answer_loss(model, held, pad, recipe, say, "before")

    def step(rows: list[int]) -> dict[str, float]:
        loss = sft_backward(model, [features[i] for i in rows], pad, micro_batch=t.micro_batch_size)
        return {"loss": loss, "sft": loss}

    output = Path(t.output_dir)
    work = work_dir(output)
    stats = run_loop(recipe, model, len(features), step, work=work, say=say, desc="sft")
    stats.update(extra)
    if held:
        stats["heldout_answer_loss"] = heldout_answer_loss(model, held, pad, recipe, say, "after")
        stats["heldout_examples"] = len(held)
    finish(recipe, "sft", ctx, stats, work, say)
    return {"output_dir": str(output), **stats}
