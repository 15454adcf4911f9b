"""`embedkit tune`: search a recipe's parameters on a dev split, train the final model, write the recipe and a report.

    from embedkit.tune import tune
    result = tune("recipes/minilm-scifact.yaml", budget="30m", output="runs/scifact-tune",
                  test="beir:../shared/data/scifact:test")

The steps:

1. the recipe is read (with `--set` overrides) and checked as `embedkit train --check` would; a `data.dev` or a
   test task that shares a qrels file, a query id or a query text with the other or with the training data is
   refused (embedkit/tune/leakage.py): the search and the engine's dev-best step choose on dev, so a dev set that
   is the test would make the test comparison measure the choice. The test is read then only to be checked;
2. the dev split (embedkit/tune/split.py): carved from the training queries (query-disjoint, seeded), its corpus
   the dev positives, the documents the base model ranks nearest to them and a random rest; or the recipe's
   `data.dev`;
3. when the recipe mines (`mining.online`), the base model mines the training queries once with the recipe's
   settings; when the margin leaves most rows without a negative, the margin joins the search. A recipe with no
   negatives at all gets the same probe with the default mining settings, and `mined_negatives` (0 = as written,
   1..3 = mine online) joins the search with the window (and the margin when flagged) as dependent parameters;
4. the search (Optuna): a seeded TPE sampler proposes parameters (embedkit/tune/space.py), one trial at a time, so a
   fixed seed gives the same trials. Trial 0 is the recipe as written, trial 1 the recipe trained longer at a
   larger lr with a mined negative (space.longer_schedule: the two ends of the schedule before TPE's random
   start). Every trial trains through the training engine (`embedkit.train.contrastive.train`) on the training
   part; the engine's dev evaluations (once per epoch by
   default) feed a median pruner, which stops a trial whose dev score falls below the median of the finished
   trials at the same point of their schedules (never at the first evaluation, never at the last). The point is
   the fraction of the trial's own steps, not the step number: a 3-epoch trial one epoch in is still at a high
   learning rate, and judged against 1-epoch trials that have finished their decay it would be pruned for being
   longer, not worse (the first search on MedQuAD did exactly that to the lr / epochs that won on test). A trial's
   score is the dev score of the weights the final run will end with: the last step's (no dev set in the final run), or, when the recipe
   brings its own data.dev and eval_every, the dev-best step's (the engine restores it);
5. the budget: a number of trials, or a time within which a trial starts only when it is expected to end in time.
   A time budget counts from the start of `tune`: carving the dev split (ranking its corpus with the base model)
   and the mining probe spend it too (minutes on 2 cores), so `--budget 60m` is an hour of wall clock to the chosen
   recipe; the final training and the test evaluation come after it, their length set by the recipe chosen
   (expected: its optimizer steps x the texts per example at the trials' median seconds per text, plus its paid
   rounds of online mining at the probe's measured cost: `Search.expected_seconds`); a proposal that would end
   late runs with the most epochs that fit (`Search._shortened`), and the search stops when not even the fewest do;
6. the best trial's parameters go into the recipe (everything else as the user wrote it, `training.output_dir` =
   OUTPUT/model), written to OUTPUT/tuned_recipe.yaml, which is then trained as `embedkit train` would train it, on
   all the training data (the carved dev queries included): `embedkit train OUTPUT/tuned_recipe.yaml` gives the same
   weights;
7. with a test task: the base model, the default recipe's model (trained on the same data) and the tuned model are
   evaluated on it (the first time anything scores it) and compared with `embedkit compare` (difference, 95%
   interval, p(improvement));
8. the report: tune_report.md / .json (trials, the search space, the dev split, the choice) and dev_curve.png.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from embedkit.device import free_memory, resolve_device, torch_threads
from embedkit.errors import ConfigError, EmbedkitError
from embedkit.train.config import (DataSection, Recipe, apply_overrides, format_override, load_recipe, override_value,
                                   parse_recipe, read_recipe_file, validate_recipe, warn_if_dev_is_test)
from embedkit.train.remining import scheduled_rounds
from embedkit.tune.budget import Budget, parse_budget
from embedkit.tune.space import (Param, build_space, can_turn_on_mining, defaults, in_space, longer_schedule,
                                 recipe_overrides, suggest)
from embedkit.tune.split import DevSplit, carve_dev_split, given_dev_split

log = logging.getLogger("embedkit.tune")

RECIPE_NAME = "tuned_recipe.yaml"
MODEL_DIR = "model"
TRIALS_DIR = "trials"
SPLIT_DIR = "split"
TPE_STARTUP_TRIALS = 4  # random proposals (trial 0 = the recipe included) before TPE models the results
PRUNER_STARTUP_TRIALS = 2  # finished trials needed before any pruning
PROGRESS_SCALE = 1000  # the pruner compares trials at step / total steps, in thousandths
MAX_REPEATS = 20  # consecutive proposals already tried: the space is exhausted
CHUNK_ROWS = 65536  # documents per block of the dev ranking's exact search
ROUND_SAMPLE = 128  # texts of each kind timed to estimate a mining round (a few seconds on 2 cores)


@dataclass
class TrialRecord:
    number: int
    params: dict[str, Any]
    state: str  # "complete" | "pruned" | "failed" | "repeat"
    value: float | None  # the dev score the trial is judged by (complete and repeat trials)
    seconds: float
    steps: int | None = None  # optimizer steps run
    total_steps: int | None = None
    history: list[dict] = field(default_factory=list)  # [{"step", "score"}] of the dev evaluations
    pruned_at: int | None = None
    best_so_far: float | None = None
    note: str = ""

    def last_score(self) -> float | None:
        return self.history[-1]["score"] if self.history else self.value


@dataclass
class TuneResult:
    output: Path
    recipe_path: Path
    model_dir: Path | None
    best: TrialRecord
    trials: list[TrialRecord]
    split: DevSplit
    space: list[Param]
    report: dict[str, Any]


def as_overrides(values: dict[str, Any]) -> list[str]:
    """{dotted key: value} as the "KEY=VALUE" overrides `--set` takes (`BaseRecipe.with_overrides`,
    `apply_overrides`), each reading back as its value."""
    return [format_override(key, value) for key, value in values.items()]


def steps_per_epoch(n_examples: int, recipe) -> int:
    t = recipe.training
    batches = n_examples // t.batch_size if t.drop_last else -(-n_examples // t.batch_size)
    return max(1, -(-max(batches, 1) // t.gradient_accumulation))


@contextlib.contextmanager
def _quiet_training(verbose: bool):
    """The trials' own engine lines (step counts, dev scores) only with --verbose; warnings always."""
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("embedkit.train")
    before, bars = logger.level, hf_logging.is_progress_bar_enabled()
    if not verbose:
        logger.setLevel(logging.WARNING)
        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" of every trial
    try:
        yield
    finally:
        logger.setLevel(before)
        if bars:
            hf_logging.enable_progress_bar()


