"""Reranker training: the `Step` that `embedkit train` plugs into the training engine for a `task: rerank` recipe.

A reranker (embedkit.models.reranker) learns to score each training row's positive above its hard negatives:
the row's (query, positive) and (query, negative) pairs are tokenized once (the one pair path,
embedkit.models.tokenization), each micro-batch's pairs go through one forward, and the loss factory's reranker loss
(embedkit/train/losses/rerank.py: listwise, bce, plus distillation from the rows' teacher scores) sees the logits
laid out [rows, 1 + k]. Everything else is the engine's, as for the bi-encoder: devices and processes (DDP,
DeepSpeed, FSDP), mixed precision, accumulation, checkpoints and exact resume, the dev-best step, logs.

Negatives come from embedkit's miner (the bi-encoder's ranking, with its false-negative filters): rows that carry
them (`embedkit mine --model FIRST_STAGE ... -o mined.jsonl`, the same rows a bi-encoder trains on), or, when no row
has any (a `beir:` training set, a pairs file), mined at the start with `rerank.first_stage` and the recipe's
`mining` settings. A negative whose text equals the positive's is left out of the loss. Dev evaluation reranks the first stage's (`rerank.first_stage`) top `rerank.top_k` on
`data.dev`, so the dev score is the two-stage nDCG@10 the reranker is for; the first stage's run is computed once.

Two kinds, one step: a BERT-style start trains a cross-encoder (every weight, a new one-logit head); a causal LM start
trains a yes/no LLM reranker (Qwen3-Reranker's formulation: logit("yes") - logit("no") after its instruction prompt,
`rerank.instruction`), usually through the recipe's LoRA / QLoRA adapter with gradient checkpointing, set up as for
a causal LLM encoder (contrastive.apply_adapter). The step sees only `pair_ids`, `collate` and the [B] logits, so
both kinds train, evaluate and save the same way.

The output folder is the reranker's own (Reranker.save; a LoRA adapter merged, a QLoRA one merged into the base
reloaded in full precision): sentence-transformers' CrossEncoder loads it with the same scores (version 6 for the
yes/no reranker); manifest, model card, probe scores and the training log are in it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from embedkit.device import torch_threads
from embedkit.errors import ConfigError, DataError
from embedkit.eval import runner as eval_runner
from embedkit.eval.metrics import retrieval_metrics
from embedkit.eval.tasks import load_task, parse_task_spec
from embedkit.mine.online import RemineState, remine
from embedkit.manifest import command_line
from embedkit.models.encoder import load_model
from embedkit.models.adapters import keep_4bit_layout
from embedkit.models.reranker import Reranker, YesNoReranker, reranker_kind
from embedkit.models.tokenization import length_sorted_batches
from embedkit.train.backends import backend_class
from embedkit.train.config import Recipe
from embedkit.train.contrastive import TrainResult, apply_adapter, set_dropout
from embedkit.train.engine import (LOG_FILE, Engine, Phase, StepBase, copy_run_logs, peak_rss_gb, recipe_hash,
                                   seed_everything)
from embedkit.train.gradcache import chunking_saves
from embedkit.train.losses import build_loss, text_keys
from embedkit.train.remining import pool_corpus
from embedkit.train.trainset import load_examples, seeded_batches

log = logging.getLogger(__name__)


def build_reranker(recipe: Recipe, device: torch.device | str = "cpu") -> Reranker:
    """The recipe's reranker, ready to train, dropout as the recipe sets it: a cross-encoder (a reranker folder, or
    an embedding / plain encoder folder with a new one-logit head from the seeded RNG), or a yes/no LLM reranker (a
    causal LM start, with the recipe's LoRA / QLoRA adapter: PEFT's initialisation draws from the seeded RNG too)."""
    m, a = recipe.model, recipe.adapter
    kind = reranker_kind(m.name)
    if kind == "cross-encoder":
        if a.type != "none":
            raise ConfigError(f"{m.name} starts a cross-encoder, which trains all its weights: adapter.type "
                              f"{a.type} is for the yes/no reranker (a causal LM start)", field="adapter.type")
        if recipe.rerank.instruction is not None:
            raise ConfigError(f"{m.name} starts a cross-encoder, which has no prompt: rerank.instruction is for the "
                              "yes/no reranker (a causal LM start)", field="rerank.instruction")
    # head_lr trains the weights the start does not hold; refused, not ignored, where none is new (it would change
    # nothing while reading as if it did): a yes/no reranker (its logit is the LM head's yes minus no, checked before
    # a large LM loads) or a trained cross-encoder (its head is loaded).
    no_head = "no weight is new, so training.head_lr (the lr of a new head) has nothing to train: remove it"
    if recipe.training.head_lr is not None and kind != "cross-encoder":
        raise ConfigError(f"{m.name} starts a yes/no reranker, whose logit is its LM head's: {no_head}",
                          field="training.head_lr")
    reranker = Reranker.from_pretrained(m.name, max_length=m.max_length, dtype=m.dtype, device=str(device),
                                        start=True, instruction=recipe.rerank.instruction,
                                        quantization="nf4" if a.type == "qlora" else None,
                                        sharded_storage=a.type == "qlora"
                                        and backend_class(recipe).flattens_parameters(recipe))
    if recipe.training.head_lr is not None and not reranker.new_parameter_names:
        raise ConfigError(f"{m.name} is a trained cross-encoder, whose head is loaded: {no_head}",
                          field="training.head_lr")
    if a.type == "qlora":
        keep_4bit_layout(reranker.backbone)
    set_dropout(reranker, attention=m.attention_dropout, hidden=m.hidden_dropout)
    return apply_adapter(reranker, recipe)


def merged_from_4bit(reranker: YesNoReranker, recipe: Recipe, work: Path) -> YesNoReranker:
    """QLoRA: merging into a 4-bit base is lossy, so the adapter is saved, the base reloaded in full precision with
    it (merged when saved). The prompt and the base-model record are the trained reranker's."""
    adapter_dir = work / "adapter"
    reranker.backbone.save_pretrained(adapter_dir)
    full = Reranker.from_pretrained(recipe.model.name, max_length=reranker.max_length, dtype="fp32", start=True,
                                    instruction=reranker.template.instruction, adapter=adapter_dir)
    full.base_model = reranker.base_model
    return full


