"""Pooling token states into one vector, correct under left and right padding; the registry of pooling modes.

A pooling is one function `(hidden [B, L, H], attention_mask [B, L]) -> [B, H]` registered with `register_pooling`.
Everything that names poolings reads this registry: the recipes' `model.pooling` (embedkit/train/config.py and, for
the modes marked `for_causal_lm`, embedkit/llm/config.py), `Encoder` (which pools with it, so training, evaluation,
the ONNX graph and the server all pool the same way), the sentence-transformers config a saved folder carries, the
tokenizer set-up (`appends_eos`), and the vLLM / TEI launch commands of `embedkit export --format hf`.
docs/extending.md adds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

PoolFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Pooling:
    name: str
    pool: PoolFn
    st_key: str | None  # its key in sentence-transformers' Pooling config; None: recorded in embedkit's own section
    vllm: str | None  # vLLM's pooling_type for it; None: vLLM cannot serve it
    tei: str | None  # TEI's --pooling value; None: TEI cannot serve it
    appends_eos: bool  # every text must end with EOS (its state is the one pooled): the tokenizer appends it
    for_causal_lm: bool  # offered to `embedkit llm` recipes (decoders)


POOLINGS: dict[str, Pooling] = {}


def register_pooling(name: str, *, st_key: str | None = None, vllm: str | None = None, tei: str | None = None,
                     appends_eos: bool = False, for_causal_lm: bool = False) -> Callable[[PoolFn], PoolFn]:
    """Decorator: register `fn(hidden, attention_mask) -> pooled` as pooling `name` (see `Pooling` for the rest)."""

    def register(fn: PoolFn) -> PoolFn:
        if name in POOLINGS:
            raise ValueError(f"pooling {name!r} is already registered")
        POOLINGS[name] = Pooling(name, fn, st_key, vllm, tei, appends_eos, for_causal_lm)
        return fn

    return register


def pooling_names(*, for_causal_lm: bool = False) -> list[str]:
    """The registered pooling modes (only those offered to causal LM recipes with `for_causal_lm`)."""
    return [name for name, p in POOLINGS.items() if p.for_causal_lm or not for_causal_lm]


def get_pooling(name: str) -> Pooling:
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling mode {name!r}; choose one of {', '.join(POOLINGS)}")
    return POOLINGS[name]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    return get_pooling(mode).pool(hidden, attention_mask)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, whichever side the padding is on."""
    seq_len = attention_mask.shape[1]
    return seq_len - 1 - attention_mask.flip(-1).int().argmax(-1)


def _token_mask(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return attention_mask.unsqueeze(-1).to(hidden.dtype)


def _row_states(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden[i, index[i]] for every row i."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


# ------------------------------------------------------------------------------------------------ the built-in modes
@register_pooling("cls", st_key="pooling_mode_cls_token", vllm="CLS", tei="cls")
def cls_pooling(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # CLS is the first real token; BERT-style tokenizers pad on the right, so that is position 0.
    return _row_states(hidden, attention_mask.int().argmax(-1))


@register_pooling("mean", st_key="pooling_mode_mean_tokens", vllm="MEAN", tei="mean", for_causal_lm=True)
def mean_pooling(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = _token_mask(hidden, attention_mask)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@register_pooling("max", st_key="pooling_mode_max_tokens")
def max_pooling(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = _token_mask(hidden, attention_mask)
    return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values


@register_pooling("lasttoken", st_key="pooling_mode_lasttoken", vllm="LAST", tei="last-token", appends_eos=True,
                  for_causal_lm=True)
def last_token_pooling(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return _row_states(hidden, last_token_index(attention_mask))


@register_pooling("mean_sqrt_len_tokens", st_key="pooling_mode_mean_sqrt_len_tokens")
def mean_sqrt_len_pooling(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = _token_mask(hidden, attention_mask)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9).sqrt()


# ------------------------------------------------------------------------------------------------ sentence-transformers
# sentence-transformers' explicit (legacy) pooling keys, by its mode names: vLLM reads these correctly, the compact
# `pooling_mode` form it mis-reads (vLLM issue 45995), so saved models carry exactly one `true` among them (none for
# a pooling sentence-transformers does not know: `Encoder.save` records it in embedkit's own section instead).
ST_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


def st_pooling_config(mode: str, dim: int) -> dict:
    """The explicit sentence-transformers pooling config for `mode` (every key present, at most one true)."""
    st_key = get_pooling(mode).st_key
    config = {"word_embedding_dimension": dim}
    config.update({key: key == st_key for key in ST_POOLING_KEYS.values()})
    config["include_prompt"] = True
    return config


def mode_from_st_config(config: dict) -> str:
    """Read either the explicit or the compact sentence-transformers pooling config: the registered pooling with
    that sentence-transformers key, else sentence-transformers' own name for it (which `Encoder` then refuses)."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        if isinstance(mode, (list, tuple)):
            if len(mode) != 1:
                raise ValueError(f"combined pooling modes {mode} are not supported")
            mode = mode[0]
    else:
        active = [name for name, key in ST_POOLING_KEYS.items() if config.get(key)]
        if len(active) > 1:
            raise ValueError(f"combined pooling modes {active} are not supported")
        mode = active[0] if active else "mean"
    st_key = ST_POOLING_KEYS.get(mode)
    return next((p.name for p in POOLINGS.values() if st_key is not None and p.st_key == st_key), mode)
