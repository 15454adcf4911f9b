"""Pooling token states into one vector, correct under left and right padding."""

from __future__ import annotations

import torch

POOLING_MODES = ("cls", "mean", "max", "lasttoken", "mean_sqrt_len_tokens")

# sentence-transformers' explicit (legacy) pooling keys: vLLM reads these correctly, the compact
# `pooling_mode` form it mis-reads (vLLM issue 45995), so saved models carry exactly one `true` among them.
ST_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, whichever side the padding is on."""
    seq_len = attention_mask.shape[1]
    return seq_len - 1 - attention_mask.flip(-1).int().argmax(-1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if mode == "mean_sqrt_len_tokens":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9).sqrt()
    if mode == "cls":
        # CLS is the first real token; BERT-style tokenizers pad on the right, so that is position 0.
        first = attention_mask.int().argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    if mode == "lasttoken":
        idx = last_token_index(attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
    raise ValueError(f"unknown pooling mode {mode!r}; choose one of {', '.join(POOLING_MODES)}")


def st_pooling_config(mode: str, dim: int) -> dict:
    """The explicit sentence-transformers pooling config for `mode` (every key present, one true)."""
    config = {"word_embedding_dimension": dim}
    config.update({key: (name == mode) for name, key in ST_POOLING_KEYS.items()})
    config["include_prompt"] = True
    return config


def mode_from_st_config(config: dict) -> str:
    """Read either the explicit or the compact sentence-transformers pooling config."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        if isinstance(mode, (list, tuple)):
            if len(mode) != 1:
                raise ValueError(f"combined pooling modes {mode} are not supported")
            mode = mode[0]
        return mode
    active = [name for name, key in ST_POOLING_KEYS.items() if config.get(key)]
    if len(active) > 1:
        raise ValueError(f"combined pooling modes {active} are not supported")
    return active[0] if active else "mean"
