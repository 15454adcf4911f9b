"""Online hard-negative re-mining inside the training loop (recipe section `mining`, issue #5).

    mining: {online: true, every: 50 | epoch, range: "10:100", num_negatives: 3, relative_margin: 0.05}

At each refresh the pool (the BEIR corpus of a `beir:` training set, or the training positives plus
`mining.corpus`) is re-encoded with the model as it is at that step, and every example's negatives are replaced by
`embedkit.mine.remine` (same filters as `embedkit mine`: known positives of the query are never chosen, near
duplicates and margin-violating candidates are dropped). Round r draws with seed + r, so a re-run reproduces every
refresh; the training RNG stream is left untouched (forked), so the batch order and dropout masks are the same as a
run without re-mining. Each refresh is logged (train_log.jsonl, event "remine") and recorded in the output
manifest under training.online_mining.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from embedkit.data.beir import CORPUS_FILE, load_beir, read_corpus
from embedkit.mine.core import margin_warning
from embedkit.mine.online import RemineState, remine
from embedkit.train.config import Recipe, parse_train_source
from embedkit.train.trainset import set_documents

log = logging.getLogger(__name__)


def due_before_epoch(every: int | str, at_start: bool, step: int, epoch: int) -> bool:
    """At the start of an epoch: every epoch after the first; the first too (step 0) with at_start."""
    if step == 0 and epoch == 0:
        return at_start
    return every == "epoch"


def due_after_step(every: int | str, step: int, total_steps: int) -> bool:
    """After every `every`-th optimizer step, except the last (nothing trains on what it would mine)."""
    return every != "epoch" and step % int(every) == 0 and step < total_steps


def scheduled_rounds(every: int | str, at_start: bool, total_steps: int, steps_per_epoch: int) -> int:
    """The refreshes a run of `total_steps` optimizer steps (`steps_per_epoch` an epoch) makes: the two rules above
    walked as the training loop applies them, so that a cost estimate (`embedkit tune`'s budget) cannot drift from
    the schedule."""
    rounds = 0
    for step in range(total_steps):
        if step % steps_per_epoch == 0 and due_before_epoch(every, at_start, step, step // steps_per_epoch):
            rounds += 1
        if due_after_step(every, step + 1, total_steps):
            rounds += 1
    return rounds


def pool_corpus(recipe: Recipe) -> dict[str, dict] | None:
    """The documents beyond the training positives that a recipe's mining pool holds: mining.corpus, else the
    corpus of a beir: training set, else none (the pool is the training positives)."""
    if recipe.mining.corpus is not None:
        path = Path(recipe.mining.corpus)
        return read_corpus(path / CORPUS_FILE if path.is_dir() else path)
    kind, path, split = parse_train_source(recipe.data.train)
    if kind == "beir":
        return load_beir(path, split).corpus
    return None


class OnlineMiner:
    def __init__(self, recipe: Recipe, examples: list) -> None:
        self.recipe = recipe
        self.settings = recipe.mining_settings()
        self.state = RemineState.from_examples(examples, self.settings, corpus=pool_corpus(recipe))
        self.refreshes: list[dict[str, Any]] = []
        self.token_cache: dict[str, list[int]] = {}

    def due_before_epoch(self, step: int, epoch: int) -> bool:
        return due_before_epoch(self.recipe.mining.every, self.recipe.mining.at_start, step, epoch)

    def due_after_step(self, step: int, total_steps: int) -> bool:
        return due_after_step(self.recipe.mining.every, step, total_steps)

    def refresh(self, encoder, data, *, step: int, epoch: int | None) -> dict[str, Any]:
        """Re-mine with `encoder`, swap the negatives of `data` (re-tokenizing only new texts); return the record."""
        k = self.recipe.loss.hard_negatives
        started = time.perf_counter()
        round_ = self.state.rounds
        # Before the first optimizer step the weights are the loaded ones: their corpus embeddings may already be
        # in the cache (`embedkit mine` / `embedkit eval` with the same model and pool), and are worth keeping.
        first = step == 0
        with torch.random.fork_rng():  # mining must not shift the training RNG stream
            rows = remine(encoder, self.state, use_cache=first)
        if first:
            encoder.invalidate_fingerprint()  # it is about to go stale
        mine_seconds = time.perf_counter() - started
        new_by_pair = {(r.query, r.positive): r.negatives for r in rows}
        changed_slots = changed_rows = short_rows = 0
        examples = []
        for ex in data.examples:
            old = ex.negatives[:k]
            new = list(new_by_pair.get((ex.query, ex.positive), []))[:k]
            fresh = sum(1 for text in new if text not in old)
            changed_slots += fresh
            changed_rows += bool(fresh) or len(new) != len(old)
            short_rows += len(new) < k
            examples.append(replace(ex, negatives=new, scores=None))
        data.examples = examples
        set_documents(data, encoder, self.recipe, self.token_cache)
        stats = self.state.last_stats.to_dict()
        record = {"step": step, "epoch": epoch, "round": round_, "seed": self.settings.seed + round_,
                  "seconds": round(time.perf_counter() - started, 3), "mining_seconds": round(mine_seconds, 3),
                  "pool": len(self.state.task.corpus_ids), "queries": stats["queries"],
                  "candidates_in_window": stats["candidates_in_window"], "removed": stats["removed"],
                  "survivors": stats["survivors"], "negatives_changed": changed_slots, "rows_changed": changed_rows,
                  "rows_short": short_rows, "negative_score_median": stats["negative_scores"].get("median"),
                  "positive_score_median": stats["positive_scores"].get("median")}
        warning = margin_warning(stats, self.settings.to_dict(), names="recipe")
        if warning is not None:
            record["warning"] = warning["message"]
        self.refreshes.append(record)
        log.info("re-mined negatives at step %d (round %d, %.1f s): %d negatives changed in %d rows, %d rows short",
                 step, round_, record["seconds"], changed_slots, changed_rows, short_rows)
        if warning is not None:
            log.warning("online mining: %s", warning["message"])
        return record

    def manifest(self) -> dict[str, Any]:
        return {"settings": self.settings.to_dict(), "every": self.recipe.mining.every,
                "at_start": self.recipe.mining.at_start, "pool": self.state.task.description,
                "refreshes": list(self.refreshes)}

    # checkpoint / resume: the negatives in use are saved (re-mining on resume would use other weights)
    def checkpoint_state(self, data) -> dict[str, Any]:
        return {"rounds": self.state.rounds, "negatives": [list(ex.negatives) for ex in data.examples],
                "refreshes": [dict(r, removed=dict(r["removed"])) for r in self.refreshes]}

    def restore(self, payload: dict[str, Any], encoder, data) -> None:

        self.state.rounds = int(payload["rounds"])
        self.refreshes = [dict(r) for r in payload["refreshes"]]
        data.examples = [replace(ex, negatives=list(negs), scores=None)
                         for ex, negs in zip(data.examples, payload["negatives"])]
        set_documents(data, encoder, self.recipe, self.token_cache)