def mining_probe(recipe, device) -> dict[str, Any]:
    """Mine the training queries once with the base model and the recipe's settings (what a trial's first round
    of online mining does; the corpus embeddings go to the cache that round reads). Returns the statistics and the
    margin warning, if any."""
    import torch

    from embedkit.mine.core import margin_warning
    from embedkit.mine.online import remine
    from embedkit.train.contrastive import build_encoder, load_examples
    from embedkit.train.remining import OnlineMiner

    device = resolve_device(device, field="model.device")
    try:
        with torch_threads(recipe.training.threads):
            started = time.perf_counter()
            examples, _ = load_examples(recipe)
            miner = OnlineMiner(recipe, examples)
            encoder = build_encoder(recipe, device)
            with torch.random.fork_rng():
                remine(encoder, miner.state, use_cache=True)
            round_seconds = mining_round_seconds(encoder, miner.state.task, miner.settings.batch_size)
            del encoder
    finally:
        free_memory()
    stats = miner.state.last_stats.to_dict()
    warning = margin_warning(stats, miner.settings.to_dict(), names="recipe")
    several = bool((miner.state.task.pos_ptr[1:] - miner.state.task.pos_ptr[:-1]).max() > 1)
    return {"stats": {k: stats[k] for k in ("queries", "pairs", "candidates_in_window", "removed", "survivors",
                                             "rows_short", "rows_without_negative", "positive_scores")},
            "settings": miner.settings.to_dict(), "warning": warning, "several_positives": several,
            "seconds": round(time.perf_counter() - started, 1), "round_seconds": round(round_seconds, 1)}


