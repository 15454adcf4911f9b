"""`embedkit llm sft|dpo|joint RECIPE.yaml [--set a.b=v]`, `embedkit llm pairs`, `embedkit llm chat`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from embedkit.device import resolve_device
from embedkit.launch import (NNODES_OPTION, NODE_RANK_OPTION, RDZV_BACKEND_OPTION, RDZV_ENDPOINT_OPTION, RDZV_ID_OPTION,
                             Nodes, command_argv, launched, relaunch)

from embedkit.llm.config import load_llm_recipe
from embedkit.llm.data import preference_pairs, read_qa, write_pairs

llm_app = typer.Typer(
    help="The generative head of an LLM embedder: SFT, DPO, and joint (GritLM-style) training of one model that "
         "both embeds and answers; chat with it. The output folder serves /v1/embeddings and /v1/chat/completions "
         "from one `embedkit serve`.",
    no_args_is_help=True,
)

_SET_HELP = "Override a recipe value: --set training.lr=1e-4 (YAML value). Repeatable."


_RESUME_HELP = "Continue from the latest checkpoint of this output (training.checkpoint_every)."
_NPROC_HELP = ("Processes to train with (torchrun; one GPU each, or gloo on the CPU): DDP unless the recipe names "
               "deepspeed or fsdp. training.batch_size is per process.")


def _run(ctx: typer.Context, mode: str, recipe: Path, set_: list[str], output: Optional[Path], check: bool,
         json_output: bool, resume: bool = False, nproc: int = 1) -> None:
    overrides = list(set_) + ([f"training.output_dir={output}"] if output is not None else [])
    nodes = Nodes.from_context(ctx)  # a one-line error before anything loads
    parsed = load_llm_recipe(recipe, overrides, mode=mode)
    if check:
        typer.echo(f"{recipe}: ok ({mode}; model {parsed.model.name} on {parsed.model.device}, data "
                   f"{parsed.data.train}, output {parsed.training.output_dir})")
        return
    if (nproc > 1 or nodes.many) and not launched():
        device = resolve_device(parsed.model.device, field="model.device")
        code = relaunch(command_argv(ctx), nproc, cpu=device.type == "cpu", nodes=nodes)
        if code:
            raise typer.Exit(code)
        where = f" on each of {nodes.nnodes} nodes" if nodes.many else ""
        typer.echo(f"{mode}: trained with {nproc} process{'es' if nproc > 1 else ''}{where} -> "
                   f"{parsed.training.output_dir}")
        return
    if mode == "sft":
        from embedkit.llm.sft import train_sft as run
    elif mode == "dpo":
        from embedkit.llm.dpo import train_dpo as run
    else:
        from embedkit.llm.joint import train_joint as run
    result = run(parsed, resume=resume)
    from embedkit.models.distributed import is_main_process

    if not is_main_process():
        return
    if json_output:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    parts = [f"{mode}: {result['steps']} steps -> {result['output_dir']}"]
    for key in ("heldout_answer_loss_before", "heldout_answer_loss", "heldout_preference_accuracy_before",
                "heldout_preference_accuracy"):
        if key in result:
            parts.append(f"{key} {result[key]:.4f}")
    if result.get("dev"):
        parts.append(f"dev {result['dev']['metric']} {result['dev']['score']:.4f}")
    typer.echo("; ".join(parts))


@llm_app.command("sft")
def sft_command(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="An LLM recipe YAML (e.g. recipes/llm/smollm2-sft.yaml)."),
    set_: List[str] = typer.Option([], "--set", help=_SET_HELP),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (overrides training.output_dir)."),
    check: bool = typer.Option(False, "--check", help="Validate the recipe and its data, then exit (no model)."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    resume: bool = typer.Option(False, "--resume", help=_RESUME_HELP),
    nproc: int = typer.Option(1, "--nproc", min=1, help=_NPROC_HELP),
    nnodes: int = NNODES_OPTION,
    node_rank: int = NODE_RANK_OPTION,
    rdzv_endpoint: str | None = RDZV_ENDPOINT_OPTION,
    rdzv_backend: str = RDZV_BACKEND_OPTION,
    rdzv_id: str = RDZV_ID_OPTION,
) -> None:
    """Supervised fine-tuning: question -> answer in the model's chat template, loss on the answer tokens only.

    With data.heldout set, prints the held-out answer loss (nats/token) before and after. Adapter: none (full),
    lora (default) or qlora (4-bit base). The output folder holds both heads.

    Example: embedkit llm sft recipes/llm/smollm2-sft.yaml --set data.max_examples=200
    """
    _run(ctx, "sft", recipe, set_, output, check, json_output, resume, nproc)


@llm_app.command("dpo")
def dpo_command(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="An LLM recipe YAML (e.g. recipes/llm/smollm2-dpo.yaml)."),
    set_: List[str] = typer.Option([], "--set", help=_SET_HELP),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (overrides training.output_dir)."),
    check: bool = typer.Option(False, "--check", help="Validate the recipe and its data, then exit (no model)."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    resume: bool = typer.Option(False, "--resume", help=_RESUME_HELP),
    nproc: int = typer.Option(1, "--nproc", min=1, help=_NPROC_HELP),
    nnodes: int = NNODES_OPTION,
    node_rank: int = NODE_RANK_OPTION,
    rdzv_endpoint: str | None = RDZV_ENDPOINT_OPTION,
    rdzv_backend: str = RDZV_BACKEND_OPTION,
    rdzv_id: str = RDZV_ID_OPTION,
) -> None:
    """DPO on preference pairs built from the QA data: chosen = the question's answer, rejected = the answer of
    another question on the same topic (data.columns.topic, default 'focus').

    The reference is model.name itself (normally an `llm sft` output), via the adapter-disabled trick. With
    data.heldout set, prints held-out preference accuracy (chosen log-prob > rejected) before and after.

    Example: embedkit llm dpo recipes/llm/smollm2-dpo.yaml --set model.name=runs/smollm2-sft
    """
    _run(ctx, "dpo", recipe, set_, output, check, json_output, resume, nproc)


@llm_app.command("joint")
def joint_command(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="An LLM recipe YAML (e.g. recipes/llm/smollm2-joint.yaml)."),
    set_: List[str] = typer.Option([], "--set", help=_SET_HELP),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (overrides training.output_dir)."),
    check: bool = typer.Option(False, "--check", help="Validate the recipe and its data, then exit (no model)."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    resume: bool = typer.Option(False, "--resume", help=_RESUME_HELP),
    nproc: int = typer.Option(1, "--nproc", min=1, help=_NPROC_HELP),
    nnodes: int = NNODES_OPTION,
    node_rank: int = NODE_RANK_OPTION,
    rdzv_endpoint: str | None = RDZV_ENDPOINT_OPTION,
    rdzv_backend: str = RDZV_BACKEND_OPTION,
    rdzv_id: str = RDZV_ID_OPTION,
) -> None:
    """Joint training (GritLM-style): loss = contrastive (InfoNCE, in-batch negatives) + joint.sft_weight x answer
    loss, one run, one adapter. model.embedding_attention: causal (default) or bidirectional for the embedding
    side; generation is always causal. joint.sft_weight=0 trains the embedding side only.

    With data.dev set (beir:DIR:SPLIT), the saved folder is evaluated (nDCG@10).

    Example: embedkit llm joint recipes/llm/smollm2-joint.yaml --set joint.sft_weight=0.5
    """
    _run(ctx, "joint", recipe, set_, output, check, json_output, resume, nproc)


@llm_app.command("pairs")
def pairs_command(
    input_path: str = typer.Option(..., "--input", "-i",
                                   help="QA data: a .jsonl (query, positive, focus) or beir:DIR:SPLIT."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the pairs (.jsonl: prompt, chosen, "
                                                             "rejected, topic)."),
    question: str = typer.Option("query", "--question-field", help="Field holding the question."),
    answer: str = typer.Option("positive", "--answer-field", help="Field holding the answer."),
    topic: str = typer.Option("focus", "--topic-field", help="Field holding the topic."),
    seed: int = typer.Option(42, "--seed", help="Seed for picking the rejected answer."),
) -> None:
    """Build DPO preference pairs: chosen = the question's own answer, rejected = another question's answer on the
    same topic (never the same text). Questions alone on their topic are skipped.

    Example: embedkit llm pairs -i ../shared/data/medquad/train_pairs.jsonl -o runs/medquad-prefs.jsonl
    """
    examples, _ = read_qa(input_path, question=question, answer=answer, topic=topic)
    pairs, skipped = preference_pairs(examples, seed=seed)
    write_pairs(pairs, output)
    typer.echo(f"wrote {len(pairs)} pairs to {output} ({skipped} questions skipped: no other answer on their topic)")


@llm_app.command("chat")
def chat_command(
    model: str = typer.Option(..., "--model", "-m", help="A folder with a generative head, or smollm2-135m."),
    question: str = typer.Argument(..., help="The question."),
    passage: List[str] = typer.Option([], "--passage", "-p",
                                      help="A passage to answer from (repeatable); cited as [1], [2], ..."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Answer length limit in tokens."),
) -> None:
    """Ask the generative head a question (greedy decoding), optionally grounded in passages.

    Example: embedkit llm chat -m runs/smollm2-joint "What causes asthma?" -p "Asthma is caused by ..."
    """
    from embedkit.llm.generate import load_generator

    generator = load_generator(model)
    if passage:
        typer.echo(generator.answer(question, list(passage), max_new_tokens=max_new_tokens))
    else:
        typer.echo(generator.chat([{"role": "user", "content": question}], max_new_tokens=max_new_tokens).text)


@llm_app.command("export-chat")
def export_chat_command(
    model: str = typer.Option(..., "--model", "-m", help="An `embedkit llm` output folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the plain causal-LM folder."),
) -> None:
    """Write the generative side as a plain Hugging Face causal-LM folder for LMDeploy / vLLM / TGI.

    Weights are hard-linked (no copy when on the same disk); the tokenizer is written without the EOS-appending
    template that last-token pooling adds, so engines encode chat prompts as the model was trained on them.

    Example: embedkit llm export-chat -m runs/smollm2-joint -o runs/smollm2-joint-chat
    """
    from embedkit.llm.generate import export_chat_folder

    export_chat_folder(model, output)
    typer.echo(f"wrote {output} (serve it with: bash serve/lmdeploy.sh {output})")
