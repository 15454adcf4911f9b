"""The training set of a contrastive run: examples read once, tokenized once, laid out as the loss expects.

What `embedkit train` (embedkit/train/contrastive.py) and online re-mining (embedkit/train/remining.py) both work
on: re-mining replaces each example's negatives and rebuilds the documents with `set_documents`, the step draws
its batches with `epoch_batches` and lays them out with `batch_inputs`. Kept apart from the step so that re-mining
does not import the step that runs it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from embedkit.data.beir import load_beir
from embedkit.data.tuples import TrainingExample, pairs_from_beir, read_examples
from embedkit.errors import DataError
from embedkit.manifest import sha256_file
from embedkit.train.config import Recipe, parse_train_source
from embedkit.train.losses import text_keys

_LENGTH_GROUP_BATCHES = 50  # length-grouped batching sorts within windows of this many batches


@dataclass
class TrainData:
    examples: list[TrainingExample]
    source: dict[str, Any]  # what was read: spec, path, hash, count
    query_ids: list[list[int]] = field(default_factory=list)
    doc_ids: list[list[list[int]]] = field(default_factory=list)  # per example: [positive, negatives...]
    query_keys: torch.Tensor | None = None
    doc_keys: torch.Tensor | None = None  # [n, 1+k], -1 in padded slots
    doc_valid: torch.Tensor | None = None  # [n, 1+k] bool: False where a row is short of negatives
    teacher: torch.Tensor | None = None  # [n, 1+k]


def subset_indices(available: int, data, seed: int) -> list[int] | None:
    """Which of `available` examples `data.max_examples` / `data.sample` keep (None: all of them)."""
    if not data.max_examples or available <= data.max_examples:
        return None
    if data.sample == "random":
        return sorted(random.Random(seed).sample(range(available), data.max_examples))
    return list(range(data.max_examples))


def load_examples(recipe: Recipe) -> tuple[list[TrainingExample], dict[str, Any]]:
    """The training examples a recipe names (subset and hard negatives applied) plus their provenance."""
    data, loss = recipe.data, recipe.loss
    kind, path, split = parse_train_source(data.train)
    if kind == "beir":
        ds = load_beir(path, split)
        examples = pairs_from_beir(ds)
        source = {"spec": data.train, "path": str(path), "split": split, "data_hash": ds.data_hash()}
    else:
        cols = data.columns
        reader = read_examples(path, query=cols.query, positive=cols.positive, negatives=cols.negatives,
                               scores=cols.scores)
        if data.max_examples and data.sample == "first":
            examples = [ex for _, ex in zip(range(data.max_examples), reader)]
        else:
            examples = list(reader)
        source = {"spec": data.train, "path": str(path), "sha256": sha256_file(path)}
    source["available"] = len(examples)
    chosen = subset_indices(len(examples), data, recipe.training.seed)
    if chosen is not None:
        examples = [examples[i] for i in chosen]
    source.update(sample=data.sample, max_examples=data.max_examples, used=len(examples))
    k = loss.hard_negatives
    # Rows short of negatives (mining keeps queries with fewer survivors) are padded and masked out of the loss.
    short = [len(ex.negatives) for ex in examples if len(ex.negatives) < k]
    source["hard_negatives"] = {"wanted": k, "short_rows": len(short), "missing": sum(k - n for n in short)}
    for i, ex in enumerate(examples):
        if loss.distillation != "none" and ex.scores is None:
            raise DataError(f"example {i + 1} has no teacher scores; loss.distillation needs them", path=path,
                            field=data.columns.scores or "scores")
    return examples, source


def prepare_data(encoder, examples: list[TrainingExample], source: dict, recipe: Recipe) -> TrainData:
    """Tokenize once (never inside the loop) and compute the text keys used for false-negative masking."""
    data = TrainData(examples, source)
    data.query_ids = encoder.token_ids([ex.query for ex in examples], "query")
    data.query_keys = text_keys([ex.query for ex in examples])
    set_documents(data, encoder, recipe)
    return data


def set_documents(data: TrainData, encoder, recipe: Recipe, token_cache: dict[str, list[int]] | None = None) -> None:
    """(Re)build the per-example documents [positive, negatives...] from data.examples: token ids, text keys, the
    validity of each negative slot (rows short of negatives are padded) and teacher scores.

    `token_cache` (text -> ids) lets online re-mining tokenize only the texts it has not seen yet.
    """
    k = recipe.loss.hard_negatives
    examples = data.examples
    docs = [[ex.positive, *ex.negatives[:k]] for ex in examples]
    texts = [t for row in docs for t in row]
    if token_cache is None:
        flat = encoder.token_ids(texts, "document")
    else:
        new = list(dict.fromkeys(t for t in texts if t not in token_cache))
        if new:
            token_cache.update(zip(new, encoder.token_ids(new, "document")))
        flat = [token_cache[t] for t in texts]
    data.doc_ids, start = [], 0
    for row in docs:
        data.doc_ids.append(flat[start:start + len(row)])
        start += len(row)
    n = len(examples)
    valid = torch.zeros(n, 1 + k, dtype=torch.bool)
    keys = torch.full((n, 1 + k), -1, dtype=torch.long)  # -1: a padded slot (real keys are >= 0)
    all_keys = text_keys(texts) if texts else torch.zeros(0, dtype=torch.long)
    start = 0
    for i, row in enumerate(docs):
        valid[i, :len(row)] = True
        keys[i, :len(row)] = all_keys[start:start + len(row)]
        start += len(row)
    data.doc_keys, data.doc_valid = keys, valid
    if recipe.loss.distillation != "none":
        teacher = torch.zeros(n, 1 + k, dtype=torch.float32)  # padded slots stay 0 (masked in the loss)
        for i, ex in enumerate(examples):
            row = [ex.scores[0], *ex.scores[1:1 + min(k, len(ex.negatives))]]
            teacher[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
        data.teacher = teacher


def batch_inputs(data: TrainData, rows: list[int], k: int) -> tuple[list, list, dict[str, Any]]:
    """(query ids, real document ids, loss kwargs) of a batch in the loss layout: all positives, then each query's
    k negative slots in order. Padded slots have no ids; `document_valid` tells the loss which slots are real."""
    query_ids = [data.query_ids[i] for i in rows]
    doc_ids = [data.doc_ids[i][0] for i in rows] + [ids for i in rows for ids in data.doc_ids[i][1:1 + k]]
    idx = torch.tensor(rows)
    doc_keys = torch.cat([data.doc_keys[idx, 0], data.doc_keys[idx, 1:].reshape(-1)])
    kwargs: dict[str, Any] = {"query_keys": data.query_keys[idx], "document_keys": doc_keys}
    valid = torch.cat([data.doc_valid[idx, 0], data.doc_valid[idx, 1:].reshape(-1)])
    if not valid.all():
        kwargs["document_valid"] = valid
    if data.teacher is not None:
        kwargs["teacher_scores"] = data.teacher[idx]
    return query_ids, doc_ids, kwargs


def epoch_batches(data: TrainData, recipe: Recipe, epoch: int, batch_size: int | None = None) -> list[list[int]]:
    """A deterministic batch order for `epoch` (seed + epoch), optionally grouped by length to cut padding.

    `batch_size` is the global batch (per process x processes; default the recipe's): several processes draw the
    single-process order of that batch size and split each batch between them."""
    return seeded_batches(len(data.examples), recipe.training, epoch, batch_size,
                          length=lambda i: len(data.query_ids[i]) + len(data.doc_ids[i][0]))


def seeded_batches(n: int, training, epoch: int, batch_size: int | None = None, *,
                   length: Callable[[int], int] | None = None) -> list[list[int]]:
    """`epoch_batches` for any step: `n` rows, the recipe's `training` section (seed, batch size, group_by_length,
    drop_last), `length(row)` the tokens a row brings (for group_by_length)."""
    t = training
    generator = torch.Generator().manual_seed(t.seed * 1000 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    size = batch_size or t.batch_size
    if t.group_by_length and length is not None:
        window = size * _LENGTH_GROUP_BATCHES
        grouped = []
        for start in range(0, len(order), window):
            part = order[start:start + window]
            part.sort(key=lambda i: -length(i))
            grouped.extend(part)
        batches = [grouped[i:i + size] for i in range(0, len(grouped), size)]
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in shuffle]
    else:
        batches = [order[i:i + size] for i in range(0, len(order), size)]
    if t.drop_last and batches and len(batches[-1]) < size:
        batches.pop()
    return batches