def mining_round_seconds(encoder, task, batch_size: int, sample: int = ROUND_SAMPLE) -> float:
    """What one round of online mining will cost a trial: the pool's documents and the training queries encoded
    again (the search is small beside it), estimated from `sample` of each encoded now, evenly spaced, uncached.
    The probe's own round may have come from the embedding cache, and a trial's later rounds cannot (the weights
    have moved): on SciFact a round encodes 5,183 abstracts, minutes on 2 cores, so a trial that re-mines every
    epoch spends as long mining as training, and the time budget has to know it."""
    import numpy as np

    seconds = 0.0
    for texts, kind in ((task.corpus_texts, "document"), (list(task.query_texts), "query")):
        if not len(texts):
            continue
        picks = np.unique(np.linspace(0, len(texts) - 1, min(sample, len(texts))).astype(int))
        started = time.perf_counter()
        encoder.encode([texts[i] for i in picks], kind=kind, batch_size=batch_size, normalize=True)
        seconds += (time.perf_counter() - started) * len(texts) / len(picks)
    return seconds


def base_model_ranker(recipe, device) -> Callable[[list[str], list[str], int], list[list[int]]]:
    """rank(queries, documents, k) with the recipe's base model (its prompts, pooling and max length, as the dev
    evaluation encodes them): the dev corpus's nearest documents (embedkit/tune/split.py). The documents'
    embeddings go to the embedding cache (`embedkit eval`'s and `embedkit mine`'s), so a second `tune` of the same
    data does not encode them again (MedQuAD's 14,070 answers: 6 min on 2 cores)."""
    from embedkit.mine.cache import corpus_vectors
    from embedkit.mine.search import exact_topk
    from embedkit.models.encoder import load_model

    def rank(queries, documents, k):
        m = recipe.model
        started = time.perf_counter()
        try:
            with torch_threads(recipe.training.threads):
                encoder = load_model(m.name, pooling=m.pooling, prompts=m.prompts, max_length=m.max_length,
                                     dtype=m.dtype, padding_side=m.padding_side, attention=m.attention,
                                     device=str(resolve_device(device, field="model.device")))
                log.info("ranking %d documents for the %d dev queries with the base model (the dev corpus: their "
                         "nearest documents)", len(documents), len(queries))
                batch = recipe.data.dev_batch_size
                q = encoder.encode(list(queries), kind="query", batch_size=batch, normalize=True)
                # positional ids: the documents come in the same (seeded) order on a rerun, and the key hashes texts
                ids = [str(i) for i in range(len(documents))]
                with corpus_vectors(encoder, ids, list(documents), batch_size=batch) as (source, info):
                    if info["cached"]:
                        log.info("the documents' base-model embeddings come from the cache (%s)", info["path"])
                    # the miner's exact search: best first, ties by document position (the same on every machine)
                    _, top = exact_topk(q, source, min(k, len(documents)), chunk_rows=CHUNK_ROWS)
                del encoder
        finally:
            free_memory()
        ranked = [[int(i) for i in row if i >= 0] for row in top]
        log.info("ranked in %s", _duration(time.perf_counter() - started))
        return ranked

    return rank


