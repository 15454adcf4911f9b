"""The search of `embedkit tune`: the trials, their dev scores with a spread, the pruner, the budget, the choice.

One trial is the trial's recipe trained through the training engine, in a process of its own
(embedkit/tune/jobs.py), once per dev fold (embedkit/tune/split.py):

- one fold (enough dev queries): the engine's dev evaluations (once per epoch by default) feed a median pruner,
  which stops a trial whose dev score falls below the median of the finished trials at the same point of their
  schedules (never at the first evaluation, never at the last). The point is the fraction of the trial's own steps,
  not the step number: a 3-epoch trial one epoch in is still at a high learning rate, and judged against 1-epoch
  trials that have finished their decay it would be pruned for being longer, not worse;
- several folds (few training queries): each fold trains on the other folds' queries and scores its own at the end;
  the trial's score pools every query's out-of-fold score, and the pruner compares the pooled score of the folds
  done so far with the other trials' after the same folds (never after the first, never after the last).

A trial's score is the mean of its dev queries' scores, with its standard error (the spread). The choice respects
that spread: the best trial replaces the recipe as written (trial 0) only when it is better on the same queries by
more than NOISE_Z standard errors of the paired difference; otherwise the recipe as written stays (see `choice`).

The schedule grows as it earns it (successive halving over epochs): proposals run with at most `epoch_cap` epochs,
which starts at the recipe's epochs or BASE_EPOCHS, and doubles (up to the space's bound) each time the best trial is
one that ran at the cap. Short trials first: on a small machine a budget then sees many settings instead of a few
long ones (a held-out search on 2 cores spent 23 of its 40 minutes on one 8-epoch trial that lost to the recipe).

A time budget starts a trial only when it is expected to end in time (`expected_seconds`); a proposal that would end
late runs with the most epochs that fit (`_shortened`). Every trial keeps its number (a shortened proposal says it
was shortened), the log has a line per dev evaluation and at least one a minute in between (HEARTBEAT_SECONDS), and
the state after every trial is written to SEARCH_STATE, from which `--resume` goes on.
"""

from __future__ import annotations

import logging
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from embedkit.errors import ConfigError, EmbedkitError
from embedkit.train.config import Recipe, format_override
from embedkit.train.remining import scheduled_rounds
from embedkit.train.schedule import epochs_for
from embedkit.tune.budget import Budget, duration
from embedkit.tune.jobs import JobFailed, JobPruned, recipe_payload, run_job
from embedkit.tune.space import BASE_EPOCHS, Param, defaults, in_space, longer_schedule, recipe_overrides, suggest
from embedkit.tune.split import DevSplit
from embedkit.atomic import write_json
from embedkit.train.engine import work_dir

log = logging.getLogger("embedkit.tune")

TRIALS_DIR = "trials"
SEARCH_STATE = "search_state.json"
TPE_STARTUP_TRIALS = 4  # random proposals (trial 0 = the recipe included) before TPE models the results
PRUNER_STARTUP_TRIALS = 2  # finished trials needed before any pruning
PROGRESS_SCALE = 1000  # the pruner compares trials at step / total steps, in thousandths (after fold f: (f+1) x it)
MAX_REPEATS = 20  # consecutive proposals already tried: the space is exhausted
HEARTBEAT_SECONDS = 50.0  # a progress line at least this often during a trial (with the jobs' 5 s poll: < 1 min)
# The best trial replaces the recipe as written only when better by this many standard errors of the paired
# difference on the same dev queries. Two, not one: the best of ten trials that are all equal to the recipe beats
# it by about 1.5 standard errors by chance alone (the expected maximum of ten normal draws), so one would let the
# search pick noise most of the time; two leaves that to ~20% of ten-trial searches.
NOISE_Z = 2.0


def as_overrides(values: dict[str, Any]) -> list[str]:
    """{dotted key: value} as the "KEY=VALUE" overrides `--set` takes (`BaseRecipe.with_overrides`,
    `apply_overrides`), each reading back as its value."""
    return [format_override(key, value) for key, value in values.items()]


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def spread(scores: list[float]) -> float | None:
    """The standard error of the mean of `scores` (None below two)."""
    return statistics.stdev(scores) / math.sqrt(len(scores)) if len(scores) >= 2 else None