@dataclass
class PairData:
    """Every row's pairs, tokenized once: [positive, negatives...] ids and type ids, which slots are real, teacher."""

    ids: list[list[list[int]]]
    type_ids: list[list[list[int]]]
    valid: torch.Tensor  # [n, 1 + k] bool
    teacher: torch.Tensor | None  # [n, 1 + k]
    skipped_duplicates: int


def prepare_pairs(reranker: Reranker, examples: list, k: int, distillation: bool) -> PairData:
    """Tokenize each row's (query, positive) and (query, negative) pairs; a negative with the positive's text (a
    false negative no filter caught) and the slots of rows short of negatives stay out of the loss."""
    queries, documents, owners = [], [], []
    valid = torch.zeros(len(examples), 1 + k, dtype=torch.bool)
    teacher = torch.zeros(len(examples), 1 + k) if distillation else None
    duplicates = 0
    for row, ex in enumerate(examples):
        texts = [ex.positive, *ex.negatives[:k]]
        keys = text_keys(texts).tolist()
        for slot, text in enumerate(texts):
            if slot and keys[slot] == keys[0]:
                duplicates += 1
                continue
            valid[row, slot] = True
            queries.append(ex.query)
            documents.append(text)
            owners.append((row, slot))
        if teacher is not None:
            scores = ex.scores[:len(texts)]
            teacher[row, :len(scores)] = torch.tensor(scores, dtype=torch.float32)
    flat_ids, flat_types = reranker.pair_ids(queries, documents)
    ids: list[list[list[int]]] = [[[] for _ in range(1 + k)] for _ in examples]
    types: list[list[list[int]]] = [[[] for _ in range(1 + k)] for _ in examples]
    for (row, slot), i, t in zip(owners, flat_ids, flat_types):
        ids[row][slot], types[row][slot] = i, t
    return PairData(ids, types, valid, teacher, duplicates)


# Tokens per forward when training on a CPU. One forward over a whole batch (the bench's 16 rows x 8 pairs x 256
# tokens) keeps every layer's activations, attention's included, far beyond the CPU's caches; the same pairs in
# forwards of 16 pairs (4,096 tokens) ran forward + backward in 17.4 s instead of 21.7 s (MiniLM, 2 threads, AMD
# EPYC with AVX-512; sentence-transformers' model alike: 16.6 s vs 20.8 s, its listwise loss runs one forward per
# column of 16 pairs), the gap that made embedkit's trainer 0.85x its rows/s (docs/rerank.md). A property of the
# CPU's memory, not of the data: the cap is in tokens (of the batch's longest pair), so a batch of short pairs goes
# in larger groups. GPUs keep one forward.
CPU_FORWARD_TOKENS = 4096