class Search:
    """The trials: ask the sampler, train, report to the pruner, tell the result; the budget decides when to stop."""

    def __init__(self, base: Recipe, space: list[Param], *, output: Path, seed: int, budget: Budget,
                 objective_is_best: bool, verbose: bool, clock: Callable[[], float] = time.monotonic,
                 trial_hook: Callable[[int], None] | None = None, keep_trials: bool = False,
                 steps_per_epoch: int | None = None, mining_round_seconds: float | None = None,
                 started: float | None = None) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.base, self.space, self.output, self.seed, self.budget = base, space, output, seed, budget
        self.objective_is_best, self.verbose, self.clock, self.trial_hook = objective_is_best, verbose, clock, trial_hook
        self.keep_trials, self.steps_per_epoch = keep_trials, steps_per_epoch
        self.mining_round_seconds = mining_round_seconds or 0.0
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS)
        self.pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS)
        self.study = optuna.create_study(direction="maximize", sampler=sampler, pruner=self.pruner)
        self.records: list[TrialRecord] = []
        self.seen: dict[tuple, TrialRecord] = {}
        self.stop_reason = ""
        self.seconds = 0.0
        self.started = started  # when the budget's clock started (tune's start: the preparation counts); None: now
        self.preparation_seconds = 0.0
        first = defaults(space)
        if in_space(space, first):
            self.study.enqueue_trial(first)
        second = longer_schedule(space)
        if second is not None and in_space(space, second):
            self.study.enqueue_trial(second)

    # ------------------------------------------------------------------ the loop
    def run(self) -> list[TrialRecord]:
        started = self.clock() if self.started is None else self.started
        self.preparation_seconds = self.clock() - started
        repeats = 0
        shortened_note = ""  # the trial being asked is a shortened proposal (see _shortened)
        while True:
            elapsed = self.clock() - started
            reason = self._stop(elapsed)
            if reason:
                self.stop_reason = reason
                break
            trial = self.study.ask()
            params = suggest(self.space, trial)
            key = tuple(sorted((k, repr(v)) for k, v in params.items()))
            reason = "" if key in self.seen else self._no_time_for(params, elapsed)
            if reason:  # proposed, not run: the study is in memory, nothing else sees the open trial
                shorter = self._shortened(params, elapsed)
                if shorter is None:
                    self.stop_reason = reason
                    break
                # the same point with fewer epochs, which fits: asked next (a failed proposal teaches TPE nothing)
                self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
                self.study.enqueue_trial(shorter)
                proposed = _duration(self.expected_seconds(params))
                shortened_note = (f"proposed with epochs={params['epochs']} (~{proposed}), shortened to "
                                  f"{shorter['epochs']} to end within the budget "
                                  f"({_duration(self.budget.seconds - elapsed)} left)")
                log.info("the next proposal %s", shortened_note)
                continue
            if key in self.seen:  # training is deterministic: the same parameters give the same score
                repeats += 1
                record = self._repeat(trial, params, self.seen[key])
                if repeats >= MAX_REPEATS:
                    self.stop_reason = f"the search space is exhausted ({repeats} proposals in a row already tried)"
                    self.records.append(record)
                    break
            else:
                repeats = 0
                record = self._train(trial, params)
                if record.state in ("complete", "pruned"):
                    self.seen[key] = record
            if shortened_note:
                record.note = "; ".join(n for n in (shortened_note, record.note) if n)
                shortened_note = ""
            self.records.append(record)
            self._log(record, self.clock() - started)
        self.seconds = self.clock() - started
        log.info("search ended after %d trial(s) in %s%s: %s", len(self.records), _duration(self.seconds),
                 f" ({_duration(self.preparation_seconds)} of it preparing the dev split and the mining probe)"
                 if self.preparation_seconds >= 1 else "", self.stop_reason)
        return self.records

    def _stop(self, elapsed: float) -> str:
        n = len(self.records)
        if self.budget.trials is not None:
            return f"the budget of {self.budget.describe()} is spent" if n >= self.budget.trials else ""
        if n == 0:
            return ""
        if elapsed >= self.budget.seconds:
            return f"the {self.budget.describe()} budget is spent ({_duration(elapsed)} used)"
        return ""

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
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in params.items())
            return (f"the next trial [{shown}] (~{_duration(expected)}: {self._steps(params)} steps"
                    f"{self._cost_detail(params)}) would end after the {self.budget.describe()} budget "
                    f"({_duration(elapsed)} used)")
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
        """A trial's expected length: optimizer steps x texts per example x the trials' median seconds per text and
        step, plus its paid rounds of online mining x a round's cost (the probe's estimate). Measured on MedQuAD's
        search: 6.4 s per step with no negative, 9.3 / 11.0 / 14.4 with 1 / 2 / 3 (about 3.1 s per text), so the
        cost follows the texts an example carries; a mining round re-encodes the pool, a cost of its own (minutes
        on SciFact's 5,183 abstracts), which the steps do not show. None before any trial has run."""
        per_text, steps = self._median_seconds_per_text(), self._steps(params)
        if per_text is None or steps is None:
            return None
        shape = self._shape(params)
        return steps * shape["texts"] * per_text + self._paid_rounds(shape, steps) * self.mining_round_seconds

    def _median_seconds_per_text(self) -> float | None:
        rates = [self._seconds_per_text(r) for r in self.records if r.state in ("complete", "pruned") and r.steps]
        return statistics.median(rates) if rates else None

    def _seconds_per_text(self, record: TrialRecord) -> float:
        shape = self._shape(record.params)
        mining = self._paid_rounds(shape, record.steps) * self.mining_round_seconds
        # never below a tenth of the plain rate: an overestimated round must not make training look free
        training = max(record.seconds - mining, 0.1 * record.seconds)
        return training / (record.steps * shape["texts"])

    def _shape(self, params: dict) -> dict[str, Any]:
        """What a trial's recipe makes each step and epoch carry: texts per example (query, positive, negatives)
        and whether / how often it re-mines."""
        changed = recipe_overrides(self.space, params)  # no recipe validated: a proposal may make an invalid one
        hard = changed.get("loss.hard_negatives", self.base.loss.hard_negatives)
        online = changed.get("mining.online", self.base.mining.online)
        return {"texts": 2 + int(hard), "online": bool(online), "every": self.base.mining.every}

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
            detail += f", {rounds} mining rounds of ~{_duration(self.mining_round_seconds)}"
        return detail

    def _trial_recipe(self, params: dict, output_dir: Path, number: int) -> Recipe:
        """The trial's recipe: the base recipe with the parameters' overrides (ConfigError when they make an invalid
        recipe), training into `output_dir`."""
        overrides = as_overrides({**recipe_overrides(self.space, params), "training.output_dir": str(output_dir)})
        return self.base.with_overrides(overrides, source=f"trial {number}")

    def _steps(self, params: dict) -> int | None:
        """A trial's optimizer steps: training.max_steps, or its epochs (searched or the recipe's) x steps per epoch."""
        if self.base.training.max_steps:
            return int(self.base.training.max_steps)
        if self.steps_per_epoch is None:
            return None
        epochs = params.get("epochs", self.base.training.epochs)
        return int(epochs) * self.steps_per_epoch

    def _repeat(self, trial, params: dict, earlier: TrialRecord) -> TrialRecord:
        TrialState = self.optuna.trial.TrialState
        if earlier.state == "complete":
            self.study.tell(trial, earlier.value)
        else:
            self.study.tell(trial, state=TrialState.PRUNED)
        return TrialRecord(trial.number, params, "repeat", earlier.value if earlier.state == "complete" else None,
                           0.0, note=f"same parameters as trial {earlier.number} (deterministic: not trained again)")

    def _train(self, trial, params: dict) -> TrialRecord:
        from embedkit.train.contrastive import train
        from embedkit.train.engine import work_dir

        TrialState = self.optuna.trial.TrialState
        out = self.output / TRIALS_DIR / f"trial-{trial.number:03d}"
        t0 = self.clock()
        record = TrialRecord(trial.number, params, "failed", None, 0.0)
        try:
            recipe = self._trial_recipe(params, out, trial.number)
        except ConfigError as exc:  # e.g. a mining window too small for the negatives: not this recipe's fault
            self.study.tell(trial, state=TrialState.FAIL)
            record.note = exc.one_line()
            return record
        history: list[dict] = []

        def on_eval(step: int, result: dict, total: int) -> None:
            history.append({"step": step, "score": result["score"]})
            record.total_steps = total
            trial.report(result["score"], round(PROGRESS_SCALE * step / total))  # same point of the schedule
            if len(history) > 1 and step < total and trial.should_prune():  # never at the first or the last
                record.pruned_at = step
                raise self.optuna.TrialPruned(f"pruned at step {step}")

        try:
            if self.trial_hook is not None:
                self.trial_hook(trial.number)
            with _quiet_training(self.verbose):
                result = train(recipe, on_eval=on_eval)
            value = result.dev["score"] if self.objective_is_best and result.dev else history[-1]["score"]
            record.state, record.value, record.steps = "complete", float(value), result.steps
            self.study.tell(trial, record.value)
        except self.optuna.TrialPruned:
            record.state, record.steps = "pruned", record.pruned_at
            self.study.tell(trial, state=TrialState.PRUNED)
        except Exception as exc:
            import torch

            if not isinstance(exc, torch.cuda.OutOfMemoryError):
                self.study.tell(trial, state=TrialState.FAIL)
                raise
            record.note = "out of GPU memory"
            self.study.tell(trial, state=TrialState.FAIL)
        finally:
            record.history = history
            record.seconds = self.clock() - t0
            if not self.keep_trials:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(work_dir(out), ignore_errors=True)
            free_memory()
        return record

    def _log(self, record: TrialRecord, elapsed: float) -> None:
        best = self.best()
        record.best_so_far = best.value if best is not None else None
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in record.params.items())
        used = (f"; {_duration(elapsed)} of {self.budget.describe()}" if self.budget.seconds is not None
                else f"; {len(self.records)} of {self.budget.describe()}")
        tag = " (your recipe)" if record.number == 0 else ""
        if record.state in ("complete", "repeat") and record.value is not None and best is not None:
            log.info("trial %d%s [%s]: dev %.4f (best %.4f, trial %d) in %s%s%s", record.number, tag, shown,
                     record.value, best.value, best.number, _duration(record.seconds), used,
                     f"; {record.note}" if record.note else "")
        elif record.state == "repeat":
            log.info("trial %d [%s]: %s (pruned then)%s", record.number, shown, record.note, used)
        elif record.state == "pruned":
            log.info("trial %d%s [%s]: pruned at step %d of %d (dev %.4f, below the median at that point of the "
                     "schedule) in %s%s",
                     record.number, tag, shown, record.pruned_at, record.total_steps or 0,
                     record.history[-1]["score"], _duration(record.seconds), used)
        else:
            log.info("trial %d [%s]: failed (%s)%s", record.number, shown, record.note, used)

    def best(self) -> TrialRecord | None:
        done = [r for r in self.records if r.state == "complete"]
        return max(done, key=lambda r: (r.value, -r.number)) if done else None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