def paired_difference(better: dict[str, float], base: dict[str, float]) -> tuple[float, float | None, int]:
    """Mean and standard error of better - base over the queries both scored, and their number."""
    common = sorted(set(better) & set(base))
    diffs = [better[q] - base[q] for q in common]
    if not diffs:
        return 0.0, None, 0
    return statistics.fmean(diffs), spread(diffs), len(diffs)


@dataclass
class TrialRecord:
    number: int  # 0, 1, 2, ... without gaps (the sampler's own numbering is internal)
    params: dict[str, Any]
    state: str  # "complete" | "pruned" | "failed" | "repeat"
    value: float | None  # the dev score the trial is judged by (complete and repeat trials)
    seconds: float
    steps: int | None = None  # optimizer steps run (all folds)
    total_steps: int | None = None  # of one fold
    history: list[dict] = field(default_factory=list)  # [{"step", "score", "point"[, "fold"]}] the dev evaluations
    pruned_at: int | None = None
    best_so_far: float | None = None
    note: str = ""
    spread: float | None = None  # standard error of `value` over its dev queries
    queries: int | None = None  # dev queries behind `value`
    fold_scores: list[float] = field(default_factory=list)
    per_query: dict[str, float] | None = None  # the dev score of every query (folds: out-of-fold), for the choice
    train_seconds: float | None = None  # the engine's optimizer-step time, all runs (None: not reported)
    evaluations: int = 0  # dev evaluations made, the one after training included
    # a reranker's trial: the first stage's own dev score on the same queries (`value` is the two stages'); the
    # same in every trial, it shows what reranking adds
    first_stage: float | None = None

    def last_score(self) -> float | None:
        return self.history[-1]["score"] if self.history else self.value