class RerankStep(StepBase):
    name = "rerank"

    def __init__(self, recipe: Recipe, reranker: Reranker, loss_fn, pairs: PairData, dev=None) -> None:
        self.recipe, self.reranker, self.loss_fn, self.pairs, self.dev = recipe, reranker, loss_fn, pairs, dev

    def batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        p = self.pairs
        return seeded_batches(len(p.ids), self.recipe.training, epoch, batch_size,
                              length=lambda i: sum(len(x) for x in p.ids[i]))

    def run(self, rows: list[int], engine: Engine, weight: float) -> dict[str, float]:
        p = self.pairs
        valid = p.valid[rows]
        slots = valid.nonzero().tolist()
        ids = [p.ids[rows[r]][s] for r, s in slots]
        types = [p.type_ids[rows[r]][s] for r, s in slots]
        with engine.sync(last=True):
            logits = self._logits(engine, ids, types)
            # [rows, 1 + k]: padded slots hold 0 and are masked by `valid` in the loss
            table = logits.new_zeros(valid.shape).index_put((valid.to(logits.device).nonzero(as_tuple=True)), logits)
            teacher = p.teacher[rows] if p.teacher is not None else None
            out = self.loss_fn(table, valid, teacher)
            engine.backward(out.loss * weight)
        record = {"loss": float(out.loss.detach()), "rerank": out.contrastive, "padded": out.padded}
        if out.distillation:
            record["distillation"] = out.distillation
        return record

    def _logits(self, engine: Engine, ids: list[list[int]], types: list[list[int]]) -> torch.Tensor:
        """The pairs' logits with autograd, in their order: one forward, or length-sorted chunks, each padded to its
        own longest: of `training.length_chunk` rows' pairs when that removes enough padding (the bi-encoder's rule,
        `chunking_saves`: a row's positive and negatives differ in length, and one forward pads every pair of the
        batch to the longest), and on a CPU of at most CPU_FORWARD_TOKENS tokens. The logits are the same either way
        (the attention mask makes each pair independent), only the dropout masks are drawn differently."""
        rows = (self.recipe.training.length_chunk or 0) * (1 + self.recipe.loss.hard_negatives)
        size = rows if rows and chunking_saves(ids, rows) else 0
        if self.reranker.device.type == "cpu":
            cap = max(1, CPU_FORWARD_TOKENS // max(len(x) for x in ids))
            if len(ids) > cap:
                size = min(size or cap, cap)
        if not size:
            with engine.autocast():
                return engine.model(self.reranker.collate(ids, types)).float()
        order: list[int] = []
        parts = []
        for chunk in length_sorted_batches(ids, size):
            order.extend(chunk)
            with engine.autocast():
                parts.append(engine.model(self.reranker.collate([ids[i] for i in chunk],
                                                                [types[i] for i in chunk])).float())
        logits = torch.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        return logits[inverse.to(logits.device)]

    def evaluate(self, engine: Engine) -> dict[str, Any] | None:
        return self.dev.evaluate(self.reranker) if self.dev is not None else None


class DevReranking:
    """The dev task's two-stage score: the first stage's ranking (computed once) reranked by the model as it is."""

    def __init__(self, recipe: Recipe, first) -> None:
        self.task = load_task(parse_task_spec(recipe.data.dev))
        if self.task.spec.type != "retrieval":
            raise DataError("a reranker's dev set is a retrieval task (beir:DIR:SPLIT)", field="data.dev")
        self.top = recipe.rerank.top_k
        self.batch_size = recipe.data.dev_batch_size
        data = self.task.data
        query_ids = data.judged_query_ids()
        doc_ids = list(data.corpus)
        # Encoded as `embedkit eval` encodes (normalised, the documents through its embedding cache): the dev
        # ranking is the one `eval --rerank` would rerank, and `embedkit tune`'s trials (every fold, every trial: one
        # dev corpus, one first stage) encode the dev corpus once, not once per run.
        with torch.random.fork_rng():
            docs, _ = eval_runner.encode_cached(first, doc_ids, data.document_texts(doc_ids), kind="document",
                                                batch_size=self.batch_size, cache_dir=eval_runner.default_cache_dir(),
                                                use_cache=True)
            queries = first.encode([data.queries[q] for q in query_ids], kind="query", batch_size=self.batch_size,
                                   normalize=True)
        self.run = eval_runner.exact_search(queries, docs, query_ids, doc_ids, max(eval_runner.DEFAULT_TOP_K, self.top))
        self.qrels = {q: data.qrels[q] for q in query_ids}
        self.first_stage = {"model": recipe.rerank.first_stage,
                            "metrics": retrieval_metrics(self.qrels, self.run).metrics}
        needed = sorted({d for hits in self.run.values() for d in hits})
        self.documents = dict(zip(needed, data.document_texts(needed)))
        log.info("dev: %s's top %d of %d queries, first stage %s %.4f", recipe.rerank.first_stage, self.top,
                 len(query_ids), self.task.spec.main_metric, self.first_stage["metrics"][self.task.spec.main_metric])

    def evaluate(self, reranker: Reranker) -> dict[str, Any]:
        reranker.invalidate_fingerprint()
        with torch.random.fork_rng():
            run = eval_runner.rerank_run(reranker, self.task.data.queries, self.documents, self.run, top=self.top,
                                         batch_size=self.batch_size)
        reranker.train()
        scores = retrieval_metrics(self.qrels, run)
        main = self.task.spec.main_metric
        per_query = {q: v[main] for q, v in scores.per_query.items() if main in v}
        return {"task": self.task.spec.name, "metric": main, "main_metric": main, "score": scores.metrics[main],
                "metrics": scores.metrics, "per_query": per_query, "first_stage": self.first_stage}


def mine_negatives(recipe: Recipe, examples: list, first) -> tuple[list, dict[str, Any]]:
    """Rows without negatives get them from the first stage's ranking: embedkit's miner with the recipe's mining
    settings (window, margins to the positive, near-duplicate filter, sampling, seed) over the recipe's pool."""
    settings = recipe.mining_settings()
    state = RemineState.from_examples(examples, settings, corpus=pool_corpus(recipe))
    with torch.random.fork_rng():  # mining must not shift the training RNG stream (the new head's initialisation)
        rows = remine(first, state, use_cache=True)
    found = {(r.query, r.positive): r for r in rows}
    mined = [replace(ex, negatives=list(found[(ex.query, ex.positive)].negatives),
                     scores=list(found[(ex.query, ex.positive)].scores or []) or None)
             if (ex.query, ex.positive) in found else ex for ex in examples]
    stats = state.last_stats.to_dict()
    record = {"first_stage": recipe.rerank.first_stage, "settings": settings.to_dict(),
              "pool": len(state.task.corpus_ids), "survivors": stats["survivors"], "removed": stats["removed"],
              "rows_short": sum(len(ex.negatives) < recipe.loss.hard_negatives for ex in mined)}
    log.info("mined negatives with %s: pool %d, %d rows short of %d", recipe.rerank.first_stage, record["pool"],
             record["rows_short"], recipe.loss.hard_negatives)
    return mined, record


def train_reranker(recipe: Recipe, *, resume: bool = False, output_dir: str | Path | None = None,
                   on_step: Callable[[int, dict], None] | None = None,
                   on_eval: Callable[[int, dict, int], None] | None = None) -> TrainResult:
    """Train the recipe's reranker through the engine; returns where it went and what was measured."""
    if output_dir is not None:
        recipe = recipe.model_copy(deep=True)
        recipe.training.output_dir = str(output_dir)
    with torch_threads(recipe.training.threads):
        return _train(recipe, resume=resume, on_step=on_step, on_eval=on_eval)


def _train(recipe: Recipe, *, resume: bool, on_step, on_eval) -> TrainResult:
    t, k = recipe.training, recipe.loss.hard_negatives
    output = Path(t.output_dir)
    engine = Engine(recipe, output, kind="rerank")
    seed_everything(t.seed)  # before the model: the new head draws from the RNG
    examples, source = load_examples(recipe)
    needs_mining = not any(ex.negatives for ex in examples)
    if needs_mining and not recipe.rerank.first_stage:
        raise DataError("no row has negatives: a reranker learns each query's positive against its negatives. Set "
                        "rerank.first_stage (the bi-encoder) to mine them at the start, or mine them first (embedkit "
                        "mine --model FIRST_STAGE --data DATA -o mined.jsonl) and train on that file",
                        path=source.get("path"), field="data.train")
    first = load_model(recipe.rerank.first_stage, device=str(engine.device)) if (
        needs_mining or recipe.data.dev) else None
    if needs_mining:
        examples, source["mined"] = mine_negatives(recipe, examples, first)
    log.info("%d training rows from %s (%d negatives each)", len(examples), recipe.data.train, k)
    with engine.model_init():
        reranker = build_reranker(recipe, engine.device)
    engine.set_model_builder(lambda: build_reranker(recipe, "cpu"))
    pairs = prepare_pairs(reranker, examples, k, recipe.loss.distillation != "none")
    source["pairs"] = {"scored": int(pairs.valid.sum()), "padded": int((~pairs.valid).sum()) - pairs.skipped_duplicates,
                       "negatives_equal_to_positive": pairs.skipped_duplicates}
    loss_fn = build_loss(recipe.loss, task="rerank").to(engine.device)
    dev = DevReranking(recipe, first) if recipe.data.dev else None
    del first  # the first stage's run is kept, not its weights
    step = RerankStep(recipe, reranker, loss_fn, pairs, dev)
    fit = engine.fit([Phase(step.name, step, len(examples))], reranker, resume=resume, on_step=on_step,
                     on_eval=on_eval)
    stats = {**fit.stats(), "processes": engine.world, "backend": engine.backend.name, "device": str(engine.device),
             "loss": loss_fn.describe()}
    model = engine.full_model()
    if engine.is_main:
        if recipe.adapter.type == "qlora":
            model = merged_from_4bit(model, recipe, engine.work)
        manifest = {"training": {"recipe": recipe.model_dump(mode="json"), "recipe_hash": recipe_hash(recipe),
                                 "data": source, "seed": t.seed, "stats": stats},
                    "dev_eval": fit.dev}
        model.save(output, manifest=manifest, card=model_card(recipe, source, stats, fit.dev, model),
                   write_extra=lambda tmp: copy_run_logs(engine.work, tmp))
        log.info("saved %s (%s samples/s, peak RSS %.2f GB)", output, stats["samples_per_second"], peak_rss_gb())
    engine.finish()
    return TrainResult(**vars(fit), output_dir=output, log_path=output / LOG_FILE)


def model_card(recipe: Recipe, source: dict, stats: dict, dev: dict | None, model: Reranker) -> str:
    m, t, lc, a = recipe.model, recipe.training, recipe.loss, recipe.adapter
    what = "a cross-encoder"
    if isinstance(model, YesNoReranker):
        what = ("a yes/no LLM reranker: the causal LM's logit of \"yes\" minus that of \"no\" after an instruction "
                f"prompt (Qwen3-Reranker's formulation; instruction: \"{model.template.instruction}\")")
    lines = [f"# {Path(t.output_dir).name}", "",
             f"A reranker ({what}) fine-tuned with embedkit from `{m.name}` on `{recipe.data.train}`.", "",
             "## Training", "",
             *([f"- adapter: {a.type} (r={a.r}, alpha={a.alpha}), merged into the saved weights"]
               if a.type != "none" else []),
             f"- data: {source.get('used')} rows from `{source.get('spec')}`"
             + (f" (sha256 `{source['sha256'][:16]}`)" if source.get("sha256") else ""),
             f"- loss: {stats['loss']}; {lc.hard_negatives} negatives per row",
             f"- {stats['steps']} steps, batch {t.batch_size}, lr {t.lr}"
             + (f" (new head {t.head_lr})" if t.head_lr is not None else "") + f", epochs {t.epochs}"
        + (f" (min_steps {t.min_steps})" if t.min_steps else "") + f", seed {t.seed}, "
             f"max length {m.max_length or 'model default'}",
             f"- throughput {stats['samples_per_second']} rows/s, device {stats['device']}",
             f"- command: `{' '.join(command_line())}`", ""]
    if dev:
        first = dev.get("first_stage") or {}
        lines += ["## Evaluation", "",
                  f"Task `{dev['task']}`: the top {recipe.rerank.top_k} of `{first.get('model')}` reranked.", "",
                  "| metric | first stage | reranked |", "|---|---|---|"]
        lines += [f"| {key} | {first.get('metrics', {}).get(key, float('nan')):.4f} | {value:.4f} |"
                  for key, value in dev["metrics"].items() if isinstance(value, (int, float))]
        lines.append("")
    needs = "  # sentence-transformers >= 6 (its LogitScore module)" if isinstance(model, YesNoReranker) else ""
    lines += ["## Use", "", "```python", "from sentence_transformers import CrossEncoder" + needs,
              f"model = CrossEncoder('{t.output_dir}')", "scores = model.predict([(query, document), ...])", "```",
              "", "Or in embedkit: `embedkit eval -m FIRST_STAGE --rerank THIS_FOLDER`; `rerank_probes.json` holds "
              "the scores of fixed pairs that a later copy must reproduce.", ""]
    return "\n".join(lines)