# ---------------------------------------------------------------------------------------------------- tune
def tune(recipe_path: str | Path, *, budget: str | Budget, output: str | Path | None = None,
         overrides: list[str] | None = None, seed: int | None = None, device: str | None = None,
         test: str | None = None, dev_fraction: float = 0.2, max_dev_queries: int = 500, dev_docs: int = 1000,
         evals_per_epoch: int = 1, params: list[str] | None = None, final: bool = True, keep_trials: bool = False,
         nearest_dev: bool = True, allow_train_overlap: bool = False,
         verbose: bool = False, clock: Callable[[], float] = time.monotonic,
         trial_hook: Callable[[int], None] | None = None) -> TuneResult:
    """Tune `recipe_path` within `budget`; see the module docstring. Returns where everything went.

    `allow_train_overlap`: accept `test` query texts that are also training queries (a public split that repeats
    a few); they stay out of the carved dev split. A dev or test set that otherwise overlaps is refused
    (embedkit/tune/leakage.py)."""
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    budget_started = clock()  # the preparation below (ranking the dev corpus, the mining probe) spends the budget too
    if evals_per_epoch < 1:
        raise ConfigError("evals per epoch must be at least 1", field="--evals-per-epoch")
    if max_dev_queries < 1:
        raise ConfigError("at least one dev query is needed", field="--max-dev-queries")
    if dev_docs < 0:
        raise ConfigError("the dev corpus size must be >= 0 (0: the whole pool)", field="--dev-docs")
    recipe_path = Path(recipe_path)
    overrides = list(overrides or [])
    if device is not None:
        overrides.append(f"model.device={device}")
    # Read once: the typed recipe, which the trials, the probe and the default run edit (Recipe.with_overrides), and
    # its YAML mapping, from which only the tuned recipe is written (the user's keys, in the user's order).
    raw, text = read_recipe_file(recipe_path, overrides)
    recipe = parse_recipe(copy.deepcopy(raw), source=recipe_path, text=text)
    validate_recipe(recipe, source=recipe_path)  # every mistake in the recipe fails here, naming file and field
    if recipe.fsdp.enabled:
        raise ConfigError("tune runs its trials in one process; fsdp needs several (train the tuned recipe with "
                          "--nproc afterwards)", path=recipe_path, field="fsdp.enabled")
    if params:  # a choice this recipe can never search (with or without negatives in its data) fails now
        try:
            build_space(recipe, margin_flagged=True, several_positives=True, negatives_in_data=0, only=params)
        except ConfigError:
            build_space(recipe, margin_flagged=True, several_positives=True, negatives_in_data=1 << 20, only=params)
    output = Path(output) if output is not None else Path(f"{recipe.training.output_dir}-tune")
    if output.resolve() == Path(recipe.training.output_dir).resolve():
        raise ConfigError("the tune output folder must differ from the recipe's training.output_dir",
                          field="--output")
    test_spec = None
    keep_out_of_dev: set[str] = set()
    if test is not None or recipe.data.dev:
        # The test is read here to be validated and compared with the other sets, never scored before step 7.
        from embedkit.eval.tasks import load_task, parse_task_spec
        from embedkit.tune.leakage import check_held_out, task_side, training_side

        warn_if_dev_is_test(recipe, source=recipe_path)
        test_side = None
        if test is not None:
            test_spec = parse_task_spec(test)
            test_side = task_side("--test", load_task(test_spec))  # a bad test set fails now, not after the search
        dev_side = task_side("data.dev", load_task(parse_task_spec(recipe.data.dev))) if recipe.data.dev else None
        keep_out_of_dev = check_held_out(training_side(recipe), dev_side, test_side, source=recipe_path,
                                         allow_train_overlap=allow_train_overlap)
        if keep_out_of_dev:
            log.warning("%d query texts of %s are also training queries (--allow-train-overlap): they train every "
                        "model compared alike, and stay out of the dev split", len(keep_out_of_dev), test)
    seed = recipe.training.seed if seed is None else seed
    output.mkdir(parents=True, exist_ok=True)
    log.info("tuning %s (model %s on %s) within %s -> %s", recipe_path, recipe.model.name, recipe.model.device,
             budget.describe(), output)

    # 1. the dev split
    if recipe.data.dev:
        split = given_dev_split(recipe)
    else:
        split = carve_dev_split(recipe, output / SPLIT_DIR, fraction=dev_fraction, max_queries=max_dev_queries,
                                dev_docs=dev_docs, seed=seed, exclude=keep_out_of_dev,
                                rank=base_model_ranker(recipe, recipe.model.device) if nearest_dev else None)
    log.info("dev split: %s", split.describe())

    # 2. the trials' recipe: the user's, on the training part, scored on dev, without checkpoints or trackers
    trial_changes: dict[str, Any] = {"data.train": split.train_spec, "data.dev": split.dev_spec}
    if split.carved:
        # the split holds the chosen examples already, written with the default column names for a pairs file
        for key in ("max_examples", "sample") + (("columns",) if split.pairs_file else ()):
            trial_changes[f"data.{key}"] = _default_of(DataSection, key)
        if split.mining_corpus is not None:
            trial_changes["mining.corpus"] = split.mining_corpus
    trial_changes.update({"training.checkpoint_every": None, "training.report_to": [], "training.progress": False})
    trial_recipe = recipe.with_overrides(as_overrides(trial_changes), source=recipe_path)
    user_eval = recipe.data.dev is not None and recipe.training.eval_every
    from embedkit.train.contrastive import load_examples

    examples, source = load_examples(trial_recipe)
    per_epoch = steps_per_epoch(len(examples), trial_recipe)
    if not user_eval:
        trial_recipe = trial_recipe.with_overrides(
            as_overrides({"training.eval_every": max(1, -(-per_epoch // evals_per_epoch))}), source=recipe_path)
    eval_every = trial_recipe.training.eval_every

    # 3. what the data and the base model's mining say about the search space
    probe = None
    negatives_in_data = max((len(ex.negatives) for ex in examples), default=0)
    turn_on = can_turn_on_mining(recipe, negatives_in_data) and (not params or "mined_negatives" in params)
    if recipe.mining.online or turn_on:
        log.info("mining the %d training queries once with the base model (%s)", len({ex.query for ex in examples}),
                 "the recipe's mining settings" if recipe.mining.online else
                 "the recipe has no negatives: trials may mine them online, with the default mining settings")
        probe_recipe = trial_recipe
        if turn_on:
            probe_recipe = trial_recipe.with_overrides(
                as_overrides({"mining.online": True, "loss.hard_negatives": 1}), source=recipe_path)
        probe = mining_probe(probe_recipe, trial_recipe.model.device)
        if probe["warning"]:
            log.warning("%s", probe["warning"]["message"])
            log.info("the margin joins the search")
    rows_without = sum(1 for ex in examples if not ex.negatives)
    space = build_space(recipe, margin_flagged=bool(probe and probe["warning"]), negatives_in_data=negatives_in_data,
                        steps_per_epoch=per_epoch,
                        several_positives=bool(probe and probe["several_positives"]), only=params)
    log.info("search space: %s", "; ".join(f"{p.name} {p.bounds()}" for p in space))
    log.info("%d optimizer steps per epoch on the training part; dev evaluation every %d steps%s", per_epoch,
             eval_every, " (the recipe's)" if user_eval else "")

    # 4. the search
    search = Search(trial_recipe, space, output=output, seed=seed, budget=budget, objective_is_best=bool(user_eval),
                    verbose=verbose, clock=clock, trial_hook=trial_hook, keep_trials=keep_trials,
                    steps_per_epoch=per_epoch, mining_round_seconds=probe["round_seconds"] if probe else None,
                    started=budget_started)
    records = search.run()
    if not keep_trials:
        shutil.rmtree(output / TRIALS_DIR, ignore_errors=True)
    best = search.best()
    if best is None:
        raise EmbedkitError("no trial finished (" + "; ".join(sorted({r.note for r in records if r.note})) + ")",
                            exit_code=1)
    chosen = best.params
    log.info("best: trial %d (%s), dev %s %.4f%s", best.number,
             ", ".join(f"{k}={_fmt(v)}" for k, v in chosen.items()), _dev_metric(trial_recipe), best.value,
             _versus_recipe(records, best))

    # 5. the tuned recipe (the user's, with the chosen values), written beside the model it trains
    chosen_values = recipe_overrides(space, chosen)
    changes = [f"{key} {override_value(raw, key)!r} -> {value!r}" for key, value in chosen_values.items()
               if override_value(raw, key) != value]  # against the file as written (a key not written: None)
    model_dir = output / MODEL_DIR
    final_raw = apply_overrides(copy.deepcopy(raw),
                                as_overrides({**chosen_values, "training.output_dir": str(model_dir)}))
    recipe_file = output / RECIPE_NAME
    write_recipe(recipe_file, final_raw, source=recipe_path, best=best, records=records, changes=changes,
                 metric=_dev_metric(trial_recipe), budget=budget)
    final_recipe = load_recipe(recipe_file)  # the written recipe is a valid recipe, and the one trained below

    from embedkit.tune.report import build_report, write_reports

    state = {"recipe": str(recipe_path), "overrides": overrides, "output": str(output), "seed": seed,
             "budget": {**budget.to_dict(), "described": budget.describe()}, "split": split.to_dict(), "space": [p.to_dict() for p in space],
             "probe": probe, "static_negatives": {"max_per_row": negatives_in_data, "rows_without": rows_without,
                                                  "rows": len(examples)} if not recipe.mining.online else None,
             "eval_every": eval_every, "steps_per_epoch": per_epoch, "metric": _dev_metric(trial_recipe),
             "objective": "dev-best step (the recipe's eval_every)" if user_eval else "last step",
             "search_seconds": round(search.seconds, 1),
             "preparation_seconds": round(search.preparation_seconds, 1), "stop_reason": search.stop_reason,
             "trials": [asdict(r) for r in records], "best_trial": best.number, "chosen": chosen,
             "changes": changes, "recipe_file": str(recipe_file), "model_dir": None, "final": None, "test": None}
    write_reports(output, build_report(state, recipe_file.read_text(encoding="utf-8")))

    # 6. the final model, from the written recipe, exactly as `embedkit train` trains it
    trained_dir = None
    if final:
        from embedkit.train.contrastive import train

        log.info("training the final model on all the training data (%s) -> %s", final_recipe.data.train, model_dir)
        started = time.perf_counter()
        result = train(final_recipe)
        trained_dir = result.output_dir
        state["model_dir"] = str(trained_dir)
        state["final"] = {"steps": result.steps, "seconds": round(time.perf_counter() - started, 1),
                          "samples_per_second": round(result.samples_per_second, 3),
                          "dev": result.dev["metrics"] if result.dev else None}
        free_memory()

        # 7. the test comparison: base, default recipe, tuned
        if test_spec is not None:
            from embedkit.tune.compare import compare_on_test

            state["test"] = compare_on_test(test_spec, recipe=recipe, tuned_dir=trained_dir, output=output,
                                            same_as_default=not changes, device=trial_recipe.model.device)
    elif test_spec is not None:
        log.warning("--test needs the final model: skipped with --no-final")
    report = build_report(state, recipe_file.read_text(encoding="utf-8"))
    write_reports(output, report)
    log.info("wrote %s (reproduce the model: embedkit train %s) and %s", recipe_file, recipe_file,
             output / "tune_report.md")
    return TuneResult(output, recipe_file, trained_dir, best, records, split, space, report)


def _default_of(section, key: str) -> Any:
    """A section field's default as a plain value (a sub-section's as a mapping)."""
    value = section.model_fields[key].get_default(call_default_factory=True)
    return value.model_dump() if hasattr(value, "model_dump") else value


def _dev_metric(recipe) -> str:
    from embedkit.eval.tasks import parse_task_spec

    return parse_task_spec(recipe.data.dev).main_metric if recipe.data.dev else "score"


def _versus_recipe(records: list[TrialRecord], best: TrialRecord) -> str:
    first = next((r for r in records if r.number == 0 and r.state == "complete"), None)
    if first is None or best.number == 0:
        return " (your recipe as written was best)" if best.number == 0 else ""
    return f" (your recipe: {first.value:.4f}, {best.value - first.value:+.4f})"


def write_recipe(path: Path, raw: dict, *, source: Path, best: TrialRecord, records: list[TrialRecord],
                 changes: list[str], metric: str, budget: Budget) -> Path:
    """The tuned recipe: the user's YAML with the chosen values, and a header saying where it came from."""
    from embedkit.atomic import write_text

    first = next((r for r in records if r.number == 0 and r.state == "complete"), None)
    header = [
        f"# Tuned by `embedkit tune {source} --budget {budget.text}`: trial {best.number} of {len(records)}, "
        f"dev {metric} {best.value:.4f}" + (f" (the recipe as written: {first.value:.4f})" if first else "") + ".",
        "# Changed from the recipe: " + ("; ".join(changes) if changes else "nothing (the recipe was best)") + ".",
        f"# Reproduce the model beside this file: embedkit train {path}",
    ]
    body = yaml.safe_dump(raw, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return write_text(path, "\n".join(header) + "\n" + body)