class Search:
    """The trials: ask the sampler, train, report to the pruner, tell the result; the budget decides when to stop."""

    def __init__(self, base: Recipe, space: list[Param], *, output: Path, seed: int, budget: Budget,
                 folds: list[DevSplit], objective_is_best: bool = False, verbose: bool = False,
                 clock: Callable[[], float] = time.monotonic, trial_hook: Callable[[int], None] | None = None,
                 keep_trials: bool = False, steps_per_epoch: int | None = None,
                 mining_round_seconds: float | None = None, started: float | None = None, isolate: bool = True,
                 state: dict[str, Any] | None = None, resumed: dict[str, Any] | None = None) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.base, self.space, self.output, self.seed, self.budget = base, space, output, seed, budget
        self.folds, self.isolate = folds, isolate
        self.objective_is_best, self.verbose, self.clock, self.trial_hook = objective_is_best, verbose, clock, trial_hook
        self.keep_trials, self.steps_per_epoch = keep_trials, steps_per_epoch
        self.mining_round_seconds = mining_round_seconds or 0.0
        self.state = dict(state or {})  # what --resume needs besides the trials (the split, the probe, ...)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS)
        self.pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS)
        self.study = optuna.create_study(direction="maximize", sampler=sampler, pruner=self.pruner)
        self.records: list[TrialRecord] = []
        self.seen: dict[tuple, TrialRecord] = {}
        self.stop_reason = ""
        self.seconds = 0.0
        self.started = started  # when the budget's clock started (tune's start: the preparation counts); None: now
        self.preparation_seconds = 0.0
        epochs = next((p for p in space if p.name == "epochs"), None)
        self.epoch_cap = int(min(epochs.high, max(epochs.default, BASE_EPOCHS))) if epochs else None
        self.used_before = 0.0  # seconds an interrupted run had used (--resume)
        if resumed:
            self._replay(resumed)
        first = defaults(space)
        second = longer_schedule(space, epochs=self.epoch_cap)
        done = [r.params for r in self.records]
        for point in (first, second):
            if point is not None and in_space(space, point) and point not in done:
                self.study.enqueue_trial(point)
        self._trial: dict[str, Any] = {}  # the trial in progress (its progress lines)

    # ------------------------------------------------------------------ the loop
    def run(self) -> list[TrialRecord]:
        started = (self.clock() if self.started is None else self.started) - self.used_before
        if not self.records:
            self.preparation_seconds = self.clock() - started
        repeats = 0
        note = ""  # the trial being asked is a shortened proposal (the epoch cap, or the time left)
        self._search_started = started
        while True:
            elapsed = self.clock() - started
            reason = self._stop(elapsed)
            if reason:
                self.stop_reason = reason
                break
            trial = self.study.ask()
            params = suggest(self.space, trial)
            key = tuple(sorted((k, repr(v)) for k, v in params.items()))
            if key not in self.seen and self.epoch_cap is not None and params.get("epochs", 0) > self.epoch_cap:
                capped = {**params, "epochs": self.epoch_cap}
                self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
                self.study.enqueue_trial(capped)
                note = (f"proposed with epochs={params['epochs']}, run with {self.epoch_cap}: the epochs' cap, which "
                        "doubles when the best trial is one that ran at it")
                continue
            reason = "" if key in self.seen else self._no_time_for(params, elapsed)
            if reason:  # proposed, not run: the study is in memory, nothing else sees the open trial
                shorter = self._shortened(params, elapsed)
                if shorter is None:
                    self.stop_reason = reason
                    break
                # the same point with fewer epochs, which fits: asked next (a failed proposal teaches TPE nothing)
                self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
                self.study.enqueue_trial(shorter)
                proposed = duration(self.expected_seconds(params))
                note = "; ".join(n for n in (note, (
                    f"proposed with epochs={params['epochs']} (~{proposed}), shortened to {shorter['epochs']} to end "
                    f"within the budget ({duration(self.budget.seconds - elapsed)} left)")) if n)
                log.info("the next proposal was %s", note.split("; ")[-1])
                continue
            number = len(self.records)
            if key in self.seen:  # training is deterministic: the same parameters give the same score
                repeats += 1
                record = self._repeat(trial, params, self.seen[key], number)
                if repeats >= MAX_REPEATS:
                    self.stop_reason = f"the search space is exhausted ({repeats} proposals in a row already tried)"
                    self.records.append(record)
                    break
            else:
                repeats = 0
                record = self._train(trial, params, number, note)
                if record.state in ("complete", "pruned"):
                    self.seen[key] = record
            if note:
                record.note = "; ".join(n for n in (note, record.note) if n and n not in record.note)
                note = ""
            self.records.append(record)
            self._grow_epoch_cap()
            self._log(record, self.clock() - started)
            self.save(self.clock() - started)
        self.seconds = self.clock() - started
        log.info("search ended after %d trial(s) in %s%s: %s", len(self.records), duration(self.seconds),
                 f" ({duration(self.preparation_seconds)} of it preparing the dev split and the mining probe)"
                 if self.preparation_seconds >= 1 else "", self.stop_reason)
        return self.records

    def _stop(self, elapsed: float) -> str:
        n = len(self.records)
        if self.budget.trials is not None:
            return f"the budget of {self.budget.describe()} is spent" if n >= self.budget.trials else ""
        if n == 0:
            return ""
        if elapsed >= self.budget.seconds:
            return f"the {self.budget.describe()} budget is spent ({duration(elapsed)} used)"
        return ""

    def _grow_epoch_cap(self) -> None:
        epochs = next((p for p in self.space if p.name == "epochs"), None)
        best = self.best()
        if epochs is None or best is None or self.epoch_cap >= epochs.high:
            return
        if best.params.get("epochs", 0) >= self.epoch_cap:
            self.epoch_cap = int(min(epochs.high, 2 * self.epoch_cap))
            log.info("the best trial (%d) ran at the epochs' cap: proposals may now run up to %d epochs",
                     best.number, self.epoch_cap)

    def _no_time_for(self, params: dict, elapsed: float) -> str:
        """A time budget starts a trial only when it is expected to end in time (`expected_seconds`). Per trial, not
        the median trial: trials of 1 and 6 epochs differ six-fold, and a median trial length let a 5-epoch trial
        start 17 minutes before the end of a 60-minute budget on MedQuAD and run 26."""
        if self.budget.seconds is None:
            return ""
        expected = self.expected_seconds(params)
        if expected is None:
            return ""
        if elapsed + expected > self.budget.seconds:
            shown = " ".join(f"{k}={fmt(v)}" for k, v in params.items())
            return (f"the next trial [{shown}] (~{duration(expected)}: {self._steps(params)} steps"
                    f"{self._cost_detail(params)}) would end after the {self.budget.describe()} budget "
                    f"({duration(elapsed)} used)")
        return ""

    def _shortened(self, params: dict, elapsed: float) -> dict | None:
        """A proposal that does not fit in the time left, with the most epochs that do (at least the epochs' lower
        bound), or None: nothing fits, or the epochs are not searched. Stopping at the first proposal that did not
        fit left 24 of SciFact's 60 minutes unused after a 7-epoch proposal (43.7 min expected, 23.7 left); the
        proposal's other values, at fewer epochs, are still a point of the space that the dev score can rank. Why
        the epochs: they set a trial's length (its steps, and its rounds of mining: one per epoch) without changing
        what a step is, where the negatives would change the loss the proposal asked for."""
        epochs = next((p for p in self.space if p.name == "epochs"), None)
        if epochs is None or "epochs" not in params or self.budget.seconds is None:
            return None
        for fewer in range(int(params["epochs"]) - 1, int(epochs.low) - 1, -1):
            candidate = {**params, "epochs": fewer}
            expected = self.expected_seconds(candidate)
            if expected is not None and elapsed + expected <= self.budget.seconds:
                return candidate
        return None

    def expected_seconds(self, params: dict) -> float | None:
        """A trial's expected length: optimizer steps (all its folds) x texts per example x the trials' median
        seconds per text and step, plus its paid rounds of online mining x a round's cost (the probe's estimate).
        Measured on MedQuAD's search: 6.4 s per step with no negative, 9.3 / 11.0 / 14.4 with 1 / 2 / 3 (about 3.1 s
        per text), so the cost follows the texts an example carries; a mining round re-encodes the pool, a cost of
        its own (minutes on SciFact's 5,183 abstracts), which the steps do not show. None before any trial ran."""
        per_text, steps = self._median_seconds_per_text(), self._steps(params)
        if per_text is None or steps is None:
            return None
        shape = self._shape(params)
        n = len(self.folds)
        training = n * (steps * shape["texts"] * per_text + self._paid_rounds(shape, steps) * self.mining_round_seconds)
        per_evaluation = self._median_seconds_per_evaluation()
        return training + (self._evaluations(steps) * per_evaluation if per_evaluation is not None else 0.0)

    def _evaluations(self, steps: int) -> int:
        """Dev evaluations a trial of `steps` steps per run makes: one per fold at its end, or (one split) one
        every eval_every steps and one after training."""
        if len(self.folds) > 1:
            return len(self.folds)
        every = self.base.training.eval_every
        return (steps // every if every else 0) + 1

    def _median_seconds_per_evaluation(self) -> float | None:
        """What a trial spends outside its optimizer steps and mining rounds, per dev evaluation: the evaluation
        itself, and the process start, loading and saving that come with each run (None when no trial reported its
        step time). Why it is measured apart: with few queries a fold's steps take seconds and its evaluation and
        start-up most of its time (100 MedQuAD queries: 3 steps and ~50 s per fold), and folded into a per-step
        rate it made a 9-step trial look like an hour and ended a 20-minute search after its first trial."""
        costs = [self._outside_steps(r) / r.evaluations for r in self.records
                 if r.state in ("complete", "pruned") and r.train_seconds is not None and r.evaluations]
        return statistics.median(costs) if costs else None

    def _outside_steps(self, record: TrialRecord) -> float:
        return max(0.0, record.seconds - record.train_seconds - self._mining_seconds(record))

    def _mining_seconds(self, record: TrialRecord) -> float:
        """The rounds of online mining the record's runs (its folds, or its one run) paid for, at the probe's cost."""
        runs = max(1, len(record.fold_scores)) if len(self.folds) > 1 else 1
        return runs * self._paid_rounds(self._shape(record.params), int(record.steps / runs)) * self.mining_round_seconds

    def _median_seconds_per_text(self) -> float | None:
        ran = [r for r in self.records if r.state in ("complete", "pruned") and r.steps]
        measured = [r for r in ran if r.train_seconds is not None]  # step time apart from the rest, where reported
        rates = [self._seconds_per_text(r) for r in (measured or ran)]
        return statistics.median(rates) if rates else None

    def _seconds_per_text(self, record: TrialRecord) -> float:
        shape = self._shape(record.params)
        if record.train_seconds is not None:  # the engine's own step time: evaluations and start-up apart
            return record.train_seconds / (record.steps * shape["texts"])
        # never below a tenth of the plain rate: an overestimated round must not make training look free
        training = max(record.seconds - self._mining_seconds(record), 0.1 * record.seconds)
        return training / (record.steps * shape["texts"])

    def _shape(self, params: dict) -> dict[str, Any]:
        """What a trial's recipe makes each step and epoch carry: texts per example (a bi-encoder's query, positive
        and negatives; a reranker's pairs: the positive's and each negative's) and whether / how often it re-mines."""
        changed = recipe_overrides(self.space, params)  # no recipe validated: a proposal may make an invalid one
        hard = changed.get("loss.hard_negatives", self.base.loss.hard_negatives)
        online = changed.get("mining.online", self.base.mining.online)
        per_example = 1 if self.base.task == "rerank" else 2
        return {"texts": per_example + int(hard), "online": bool(online), "every": self.base.mining.every}

    def _paid_rounds(self, shape: dict, steps: int) -> int:
        """Rounds of online mining a trial pays for in `steps` steps: one before every epoch after the first (or
        every N steps); the round before the first step reads the base model's pool embeddings that the probe
        cached."""
        if not shape["online"] or not steps or (shape["every"] == "epoch" and not self.steps_per_epoch):
            return 0
        return scheduled_rounds(shape["every"], False, steps, self.steps_per_epoch or steps)

    def _cost_detail(self, params: dict) -> str:
        shape = self._shape(params)
        detail = f" x {shape['texts']} texts at the trials' median {self._median_seconds_per_text():.2f} s per text"
        rounds = self._paid_rounds(shape, self._steps(params) or 0)
        if rounds:
            detail += f", {rounds} mining rounds of ~{duration(self.mining_round_seconds)}"
        if len(self.folds) > 1:
            detail += f", x {len(self.folds)} folds"
        per_evaluation = self._median_seconds_per_evaluation()
        if per_evaluation is not None:
            detail += (f", {self._evaluations(self._steps(params) or 0)} dev evaluations (with their start-up) of "
                       f"~{duration(per_evaluation)}")
        return detail

    def _trial_recipe(self, params: dict, output_dir: Path, number: int, fold: DevSplit | None = None) -> Recipe:
        """The trial's recipe: the base recipe with the parameters' overrides (ConfigError when they make an invalid
        recipe), training into `output_dir`, on `fold` (None: the base recipe's)."""
        changes = {**recipe_overrides(self.space, params), "training.output_dir": str(output_dir)}
        if fold is not None:
            changes.update({"data.train": fold.train_spec, "data.dev": fold.dev_spec})
            if fold.mining_corpus is not None:
                changes["mining.corpus"] = fold.mining_corpus
        return self.base.with_overrides(as_overrides(changes), source=f"trial {number}")

    def _steps(self, params: dict) -> int | None:
        """A trial's optimizer steps on one fold: training.max_steps, or its epochs x steps per epoch."""
        if self.base.training.max_steps:
            return int(self.base.training.max_steps)
        if self.steps_per_epoch is None:
            return None
        epochs = epochs_for(self.steps_per_epoch, int(params.get("epochs", self.base.training.epochs)),
                            self.base.training.min_steps)
        return epochs * self.steps_per_epoch

    def _repeat(self, trial, params: dict, earlier: TrialRecord, number: int) -> TrialRecord:
        TrialState = self.optuna.trial.TrialState
        if earlier.state == "complete":
            self.study.tell(trial, earlier.value)
        else:
            self.study.tell(trial, state=TrialState.PRUNED)
        return TrialRecord(number, params, "repeat", earlier.value if earlier.state == "complete" else None,
                           0.0, spread=earlier.spread, queries=earlier.queries, first_stage=earlier.first_stage,
                           note=f"same parameters as trial {earlier.number} (deterministic: not trained again)")

    # ------------------------------------------------------------------ one trial
    def _train(self, trial, params: dict, number: int, note: str = "") -> TrialRecord:
        TrialState = self.optuna.trial.TrialState
        out = self.output / TRIALS_DIR / f"trial-{number:03d}"
        t0 = self.clock()
        record = TrialRecord(number, params, "failed", None, 0.0)
        several = len(self.folds) > 1
        try:
            recipes = [self._trial_recipe(params, out / f"fold-{f}" if several else out, number,
                                          fold if several else None) for f, fold in enumerate(self.folds)]
        except ConfigError as exc:  # e.g. a mining window too small for the negatives: not this recipe's fault
            self.study.tell(trial, state=TrialState.FAIL)
            record.note = exc.one_line()
            return record
        total = self._steps(params)
        self._trial = {"record": record, "started": t0, "last_line": t0, "step": 0, "fold": 0, "total": total,
                       "note": note}
        shown = " ".join(f"{k}={fmt(v)}" for k, v in params.items())
        log.info("trial %d%s [%s]: %s%s", number, " (your recipe)" if number == 0 else "", shown,
                 f"{total} steps" if total else "training",
                 f" on each of {len(self.folds)} folds" if several else "")
        per_query: dict[str, float] = {}
        fold_first: list[tuple[float, int]] = []  # (first-stage score, queries) per fold
        steps = 0
        try:
            if self.trial_hook is not None:
                self.trial_hook(number)
            for f, recipe in enumerate(recipes):
                self._trial["fold"] = f
                result = run_job("trial", {**recipe_payload(recipe, f"trial {number}"), "verbose": self.verbose},
                                 isolate=self.isolate, on_event=lambda event: self._on_event(trial, event),
                                 on_idle=self._heartbeat, work=self.output / TRIALS_DIR)
                steps += result["steps"] or 0
                if result.get("train_seconds") is not None:
                    record.train_seconds = (record.train_seconds or 0.0) + result["train_seconds"]
                record.evaluations += 1 if several else len(record.history) + (1 if result.get("dev") else 0)
                if not several:
                    if self.objective_is_best and result["dev"]:  # the engine restored its dev-best step
                        record.value = float(result["dev"]["score"])
                        per_query = dict(result["dev"].get("per_query") or {})
                    else:
                        record.value = float(record.history[-1]["score"])
                        per_query = dict(self._trial.get("per_query") or {})
                    record.first_stage = self._trial.get("first_stage")
                    continue
                dev = result["dev"] or {}
                if dev.get("first_stage") is not None:  # pooled as the two-stage score is: weighted by queries
                    fold_first.append((dev["first_stage"], len(dev.get("per_query") or {}) or 1))
                fold_scores = dev.get("per_query") or {}
                record.fold_scores.append(float(dev.get("score", 0.0)))
                per_query.update({f"{f}:{q}": s for q, s in fold_scores.items()})
                pooled = statistics.fmean(per_query.values()) if per_query else record.fold_scores[-1]
                point = PROGRESS_SCALE * (f + 1)
                record.history.append({"step": steps, "score": pooled, "point": point, "fold": f})
                self._progress_line(f"fold {f + 1}/{len(self.folds)}: dev {dev.get('score', float('nan')):.4f}; "
                                    f"pooled so far {pooled:.4f}" + self._pm(list(per_query.values()))
                                    + f" over {len(per_query)} queries")
                trial.report(pooled, point)
                if 0 < f < len(recipes) - 1 and trial.should_prune():  # never after the first fold or the last
                    record.pruned_at = steps
                    raise JobPruned(steps)
            record.steps = steps
            if several:
                record.value = statistics.fmean(per_query.values()) if per_query else statistics.fmean(
                    record.fold_scores)
                if fold_first:
                    record.first_stage = sum(s * n for s, n in fold_first) / sum(n for _, n in fold_first)
            record.state = "complete"
            if per_query:
                record.per_query = per_query
                record.spread, record.queries = spread(list(per_query.values())), len(per_query)
            self.study.tell(trial, record.value)
        except JobPruned as stop:
            record.state = "pruned"
            record.steps = record.pruned_at = (steps + stop.step) if not several else stop.step
            self.study.tell(trial, state=TrialState.PRUNED)
        except JobFailed as exc:
            self.study.tell(trial, state=TrialState.FAIL)
            if exc.kind not in ("OutOfMemoryError", "MemoryError", "exit"):
                raise EmbedkitError(f"trial {number} failed: {exc.message}", exit_code=1) from None
            record.note = "out of memory" if "Memory" in exc.kind else exc.message
        except Exception as exc:
            import torch

            self.study.tell(trial, state=TrialState.FAIL)
            if not isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            record.note = "out of GPU memory"
        finally:
            record.total_steps = total
            record.seconds = self.clock() - t0
            self._trial = {}
            if not self.keep_trials:
                for folder in [out] + [out / f"fold-{f}" for f in range(len(self.folds))]:
                    shutil.rmtree(work_dir(folder), ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
        return record

    def _on_event(self, trial, event: dict) -> bool | None:
        """A trial's event: its steps (progress), its dev evaluations (history, pruner; the answer: prune?)."""
        state = self._trial
        if event["event"] == "step":
            state["step"] = event["step"]
            self._heartbeat()
            return None
        if event["event"] != "eval":
            return None
        record, step, total = state["record"], event["step"], event["total"]
        state["step"], state["total"] = step, total
        state["per_query"] = event.get("per_query")
        state["first_stage"] = event.get("first_stage")
        point = round(PROGRESS_SCALE * step / total)  # the same point of the schedule
        record.history.append({"step": step, "score": event["score"], "point": point})
        epoch = f"epoch {-(-step // self.steps_per_epoch)}, " if self.steps_per_epoch else ""
        self._progress_line(f"{epoch}step {step}/{total}: dev {event['score']:.4f}"
                            + self._pm(list((event.get("per_query") or {}).values())))
        if len(self.folds) > 1:
            return False  # folds are pruned between folds, on the pooled score
        trial.report(event["score"], point)
        if len(record.history) > 1 and step < total and trial.should_prune():  # never at the first or the last
            record.pruned_at = step
            return True
        return False

    @staticmethod
    def _pm(scores: list[float]) -> str:
        se = spread(scores) if scores else None
        return f" ± {se:.4f}" if se is not None else ""

    def _heartbeat(self) -> None:
        state = self._trial
        if state and self.clock() - state["last_line"] >= HEARTBEAT_SECONDS:
            step, total = state["step"], state["total"]
            doing = (" (loading, mining or evaluating)" if not step else
                     " (evaluating on dev, saving)" if total and step >= total else "")
            self._progress_line(f"step {step}/{total or '?'}{doing}")

    def _progress_line(self, what: str) -> None:
        """"trial 3 [fold 2/5]: <what>; 2.1 min in, trial ~3.0 min to go; search ~25 min left" """
        state = self._trial
        now = self.clock()
        state["last_line"] = now
        record, total, folds = state["record"], state["total"], len(self.folds)
        in_trial = now - state["started"]
        done = state["fold"] * (total or 0) + state["step"]
        if total and done:
            eta = f", trial ~{duration(in_trial * (folds * total - done) / done)} to go"
        else:
            eta = ""
        log.info("trial %d%s: %s; %s in%s; %s", record.number,
                 f" fold {state['fold'] + 1}/{folds}" if folds > 1 and not what.startswith("fold") else "",
                 what, duration(in_trial), eta, self._search_left(now))

    def _search_left(self, now: float) -> str:
        elapsed = now - getattr(self, "_search_started", now)
        if self.budget.seconds is not None:
            return f"search {duration(max(0.0, self.budget.seconds - elapsed))} of {self.budget.describe()} left"
        finished = [r.seconds for r in self.records if r.state != "repeat"]
        left = self.budget.trials - len(self.records) - 1
        if finished and left > 0:
            return f"search ~{duration(left * statistics.fmean(finished))} more ({left} trials after this one)"
        return f"trial {len(self.records) + 1} of {self.budget.describe()}"

    def _log(self, record: TrialRecord, elapsed: float) -> None:
        best = self.best()
        record.best_so_far = best.value if best is not None else None
        shown = " ".join(f"{k}={fmt(v)}" for k, v in record.params.items())
        used = (f"; {duration(elapsed)} of {self.budget.describe()}" if self.budget.seconds is not None
                else f"; {len(self.records)} of {self.budget.describe()}")
        tag = " (your recipe)" if record.number == 0 else ""
        if record.state in ("complete", "repeat") and record.value is not None and best is not None:
            log.info("trial %d%s [%s]: dev %.4f%s (best %.4f, trial %d) in %s%s%s", record.number, tag, shown,
                     record.value, f" ± {record.spread:.4f}" if record.spread else "", best.value, best.number,
                     duration(record.seconds), used, f"; {record.note}" if record.note else "")
        elif record.state == "repeat":
            log.info("trial %d [%s]: %s (pruned then)%s", record.number, shown, record.note, used)
        elif record.state == "pruned":
            log.info("trial %d%s [%s]: pruned at step %d (dev %.4f, below the median at that point of the "
                     "schedule) in %s%s", record.number, tag, shown, record.pruned_at or 0,
                     record.history[-1]["score"] if record.history else float("nan"), duration(record.seconds), used)
        else:
            log.info("trial %d [%s]: failed (%s)%s", record.number, shown, record.note, used)

    # ------------------------------------------------------------------ the result
    def best(self) -> TrialRecord | None:
        done = [r for r in self.records if r.state == "complete"]
        return max(done, key=lambda r: (r.value, -r.number)) if done else None

    def choice(self) -> tuple[TrialRecord | None, str]:
        """The trial whose parameters go into the tuned recipe, and why. The best trial, unless the recipe as
        written (trial 0) scored the same dev queries and the best is not better than it by NOISE_Z standard
        errors of the paired difference: then the recipe as written, since the search cannot tell them apart."""
        best = self.best()
        first = next((r for r in self.records if r.number == 0 and r.state == "complete"), None)
        if best is None or first is None or best is first or not (best.per_query and first.per_query):
            return best, ""
        gain, se, n = paired_difference(best.per_query, first.per_query)
        if se is None or gain > NOISE_Z * se:
            return best, (f"trial {best.number} beats your recipe by {gain:+.4f} on {n} dev queries"
                          + (f", more than {NOISE_Z:g} standard errors ({NOISE_Z * se:.4f})" if se else ""))
        return first, (f"trial {best.number} scored {gain:+.4f} over your recipe on {n} dev queries, within the noise "
                       f"({NOISE_Z:g} standard errors of the paired difference: {NOISE_Z * se:.4f}): your recipe "
                       "stays")

    # ------------------------------------------------------------------ --resume
    def save(self, elapsed: float) -> None:
        write_json(self.output / SEARCH_STATE, {
            **self.state, "elapsed": elapsed, "preparation_seconds": self.preparation_seconds,
            "epoch_cap": self.epoch_cap, "trials": [asdict(r) for r in self.records]})

    def _replay(self, resumed: dict[str, Any]) -> None:
        """The trials of an interrupted run, told to the sampler and the pruner as they ended."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        TrialState = self.optuna.trial.TrialState
        self.used_before = float(resumed["elapsed"])
        self.preparation_seconds = float(resumed.get("preparation_seconds", 0.0))
        self.epoch_cap = resumed.get("epoch_cap", self.epoch_cap)
        by_name = {p.name: p for p in self.space}
        for raw in resumed["trials"]:
            record = TrialRecord(**raw)
            self.records.append(record)
            if record.state not in ("complete", "pruned"):
                continue
            key = tuple(sorted((k, repr(v)) for k, v in record.params.items()))
            self.seen.setdefault(key, record)
            distributions = {}
            for name in record.params:
                p = by_name[name]
                if p.kind == "choice":
                    distributions[name] = CategoricalDistribution(list(p.choices))
                elif p.kind == "int":
                    distributions[name] = IntDistribution(int(p.low), int(p.high))
                else:
                    distributions[name] = FloatDistribution(p.low, p.high, log=p.kind == "log")
            complete = record.state == "complete"
            self.study.add_trial(self.optuna.trial.create_trial(
                params=record.params, distributions=distributions, value=record.value if complete else None,
                state=TrialState.COMPLETE if complete else TrialState.PRUNED,
                intermediate_values={int(h["point"]): h["score"] for h in record.history if "point" in h}))
        log.info("--resume: %d trial(s) of the interrupted search (%s of the budget used)", len(self.records),
                 duration(self.used_before))
