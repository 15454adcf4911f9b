"""Joint training, GritLM-style: one model, one run, loss = contrastive + sft_weight * answer loss.

The same question/answer pairs feed both terms: (question, answer) is an InfoNCE pair for the embedding side
(`embedkit.train.loss.ContrastiveLoss`, in-batch negatives, the query instruction on questions) and a chat example
for the generative side (loss on the answer tokens only). The embedding side runs the decoder with causal
attention (default) or bidirectional attention (`model.embedding_attention`); the generative side always runs it
causally. Both terms are backpropagated into the same adapter before one optimizer step; since gradients add, this
is exactly the gradient of the summed loss (GradCache, `training.micro_batch_size`, splits the contrastive part
without changing it). `joint.sft_weight: 0` is the embedding-only ablation through the same code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from embedkit.train.gradcache import cached_step, plain_step
from embedkit.train.loss import ContrastiveLoss, text_keys


def joint_loss(contrastive: torch.Tensor, sft: torch.Tensor, weight: float) -> torch.Tensor:
    """The objective the joint step optimises (and reports)."""
    return contrastive + weight * sft


def joint_step(embedder, model, loss_fn: ContrastiveLoss, query_ids: Sequence[Sequence[int]],
               doc_ids: Sequence[Sequence[int]], sft_features: Sequence[dict], *, pad_id: int, weight: float,
               micro_batch: int | None = None, query_keys=None, document_keys=None) -> dict[str, float]:
    """Forward + backward of one joint batch; gradients accumulate in the parameters. Returns the loss terms."""
    from embedkit.llm.sft import sft_backward

    kwargs = {"query_keys": query_keys, "document_keys": document_keys}
    if micro_batch and micro_batch < len(query_ids):
        out = cached_step(embedder, loss_fn, list(query_ids), list(doc_ids), mini_batch=micro_batch, **kwargs)
    else:
        out = plain_step(embedder, loss_fn, list(query_ids), list(doc_ids), **kwargs)
    contrastive = float(out.loss)
    sft = 0.0
    if weight > 0 and sft_features:
        sft = sft_backward(model, sft_features, pad_id, micro_batch=micro_batch, weight=weight)
    total = float(joint_loss(torch.tensor(contrastive), torch.tensor(sft), weight))
    return {"loss": total, "contrastive": contrastive, "sft": sft, "scale": out.scale}


def train_joint(recipe, *, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train both heads together; saves one folder; returns stats (dev nDCG@10, held-out answer loss)."""
    from embedkit.llm.data import encode_sft, encode_sft_many
    from embedkit.llm.loop import run_loop
    from embedkit.llm.model import make_embedder
    from embedkit.llm.sft import _say, finish, heldout_answer_loss, prepare, work_dir

    say = say or _say("joint")
    ctx = prepare(recipe, "joint", say)
    m, t, j = recipe.model, recipe.training, recipe.joint
    tok, model = ctx["tokenizer"], ctx["model"]
    embedder = make_embedder(model, tok, ctx["settings"], name=m.name, source_path=str(ctx["path"]))
    pad = tok.pad_token_id
    # Keep only pairs whose chat example fits, so both terms always see the same examples.
    examples, sft_features = [], []
    for ex in ctx["train"]:
        feature = encode_sft(tok, ex.question, ex.answer, max_length=m.max_length, system=m.system_prompt)
        if feature is not None:
            examples.append(ex)
            sft_features.append(feature)
    query_ids = embedder._token_ids([ex.question for ex in examples], "query")
    doc_ids = embedder._token_ids([ex.answer for ex in examples], "document")
    q_keys = text_keys([ex.question for ex in examples])
    d_keys = text_keys([ex.answer for ex in examples])
    loss_fn = ContrastiveLoss(temperature=j.temperature, symmetric=j.symmetric,
                              mask_false_negatives=j.mask_false_negatives).to(ctx["device"])
    held = encode_sft_many(tok, ctx["heldout"], max_length=m.max_length, system=m.system_prompt)[0] \
        if ctx["heldout"] else None
    extra: dict[str, Any] = {"sft_weight": j.sft_weight, "embedding_attention": m.embedding_attention}
    if held and recipe.data.heldout_before:
        extra["heldout_answer_loss_before"] = heldout_answer_loss(model, held, pad, recipe, say, "before")

    def step(rows: list[int]) -> dict[str, float]:
        idx = torch.tensor(rows)
        return joint_step(embedder, model, loss_fn, [query_ids[i] for i in rows], [doc_ids[i] for i in rows],
                          [sft_features[i] for i in rows], pad_id=pad, weight=j.sft_weight,
                          micro_batch=t.micro_batch_size, query_keys=q_keys[idx], document_keys=d_keys[idx])

    output = Path(t.output_dir)
    work = work_dir(output)
    stats = run_loop(recipe, model, len(examples), step, work=work, say=say, desc="joint")
    stats.update(extra)
    if held:
        stats["heldout_answer_loss"] = heldout_answer_loss(model, held, pad, recipe, say, "after")
        stats["heldout_examples"] = len(held)
    finish(recipe, "joint", ctx, stats, work, say)
    if recipe.data.dev:
        stats["dev"] = evaluate_retrieval(output, recipe.data.dev, batch_size=recipe.data.dev_batch_size,
                                          seed=t.seed)
        say(f"dev {stats['dev']['main_metric']} = {stats['dev']['score']:.4f} (of the saved folder)")
    return {"output_dir": str(output), **stats}


def evaluate_retrieval(model_dir: str | Path, spec: str, *, batch_size: int = 32, seed: int = 42,
                       encoder=None) -> dict[str, Any]:
    """nDCG@10 etc. of a saved folder (as `load_model` reads it) on one retrieval task spec."""
    from embedkit.eval.runner import evaluate
    from embedkit.models.encoder import load_model

    encoder = encoder or load_model(model_dir)
    report = evaluate(encoder, [spec], batch_size=batch_size, seed=seed, use_cache=False)
    name, result = next(iter(report["results"].items()))
    main = result["task"]["main_metric"]
    metrics = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    return {"task": name, "main_metric": main, "score": float(metrics[main]), "metrics": metrics}
