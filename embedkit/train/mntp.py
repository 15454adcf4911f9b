"""Masked next-token prediction (MNTP): the LLM2Vec warm-up that turns a decoder towards an encoder.

LLM2Vec (BehnamGhader et al., 2024) makes a decoder's attention bidirectional, then trains it briefly to predict
masked tokens: the token at position i is masked in the input and predicted from the hidden state at position
i - 1, through the model's own LM head, so the objective stays the next-token one the model was pre-trained for
while the hidden states learn to use the tokens on their right. The contrastive stage then starts from weights
that already "read" both ways.

Here the warm-up is the first phase of the one training engine's `fit` (`recipe.mntp`: `embedkit train` runs it
before the contrastive phase, on the same wrapped model and adapter, so under DDP, DeepSpeed ZeRO-2/3 and FSDP
alike; engine.py's `Phase` says what the phases share and what each starts afresh): the data are the training
documents (positives, then hard negatives), masked BERT-style (of the chosen positions 80% become the mask token,
10% a random token, 10% stay), with a seeded mask per step so a resumed run masks the same tokens. The mask is drawn
for the step's whole (global) batch on every process, and each process predicts its rows' share of the batch's mean
loss, so several processes train what one process does with the same global batch. LLM2Vec trains a separate
adapter for MNTP and merges it before the contrastive one; one adapter trained in two stages keeps the saved model
one adapter (the ablation in docs/train.md measures the warm-up as built here).

The LM head is the input embedding when the model ties them (SmolLM2, Qwen3-0.6B), else `lm_head.weight` read
from the model folder's safetensors (whole on every process: the encoder has no LM head to partition); it stays
frozen. A tied head under ZeRO-3 or FSDP is a partitioned parameter: it is gathered whole for each step's logits
(every process takes part), outside the model's forward. Logits are computed for the masked positions only.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from embedkit.errors import ConfigError, ModelError
from embedkit.models.tokenization import tokenize
from embedkit.train.engine import MNTP_LOG_FILE, Engine, Phase, StepBase

log = logging.getLogger(__name__)

# LLM2Vec's choice for Llama-style tokenizers, which have no mask token.
_FALLBACK_MASK_TEXT = "_"


def mask_token_id(tokenizer) -> int:
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    ids = tokenizer(_FALLBACK_MASK_TEXT, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return int(ids[0])
    if tokenizer.unk_token_id is not None:
        return int(tokenizer.unk_token_id)
    return int(tokenizer.eos_token_id)


def lm_head_weight(encoder) -> torch.Tensor:
    """The [vocab, hidden] output projection, frozen: the tied input embedding (as it is now: under ZeRO-3 / FSDP a
    shard, see `MNTPStep.run`), else lm_head.weight from disk."""
    config = encoder.base_config
    embeddings = encoder.backbone.get_input_embeddings().weight
    if getattr(config, "tie_word_embeddings", False):
        return embeddings.detach()
    from safetensors import safe_open

    source = Path(encoder.source_path or "")
    for file in sorted(source.rglob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in ("lm_head.weight", "model.lm_head.weight"):
                if key in handle.keys():
                    return handle.get_tensor(key).to(embeddings.device, embeddings.dtype)
    raise ModelError("mntp needs the model's LM head: its embeddings are not tied and no lm_head.weight was found",
                     path=str(source))


def mask_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, ratio: float, mask_id: int,
               vocab_size: int, special_ids: set[int], generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input ids, bool [B, L] of the positions to predict). A position can be predicted only when the one
    before it is a real token (its hidden state predicts it); special tokens are never masked."""
    real = attention_mask.bool()
    candidates = real.clone()
    candidates[:, 0] = False
    candidates[:, 1:] &= real[:, :-1]
    for token in special_ids:
        candidates &= input_ids != token
    draw = torch.rand(input_ids.shape, generator=generator)
    chosen = candidates & (draw < ratio)
    # Every row with candidates predicts at least one token (short texts would otherwise often get none).
    for row in torch.nonzero(candidates.any(1) & ~chosen.any(1)).flatten().tolist():
        options = torch.nonzero(candidates[row]).flatten()
        chosen[row, options[torch.randint(len(options), (1,), generator=generator)]] = True
    how = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (how < 0.8)] = mask_id
    randomised = chosen & (how >= 0.8) & (how < 0.9)
    masked[randomised] = torch.randint(vocab_size, (int(randomised.sum()),), generator=generator)
    return masked, chosen


