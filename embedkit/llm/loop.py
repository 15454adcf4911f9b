"""The optimisation loop shared by `llm sft`, `llm dpo` and `llm joint`: seeded batches, AdamW, warmup + linear
decay, gradient clipping, a JSONL log. Each mode supplies `step(rows) -> dict` that runs forward and backward for
one batch of example indices (micro-batched inside) and returns floats to log.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from embedkit.train.trainer import linear_schedule, peak_rss_gb

LOG_FILE = "train_log.jsonl"


def chunks(items: list, size: int | None) -> list[list]:
    size = size or len(items) or 1
    return [items[i:i + size] for i in range(0, len(items), size)]


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def run_loop(recipe, model, n_items: int, step: Callable[[list[int]], dict[str, float]], *, work: Path,
             say: Callable[[str], None], desc: str) -> dict[str, Any]:
    t = recipe.training
    if n_items == 0:
        from embedkit.errors import DataError

        raise DataError("no training examples left after encoding (prompts longer than model.max_length?)")
    per_epoch = math.ceil(n_items / t.batch_size)
    total = min(t.max_steps or per_epoch * t.epochs, per_epoch * t.epochs)
    params = trainable(model)
    if not params:
        raise RuntimeError("no trainable parameters")
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params)
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)
    scheduler = linear_schedule(optimizer, int(t.warmup_ratio * total), total)
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / LOG_FILE, "w", encoding="utf-8")
    from tqdm.auto import tqdm

    progress = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not t.progress, dynamic_ncols=True)
    model.train()
    done, samples, seconds, history = 0, 0, 0.0, []
    try:
        epoch = 0
        while done < total:
            for rows in epoch_order(n_items, t.batch_size, t.seed, epoch):
                if done >= total:
                    break
                started = time.perf_counter()
                record = step(rows)
                grad_norm = None
                if t.max_grad_norm:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                elapsed = time.perf_counter() - started
                done += 1
                samples += len(rows)
                seconds += elapsed
                record = {"event": "train", "step": done, "epoch": epoch, **record, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": grad_norm, "seconds": round(elapsed, 3)}
                history.append(record)
                if done % t.log_every == 0 or done == total:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
            epoch += 1
    finally:
        progress.close()
        log.close()
    model.eval()
    stats = {"steps": done, "samples": samples, "train_seconds": round(seconds, 2),
             "samples_per_second": round(samples / max(seconds, 1e-9), 4), "peak_rss_gb": round(peak_rss_gb(), 3),
             "final_loss": history[-1]["loss"] if history else None,
             "first_loss": history[0]["loss"] if history else None}
    say(f"{desc}: {done} steps, {stats['samples_per_second']} examples/s, peak RSS {stats['peak_rss_gb']} GB")
    return stats
