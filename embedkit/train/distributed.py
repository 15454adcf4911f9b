"""Multi-process training with DeepSpeed ZeRO (2 or 3), optionally with GradCache.

Launch (CPU: gloo, 2 processes; on GPUs the same with nccl):

    embedkit train RECIPE --deepspeed zero3 --nproc 2
    # which runs: DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node=2 -m embedkit.train.distributed RECIPE ...

`training.batch_size` is the per-process batch; the contrastive loss gathers embeddings across processes
(embedkit.train.loss.gather_with_grad), so every query sees batch_size x processes candidates. Each global batch of
the single-process order is split into equal per-process slices. Rank 0 gathers the full weights at the end and
writes the same output folder as a single-process run.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from embedkit.errors import ConfigError
from embedkit.train.config import Recipe


def launch(argv: list[str], nproc: int) -> int:
    """Re-run `embedkit train ARGV` under torchrun with `nproc` processes; returns the exit code."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "-m", "embedkit.train.distributed", *argv]
    return subprocess.call(cmd, env=env)


def deepspeed_config(recipe: Recipe, world: int) -> dict:
    t, ds = recipe.training, recipe.deepspeed
    zero: dict = {"stage": 3 if ds.stage == "zero3" else 2}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": t.batch_size * world,
        # torch_adam: DeepSpeed's own CPU Adam would be compiled first; torch's is exact and ready.
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay, "torch_adam": True}},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.max_grad_norm:
        config["gradient_clipping"] = t.max_grad_norm
    if recipe.model.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def train_deepspeed(recipe: Recipe, *, resume: bool = False, say: Callable[[str], None] | None = None):
    """The DeepSpeed variant of trainer.train (no checkpoints/resume yet); returns a TrainResult on every rank."""
    import deepspeed

    from embedkit.train.gradcache import RngState, chunks, expand_documents
    from embedkit.train.loss import ContrastiveLoss, distributed_world
    from embedkit.train.trainer import (TrainResult, batch_inputs, build_encoder, epoch_batches, linear_schedule,
                                        load_examples, param_groups, peak_rss_gb, prepare_data, save_output,
                                        seed_everything, work_dir)

    if resume:
        raise ConfigError("resume is not supported with deepspeed yet", field="--resume")
    if recipe.loss.learn_temperature:
        raise ConfigError("learn_temperature is not supported with deepspeed yet", field="loss.learn_temperature")
    if "RANK" not in os.environ:  # not under torchrun: a single-process run
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = distributed_world()
    say = say or (lambda msg: print(f"embedkit train [rank {rank}]: {msg}", file=sys.stderr, flush=True))
    t, lc = recipe.training, recipe.loss
    if t.threads:
        torch.set_num_threads(t.threads)
    seed_everything(t.seed)
    examples, source = load_examples(recipe)
    encoder = build_encoder(recipe)
    data = prepare_data(encoder, examples, source, recipe)
    loss_fn = ContrastiveLoss(
        temperature=lc.temperature, symmetric=lc.symmetric, mask_false_negatives=lc.mask_false_negatives,
        margin=lc.margin, matryoshka_dims=lc.matryoshka_dims,
        distillation=None if lc.distillation == "none" else lc.distillation,
        distillation_weight=lc.distillation_weight, distillation_temperature=lc.distillation_temperature,
        contrastive_weight=lc.contrastive_weight)

    # The global batch is batch_size x world: the single-process batch order with a larger batch.
    global_recipe = recipe.model_copy(deep=True)
    global_recipe.training.batch_size = t.batch_size * world
    batches_per_epoch = len(epoch_batches(data, global_recipe, 0))
    total = batches_per_epoch * t.epochs
    if t.max_steps:
        total = min(total, t.max_steps)
    warmup = math.ceil(total * t.warmup_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=encoder, model_parameters=param_groups(encoder, t.weight_decay), config=deepspeed_config(recipe, world),
        lr_scheduler=lambda opt: linear_schedule(opt, warmup, total))
    k = lc.hard_negatives
    step, epoch, samples, seconds, last = 0, 0, 0, 0.0, None
    while step < total:
        for rows_global in epoch_batches(data, global_recipe, epoch):
            if step >= total:
                break
            per = len(rows_global) // world
            if per == 0:
                continue  # a last batch smaller than the number of processes
            rows = rows_global[rank * per:(rank + 1) * per]
            started = time.perf_counter()
            q_ids, d_ids, kwargs = batch_inputs(data, rows, k)
            if world > 1:
                # Every rank must pass the same arguments to the gathering loss: always send the validity mask.
                kwargs.setdefault("document_valid", torch.ones(len(rows) * (1 + k), dtype=torch.bool))
            if t.grad_cache:
                last = _cached_step(engine, encoder, loss_fn, q_ids, d_ids, t.grad_cache, world, kwargs,
                                    RngState, chunks)
            else:
                engine.set_gradient_accumulation_boundary(True)
                q = engine(encoder.collate(q_ids))
                d = expand_documents(engine(encoder.collate(d_ids)), kwargs.get("document_valid"))
                out = loss_fn(q, d, **kwargs)
                engine.backward(out.loss * loss_fn.grad_scale)
                last = float(out.loss.detach())
            engine.step()
            step += 1
            samples += len(rows_global)
            seconds += time.perf_counter() - started
            if rank == 0 and (step % t.log_every == 0 or step == total):
                say(f"step {step}/{total} loss {last:.4f} lr {scheduler.get_last_lr()[0]:.2e}")
        epoch += 1

    # Full weights on rank 0: gather the partitions into a fresh, unsharded copy of the model.
    full_state = _gathered_state(engine, encoder, deepspeed, rank)
    stats = {"steps": step, "samples": samples, "train_seconds": round(seconds, 3),
             "samples_per_second": round(samples / max(seconds, 1e-9), 4), "peak_rss_gb": round(peak_rss_gb(), 3),
             "final_loss": last, "best_step": None, "history": [], "processes": world,
             "deepspeed": recipe.deepspeed.model_dump()}
    output = Path(t.output_dir)
    if rank == 0:
        fresh = build_encoder(recipe)
        missing, unexpected = fresh.load_state_dict(full_state, strict=False)
        buffers = {name for name, _ in fresh.named_buffers()}  # never trained: the fresh copy has them
        if unexpected or [m for m in missing if m not in buffers and "lm_head" not in m]:
            raise RuntimeError(f"gathered weights do not match the model: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        save_output(fresh, recipe, output, data.source, stats, None, work_dir(output))
        say(f"saved {output}")
    torch.distributed.barrier()
    return TrainResult(output, step, samples, stats["train_seconds"], stats["samples_per_second"],
                       stats["peak_rss_gb"], last, None, None, output / "train_log.jsonl")


def _cached_step(engine, encoder, loss_fn, q_ids, d_ids, size, world, kwargs, RngState, chunks) -> float:
    """GradCache through the engine: no-grad embeddings, loss + embedding gradients, then per sub-batch
    forward/backward with the gradient-accumulation boundary only on the last one (ZeRO reduces once)."""
    from embedkit.train.gradcache import expand_documents

    states: list = []
    with torch.no_grad():
        q_parts, d_parts = [], []
        for parts, ids in ((q_parts, q_ids), (d_parts, d_ids)):
            for part in chunks(ids, size):
                states.append(RngState())
                parts.append(engine(encoder.collate(part)))
    q = torch.cat(q_parts).detach().requires_grad_(True)
    d = torch.cat(d_parts).detach().requires_grad_(True)
    out = loss_fn(q, expand_documents(d, kwargs.get("document_valid")), **kwargs)
    (out.loss * loss_fn.grad_scale).backward()
    jobs = list(zip(chunks(q_ids, size), q.grad.split(size))) + list(zip(chunks(d_ids, size), d.grad.split(size)))
    for i, ((part, grad), state) in enumerate(zip(jobs, states)):
        engine.set_gradient_accumulation_boundary(i == len(jobs) - 1)
        with state.replay():
            emb = engine(encoder.collate(part))
        engine.backward((emb * grad).sum(), scale_wrt_gas=False)
    return float(out.loss.detach())


def _gathered_state(engine, encoder, deepspeed, rank: int) -> dict[str, torch.Tensor]:
    state = {}
    params = list(encoder.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        if rank == 0:
            state = {name: p.detach().clone() for name, p in params}
    return state


def main(argv: list[str] | None = None) -> None:
    """Entry point under torchrun: `python -m embedkit.train.distributed RECIPE [--set k=v ...] [--output DIR]`."""
    import argparse

    from embedkit.errors import EmbedkitError
    from embedkit.train.config import load_recipe

    parser = argparse.ArgumentParser(prog="embedkit.train.distributed")
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--deepspeed")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.deepspeed:
        overrides.append(f"deepspeed.stage={args.deepspeed}")
    if args.output:
        overrides.append(f"training.output_dir={args.output}")
    try:
        recipe = load_recipe(args.recipe, overrides)
        if recipe.deepspeed.stage == "none":
            raise ConfigError("a distributed run needs deepspeed.stage zero2 or zero3", field="deepspeed.stage")
        train_deepspeed(recipe)
    except EmbedkitError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