class MNTPStep(StepBase):
    name = "mntp"

    def __init__(self, recipe, encoder, documents: list[str]) -> None:
        self.recipe, self.encoder = recipe, encoder
        tokenizer = encoder.tokenizer
        m = recipe.mntp
        # No prompt: MNTP learns the documents' tokens themselves (the prompts are for embedding).
        self.ids = [ids for ids in tokenize(tokenizer, documents, "document", max_length=m.max_length)
                    if len(ids) >= 2]
        if not self.ids:
            raise ConfigError("mntp: no training document has two tokens to learn from", field="mntp.steps")
        self.mask_id = mask_token_id(tokenizer)
        self.vocab = int(encoder.base_config.vocab_size)
        self.special = {int(t) for t in tokenizer.all_special_ids}
        tied = getattr(encoder.base_config, "tie_word_embeddings", False)
        self.head = None if tied else lm_head_weight(encoder)  # tied: looked up each step (run)

    def batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        order = list(range(len(self.ids)))
        random.Random(self.recipe.training.seed * 1_000_003 + epoch).shuffle(order)
        return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)] or [order]

    def run(self, rows: list[int], engine: Engine, weight: float) -> dict[str, float]:
        world = engine.world
        batch = engine.batch_rows if world > 1 else rows  # every process masks the whole batch, as one process does
        features = self.encoder.collate([self.ids[i] for i in batch])
        generator = torch.Generator().manual_seed(self.recipe.training.seed * 7919 + engine.position.get("step", 0))
        masked, predict = mask_batch(features["input_ids"], features["attention_mask"], ratio=self.recipe.mntp.mask_ratio,
                                     mask_id=self.mask_id, vocab_size=self.vocab, special_ids=self.special,
                                     generator=generator)
        input_ids, attention = features["input_ids"], features["attention_mask"]
        n_batch = int(predict.sum())
        if world > 1:  # this process's rows (engine._local_rows' slice), padded as the whole batch is
            part = slice(engine.rank * len(rows), (engine.rank + 1) * len(rows))
            input_ids, attention, masked, predict = input_ids[part], attention[part], masked[part], predict[part]
        targets = input_ids[predict]
        before = torch.zeros_like(predict)
        before[:, :-1] = predict[:, 1:]  # the hidden state one position earlier predicts the masked token
        # A tied head is the input embedding as it is now: trained without an adapter it changes every step, and
        # a sharding backend holds a shard of it (replaced when it wraps the model), so it is asked for it whole.
        head = self.head if self.head is not None else engine.backend.whole_parameter(
            self.encoder.backbone.get_input_embeddings().weight)
        with engine.sync(last=True):
            with engine.autocast():
                hidden = engine.model({"input_ids": masked, "attention_mask": attention}, hidden_states=True)
                states = hidden[before.to(hidden.device)]
                logits = states.float() @ head.to(states.device).float().T
            if world == 1:
                loss = F.cross_entropy(logits, targets.to(logits.device))
            else:  # this process's share of the batch's mean: the engine averages gradients over the processes
                summed = F.cross_entropy(logits, targets.to(logits.device), reduction="sum")
                loss = summed * world / n_batch
            engine.backward(loss * weight)
        hits = (logits.argmax(-1).cpu() == targets).float()
        if world == 1:
            return {"loss": float(loss.detach()), "mntp_accuracy": float(hits.mean()),
                    "masked_tokens": int(targets.numel())}
        totals = torch.tensor([float(summed.detach()), float(hits.sum())], dtype=torch.float64, device=engine.device)
        torch.distributed.all_reduce(totals)  # the whole batch's numbers, as one process logs them
        return {"loss": float(totals[0]) / n_batch, "mntp_accuracy": float(totals[1]) / n_batch,
                "masked_tokens": n_batch}


def mntp_phase(recipe, encoder, documents: list[str]) -> Phase:
    """recipe.mntp.steps of MNTP on `encoder`, as the phase before the contrastive one (its log: mntp_log.jsonl)."""
    m = recipe.mntp
    if not encoder.is_causal:
        raise ConfigError("mntp is a warm-up for causal LLM encoders; this model is not one", field="mntp.steps")
    step = MNTPStep(recipe, encoder, documents)
    log.info("mntp warm-up: %d steps of %d documents (max %d tokens), mask ratio %.2f", m.steps, m.batch_size,
             m.max_length, m.mask_ratio)
    # Its own batch size (per process), lr and length, one micro-batch a step, no dev evaluation.
    return Phase("mntp", step, len(step.ids), log_file=MNTP_LOG_FILE, batch_size=m.batch_size, lr=m.lr,
                 max_steps=m.steps, epochs=10_000, gradient_accumulation=1, evaluate=False)
