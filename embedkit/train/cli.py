"""`embedkit train RECIPE [--set a.b=value ...] [--resume] [--nproc N] [--nnodes N --node-rank R --rdzv-endpoint
HOST:PORT] [--deepspeed zero3] [--output DIR] [--check | --estimate-memory]`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from embedkit.device import resolve_device
from embedkit.launch import (NNODES_OPTION, NODE_RANK_OPTION, RDZV_BACKEND_OPTION, RDZV_ENDPOINT_OPTION,
                             RDZV_ID_OPTION, Nodes, command_argv, launched, relaunch)

from embedkit.train.config import load_recipe, warn_if_dev_is_test
from embedkit.train.memory import ESTIMATE_NOTE, estimate_recipe_memory, format_estimate


def train_command(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="A recipe YAML file (see recipes/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value: --set training.lr=1e-5 (YAML value)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint of this output."),
    deepspeed: Optional[str] = typer.Option(None, "--deepspeed",
                                            help="DeepSpeed ZeRO stage: zero2 or zero3 (overrides deepspeed.stage)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (overrides training.output_dir)."),
    nproc: int = typer.Option(1, "--nproc", min=1,
                              help="Processes to train with (torchrun; one GPU each, or gloo on the CPU). Data "
                                   "parallel (DDP) unless the recipe names deepspeed or fsdp; training.batch_size "
                                   "is per process and the contrastive loss sees the whole gathered batch."),
    nnodes: int = NNODES_OPTION,
    node_rank: int = NODE_RANK_OPTION,
    rdzv_endpoint: Optional[str] = RDZV_ENDPOINT_OPTION,
    rdzv_backend: str = RDZV_BACKEND_OPTION,
    rdzv_id: str = RDZV_ID_OPTION,
    check: bool = typer.Option(False, "--check", help="Validate the recipe and its data, then exit (loads no model)."),
    estimate_memory: bool = typer.Option(
        False, "--estimate-memory",
        help="Print the GPU memory the recipe should need per GPU (with --nproc N: ZeRO-3 partitioned N ways, "
             "N x --nnodes across nodes), "
             "estimated from the model's shape, then exit: loads no model, needs no GPU, hub or data files. QLoRA "
             "and LoRA recipes (LoRA without ZeRO-3); an estimate, not a measurement (embedkit/train/memory.py says "
             "what it leaves out)."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Fine-tune an embedding model with a contrastive loss, as a recipe describes.

    The recipe is validated (unknown keys, types, data files, model name) before any model loads.

    One engine runs it: one process or several (--nproc; DDP, DeepSpeed ZeRO-2/3 or FSDP), on model.device
    (auto: a GPU when there is one), checkpoints every training.checkpoint_every steps and --resume, dev evaluation
    every training.eval_every steps on data.dev with the best step kept, a JSONL log and TensorBoard events.

    The output folder is a sentence-transformers model with a manifest, a model card, probe vectors and the logs.

    Causal LLM encoders (SmolLM2, Qwen3, Mistral): model.attention bidirectional embeds with full attention
    (LLM2Vec / GritLM) and is kept by the saved model; mntp.steps > 0 first runs LLM2Vec's masked next-token
    warm-up on the training documents with the same adapter (its log: mntp_log.jsonl in the output).

    Rerankers: task: rerank trains a cross-encoder (a BERT-style start) or a yes/no LLM reranker (a causal LM
    start, Qwen3-Reranker's formulation, LoRA / QLoRA allowed, rerank.instruction) on (query, positive, negatives)
    rows from embedkit mine, with loss.type listwise (default) or bce (plus loss.distillation from the rows' teacher
    scores); its folder loads in sentence-transformers' CrossEncoder, and embedkit eval --rerank uses it as the
    second stage.

    Examples: embedkit train recipes/minilm-scifact.yaml --set training.lr=1e-5 -o runs/lr1e-5 ;
    embedkit train recipes/minilm-scifact.yaml --nproc 2 ; embedkit train RECIPE --resume ;
    embedkit train RECIPE --nproc 4 --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29500 (and --node-rank 1 on the
    other node; docs/train.md "Across nodes": torchrun, the DeepSpeed launcher, SLURM) ;
    embedkit train recipes/minilm-rerank-scifact.yaml ;
    embedkit train recipes/qwen3-0.6b-rerank.yaml --estimate-memory ;
    embedkit train recipes/mistral-7b-encoder-zero3.yaml --estimate-memory --nproc 4
    """

    overrides = list(set_)
    if deepspeed is not None:
        overrides.append(f"deepspeed.stage={deepspeed}")
    if output is not None:
        overrides.append(f"training.output_dir={output}")
    if estimate_memory:  # before validation: the data files and the GPU packages need not be on this machine
        estimate = estimate_recipe_memory(load_recipe(recipe, overrides, validate=False), processes=nproc * nnodes,
                                          source=recipe)
        if json_output:
            typer.echo(json.dumps(estimate, indent=2))
        else:
            typer.echo(format_estimate(estimate))
            typer.echo(ESTIMATE_NOTE)
        return
    nodes = Nodes.from_context(ctx)  # a one-line error before anything loads
    parsed = load_recipe(recipe, overrides)
    if not launched():  # once, not once per process
        warn_if_dev_is_test(parsed, source=recipe)
    if check:
        typer.echo(f"{recipe}: ok (model {parsed.model.name} on {parsed.model.device}, data {parsed.data.train}, "
                   f"output {parsed.training.output_dir})")
        return
    if (nproc > 1 or nodes.many) and not launched():
        device = resolve_device(parsed.model.device, field="model.device")  # a one-line error before launching
        code = relaunch(command_argv(ctx), nproc, cpu=device.type == "cpu", nodes=nodes)
        if code:
            raise typer.Exit(code)
        if nodes.many:
            typer.echo(f"node {node_rank}: trained with {nproc} process{'es' if nproc > 1 else ''} on each of "
                       f"{nnodes} nodes -> {parsed.training.output_dir} (written by global rank 0)")
        else:
            typer.echo(f"trained with {nproc} processes -> {parsed.training.output_dir}")
        return
    if parsed.task == "rerank":
        from embedkit.train.rerank import train_reranker as train
    else:
        from embedkit.train.contrastive import train

    result = train(parsed, resume=resume)
    from embedkit.models.distributed import is_main_process

    if not is_main_process():
        return
    summary = {"output_dir": str(result.output_dir), "steps": result.steps, "samples": result.samples,
               "samples_per_second": result.samples_per_second, "peak_rss_gb": result.peak_rss_gb,
               "final_loss": result.final_loss, "best_step": result.best_step,
               "dev": result.dev["metrics"] if result.dev else None}
    if json_output:
        typer.echo(json.dumps(summary, indent=2))
    else:
        line = f"trained {result.steps} steps -> {result.output_dir} ({result.samples_per_second:.2f} samples/s"
        if result.dev:
            line += f"; dev {result.dev['main_metric']} {result.dev['metrics'][result.dev['main_metric']]:.4f}"
        typer.echo(line + ")")
