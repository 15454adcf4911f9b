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

A reranker recipe (`task: rerank`, with `rerank.first_stage`) goes through the same steps, with its own trainer
(`embedkit.train.train` picks train_reranker), its own space (embedkit/tune/space.py, keyed by task) and a two-stage
dev score: each trial's engine evaluates DevReranking (embedkit/train/rerank.py), the first stage's top
`rerank.top_k` of the dev corpus reranked by the trial's model, and the first stage's own score on the same queries
is kept beside it (`TrialRecord.first_stage`, the report). The dev corpus's nearest documents are the first stage's
(the candidates the reranker orders); rows without negatives are mined by the first stage at the start of every
trial, as `embedkit train` does; `--test` compares the first stage alone, the default and the tuned reranker, both
in two stages (embedkit/tune/compare.py).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from embedkit.atomic import write_text
from embedkit.errors import ConfigError, EmbedkitError
from embedkit.eval.tasks import load_task, parse_task_spec
from embedkit.train.backends import backend_class
from embedkit.train.config import (DataSection, apply_overrides, load_recipe, override_value, parse_recipe,
                                   read_recipe_file, validate_recipe, warn_if_dev_is_test)
from embedkit.train.trainset import load_examples
from embedkit.tune.budget import Budget, parse_budget
from embedkit.tune.jobs import recipe_payload, run_job
from embedkit.tune.leakage import check_held_out, task_side, training_side
from embedkit.tune.prepare import ranker_name
from embedkit.tune.report import build_report, write_reports
from embedkit.tune.search import NOISE_Z, SEARCH_STATE, TRIALS_DIR, Search, TrialRecord, as_overrides, fmt
from embedkit.tune.space import Param, build_space, can_turn_on_mining, recipe_overrides
from embedkit.tune.split import DevSplit, carve_dev_splits, given_dev_split

log = logging.getLogger("embedkit.tune")

RECIPE_NAME = "tuned_recipe.yaml"
MODEL_DIR = "model"
SPLIT_DIR = "split"
# Dev queries a trial's score needs before one split is enough: below it the training queries are cut into folds and
# every one of them scores (embedkit/tune/split.py). Measured, not guessed: on a carved 198-query dev split of
# MedQuAD's training queries, the per-query nDCG@10 difference between trial 0 (the recipe as written) and trial 1
# (3 epochs at 2x the lr) had a standard deviation of 0.158 (bench/bench_dev_noise.py; bench/records/tune/
# dev-noise.json). Telling a 0.01 gain (the gate's margin) from noise at NOISE_Z standard errors then takes
# (NOISE_Z x 0.158 / 0.01)^2, about 1,000 queries: one 20% split is enough from ~5,000 training queries, and every
# smaller set (SciFact's 809 and MedQuAD's 990 training queries too) is folded. Why it should hold on other corpora:
# what sets the number is how unevenly a fine-tuning helps one query and hurts another, which on a retrieval set with
# sparse judgments (a score of 0 or 1 for most queries at rank 10) is large everywhere; where it is smaller, folding
# costs time it did not have to, and where it is larger the folds are needed all the more. Never a noisier choice.
DEV_NOISE_SD = 0.158
DEV_QUERIES_NEEDED = math.ceil((NOISE_Z * DEV_NOISE_SD / 0.01) ** 2)
FOLDS = 5  # when folding: each fold's trials train on 80% of the queries, as one 20% split's would


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


def steps_per_epoch(n_examples: int, recipe) -> int:
    t = recipe.training
    batches = n_examples // t.batch_size if t.drop_last else -(-n_examples // t.batch_size)
    return max(1, -(-max(batches, 1) // t.gradient_accumulation))


def dev_folds(training_queries: int, fraction: float) -> int:
    """1 (one split of `fraction`) when it holds DEV_QUERIES_NEEDED dev queries, else FOLDS."""
    return 1 if fraction * training_queries >= DEV_QUERIES_NEEDED else FOLDS


# ---------------------------------------------------------------------------------------------------- tune
def tune(recipe_path: str | Path, *, budget: str | Budget, output: str | Path | None = None,
         overrides: list[str] | None = None, seed: int | None = None, device: str | None = None,
         test: str | None = None, dev_fraction: float = 0.2, max_dev_queries: int = 500, dev_docs: int = 1000,
         evals_per_epoch: int = 1, params: list[str] | None = None, final: bool = True, keep_trials: bool = False,
         nearest_dev: bool = True, allow_train_overlap: bool = False, folds: int | None = None,
         resume: bool = False, isolate: bool = True, verbose: bool = False,
         clock: Callable[[], float] = time.monotonic,
         trial_hook: Callable[[int], None] | None = None) -> TuneResult:
    """Tune `recipe_path` within `budget`; see the module docstring. Returns where everything went.

    `allow_train_overlap`: accept `test` query texts that are also training queries (a public split that repeats
    a few); they stay out of the carved dev split. A dev or test set that otherwise overlaps is refused
    (embedkit/tune/leakage.py). `folds`: dev folds (None: `dev_folds` decides; 1: one split). `resume`: go on
    with the search an interrupted run with the same settings left in `output`. `isolate`: every training and
    model in a process of its own (embedkit/tune/jobs.py); False runs them here (tests that fake the training)."""
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    budget_started = clock()  # the preparation below (ranking the dev corpus, the mining probe) spends the budget too
    if evals_per_epoch < 1:
        raise ConfigError("evals per epoch must be at least 1", field="--evals-per-epoch")
    if max_dev_queries < 1:
        raise ConfigError("at least one dev query is needed", field="--max-dev-queries")
    if dev_docs < 0:
        raise ConfigError("the dev corpus size must be >= 0 (0: the whole pool)", field="--dev-docs")
    if folds is not None and folds < 1:
        raise ConfigError("the number of dev folds must be at least 1", field="--folds")
    recipe_path = Path(recipe_path)
    overrides = list(overrides or [])
    if device is not None:
        overrides.append(f"model.device={device}")
    # Read once: the typed recipe, which the trials, the probe and the default run edit (Recipe.with_overrides), and
    # its YAML mapping, from which only the tuned recipe is written (the user's keys, in the user's order).
    raw, text = read_recipe_file(recipe_path, overrides)
    recipe = parse_recipe(copy.deepcopy(raw), source=recipe_path, text=text)
    validate_recipe(recipe, source=recipe_path)  # every mistake in the recipe fails here, naming file and field
    if recipe.task == "rerank" and not recipe.rerank.first_stage:  # the dev score is the two stages'
        raise ConfigError("a reranker's trials are scored by reranking a first stage's top rerank.top_k on the dev "
                          "split: set rerank.first_stage (the bi-encoder it serves behind)", path=recipe_path,
                          field="rerank.first_stage")
    backend = backend_class(recipe)
    if backend.needs_several_processes:
        raise ConfigError(f"tune runs each trial in one process; the {backend.kind} backend needs several (train the "
                          "tuned recipe with --nproc afterwards)", path=recipe_path, field=backend.selected_with)
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

    all_examples, _ = load_examples(recipe)
    n_queries = len({ex.query for ex in all_examples})
    if recipe.data.dev:
        folds = 1
    elif folds is None:
        folds = dev_folds(n_queries, dev_fraction)
    settings = {"recipe": raw, "seed": seed, "budget": budget.text, "params": params, "dev_fraction": dev_fraction,
                "max_dev_queries": max_dev_queries, "dev_docs": dev_docs, "evals_per_epoch": evals_per_epoch,
                "nearest_dev": nearest_dev, "folds": folds, "test": test}
    resumed = _resumed_state(output, settings) if resume else None
    if not resume and (output / SEARCH_STATE).is_file():
        log.info("%s holds an earlier search; starting over (--resume goes on with it)", output)
    output.mkdir(parents=True, exist_ok=True)
    log.info("tuning %s (model %s on %s, %d training queries) within %s -> %s", recipe_path, recipe.model.name,
             recipe.model.device, n_queries, budget.describe(), output)

    def job(kind: str, payload: dict, **kw) -> dict:
        return run_job(kind, payload, isolate=isolate, work=output / TRIALS_DIR, **kw)

    # 1. the dev split, or folds
    if resumed:
        splits = [DevSplit.from_dict(d) for d in resumed["splits"]]
    elif recipe.data.dev:
        splits = [given_dev_split(recipe)]
    else:
        def base_model_rank(queries, documents, k):  # the base model, in a process of its own
            return job("rank", {**recipe_payload(recipe, recipe_path), "device": recipe.model.device,
                                "queries": list(queries), "documents": list(documents), "k": k})["ranked"]
        if folds > 1:
            log.info("%d training queries: a %.0f%% dev split would hold %d, fewer than the %d a trial's score needs "
                     "(DEV_QUERIES_NEEDED): %d dev folds, every query scored out of fold", n_queries,
                     100 * dev_fraction, round(dev_fraction * n_queries), DEV_QUERIES_NEEDED, folds)
        splits = carve_dev_splits(recipe, output / SPLIT_DIR, folds=folds, fraction=dev_fraction,
                                  max_queries=max_dev_queries, dev_docs=dev_docs, seed=seed, exclude=keep_out_of_dev,
                                  rank=base_model_rank if nearest_dev else None)
    split = splits[0]
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
    examples, source = load_examples(trial_recipe)
    per_epoch = steps_per_epoch(len(examples), trial_recipe)
    if folds > 1:  # a fold is scored once, at its end: with few queries an evaluation costs more than an epoch
        trial_recipe = trial_recipe.with_overrides(
            as_overrides({"training.eval_every": None, "training.eval_at_end": True}), source=recipe_path)
    elif not user_eval:
        trial_recipe = trial_recipe.with_overrides(
            as_overrides({"training.eval_every": max(1, -(-per_epoch // evals_per_epoch))}), source=recipe_path)
    eval_every = trial_recipe.training.eval_every

    # 3. what the data and the base model's mining say about the search space
    negatives_in_data = max((len(ex.negatives) for ex in examples), default=0)
    turn_on = can_turn_on_mining(recipe, negatives_in_data) and (not params or "mined_negatives" in params)
    if resumed:
        probe = resumed["probe"]
    elif recipe.mining.online or turn_on:
        log.info("mining the %d training queries once with the base model (%s)", len({ex.query for ex in examples}),
                 "the recipe's mining settings" if recipe.mining.online else
                 "the recipe has no negatives: trials may mine them online, with the default mining settings")
        probe_recipe = trial_recipe
        if turn_on:
            probe_recipe = trial_recipe.with_overrides(
                as_overrides({"mining.online": True, "loss.hard_negatives": 1}), source=recipe_path)
        probe = job("probe", {**recipe_payload(probe_recipe, recipe_path), "device": trial_recipe.model.device})
        if probe["warning"]:
            log.warning("%s", probe["warning"]["message"])
            log.info("the margin joins the search")
    else:
        probe = None
    rows_without = sum(1 for ex in examples if not ex.negatives)
    space = build_space(recipe, margin_flagged=bool(probe and probe["warning"]), negatives_in_data=negatives_in_data,
                        steps_per_epoch=per_epoch,
                        several_positives=bool(probe and probe["several_positives"]), only=params)
    log.info("search space: %s", "; ".join(f"{p.name} {p.bounds()}" for p in space))
    log.info("%d optimizer steps per epoch on the training part; %s", per_epoch,
             f"each of the {folds} folds scored at its end" if folds > 1 else
             f"dev evaluation every {eval_every} steps" + (" (the recipe's)" if user_eval else ""))

    # 4. the search
    search = Search(trial_recipe, space, output=output, seed=seed, budget=budget, folds=splits,
                    objective_is_best=bool(user_eval), verbose=verbose, clock=clock, trial_hook=trial_hook,
                    keep_trials=keep_trials, steps_per_epoch=per_epoch,
                    mining_round_seconds=probe["round_seconds"] if probe else None, started=budget_started,
                    isolate=isolate, resumed=resumed,
                    state={"settings": settings, "splits": [asdict(s) for s in splits], "probe": probe})
    records = search.run()
    if not keep_trials:
        shutil.rmtree(output / TRIALS_DIR, ignore_errors=True)
    best, why = search.choice()
    if best is None:
        raise EmbedkitError("no trial finished (" + "; ".join(sorted({r.note for r in records if r.note})) + ")",
                            exit_code=1)
    chosen = best.params
    log.info("chosen: trial %d (%s), dev %s %.4f%s%s%s", best.number,
             ", ".join(f"{k}={fmt(v)}" for k, v in chosen.items()), _dev_metric(trial_recipe), best.value,
             " (two stages: %s's top %d reranked; the first stage alone %.4f)" % (
                 recipe.rerank.first_stage, recipe.rerank.top_k, best.first_stage)
             if best.first_stage is not None else "", _versus_recipe(records, best), f"; {why}" if why else "")

    # 5. the tuned recipe (the user's, with the chosen values), written beside the model it trains
    chosen_values = recipe_overrides(space, chosen)
    # against the recipe's values (a key not written in the file: its default, as validation fills it in)
    changes = [f"{key} {override_value(raw, key)!r} -> {value!r}" for key, value in chosen_values.items()
               if _recipe_value(recipe, key) != value]
    model_dir = output / MODEL_DIR
    final_raw = apply_overrides(copy.deepcopy(raw),
                                as_overrides({**chosen_values, "training.output_dir": str(model_dir)}))
    recipe_file = output / RECIPE_NAME
    write_recipe(recipe_file, final_raw, source=recipe_path, best=best, records=records, changes=changes,
                 metric=_dev_metric(trial_recipe), budget=budget)
    load_recipe(recipe_file)  # the written recipe is a valid recipe, and the one trained below


    first_stage = next((r.first_stage for r in records if r.first_stage is not None), None)
    state = {"recipe": str(recipe_path), "overrides": overrides, "output": str(output), "seed": seed,
             "task": recipe.task, "budget": {**budget.to_dict(), "described": budget.describe()},
             "split": {**split.to_dict(), "ranked_by": ranker_name(recipe) if nearest_dev else None},
             "rerank": {"first_stage": recipe.rerank.first_stage, "top_k": recipe.rerank.top_k,
                        "first_stage_dev": first_stage} if recipe.task == "rerank" else None,
             "folds": folds, "dev_queries_needed": DEV_QUERIES_NEEDED,
             "space": [p.to_dict() for p in space],
             "probe": probe, "static_negatives": {"max_per_row": negatives_in_data, "rows_without": rows_without,
                                                  "rows": len(examples)} if not recipe.mining.online else None,
             "eval_every": eval_every, "steps_per_epoch": per_epoch, "metric": _dev_metric(trial_recipe),
             "objective": ("pooled out-of-fold score" if folds > 1 else
                           "dev-best step (the recipe's eval_every)" if user_eval else "last step"),
             "search_seconds": round(search.seconds, 1),
             "preparation_seconds": round(search.preparation_seconds, 1), "stop_reason": search.stop_reason,
             "trials": [_public(r) for r in records], "best_trial": best.number, "choice": why,
             "best_dev_trial": search.best().number, "chosen": chosen,
             "changes": changes, "recipe_file": str(recipe_file), "model_dir": None, "final": None, "test": None}
    write_reports(output, build_report(state, recipe_file.read_text(encoding="utf-8")))

    # 6. the final model, from the written recipe, exactly as `embedkit train` trains it (in a process of its own)
    trained_dir = None
    if final:
        log.info("training the final model on all the training data -> %s", model_dir)
        result = job("train", {"recipe_file": str(recipe_file)})
        trained_dir = Path(result.pop("output_dir"))
        state["model_dir"] = str(trained_dir)
        state["final"] = result

        # 7. the test comparison: base, default recipe, tuned
        if test_spec is not None:
            state["test"] = job("compare", {**recipe_payload(recipe, recipe_path), "test": test,
                                            "tuned_dir": str(trained_dir), "output": str(output),
                                            "same_as_default": not changes, "device": trial_recipe.model.device})
    elif test_spec is not None:
        log.warning("--test needs the final model: skipped with --no-final")
    report = build_report(state, recipe_file.read_text(encoding="utf-8"))
    write_reports(output, report)
    log.info("wrote %s (reproduce the model: embedkit train %s) and %s", recipe_file, recipe_file,
             output / "tune_report.md")
    return TuneResult(output, recipe_file, trained_dir, best, records, split, space, report)


def _public(record: TrialRecord) -> dict[str, Any]:
    """A trial as the report shows it (its per-query scores stay in the search state)."""
    out = asdict(record)
    out.pop("per_query")
    return out


def _resumed_state(output: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The search state an interrupted run left in `output`, when it ran with these settings; None when there is
    none (the search starts); a ConfigError when its settings differ (which ones)."""
    path = output / SEARCH_STATE
    if not path.is_file():
        log.info("--resume: no earlier search in %s; starting", output)
        return None
    state = json.loads(path.read_text(encoding="utf-8"))
    before = state.get("settings", {})
    differ = sorted(k for k in settings if json.dumps(before.get(k), sort_keys=True, default=str)
                    != json.dumps(settings[k], sort_keys=True, default=str))
    if differ:
        raise ConfigError(f"the search in {output} ran with other {', '.join(differ)}: resume it with the same "
                          "recipe and options, or tune into another --output", field="--resume")
    return state


def _default_of(section, key: str) -> Any:
    """A section field's default as a plain value (a sub-section's as a mapping)."""
    value = section.model_fields[key].get_default(call_default_factory=True)
    return value.model_dump() if hasattr(value, "model_dump") else value


def _recipe_value(recipe, key: str) -> Any:
    """The typed recipe's value at the dotted `key` (defaults filled in)."""
    node = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _dev_metric(recipe) -> str:
    return parse_task_spec(recipe.data.dev).main_metric if recipe.data.dev else "score"


def _versus_recipe(records: list[TrialRecord], best: TrialRecord) -> str:
    first = next((r for r in records if r.number == 0 and r.state == "complete"), None)
    if first is None or best.number == 0:
        return " (your recipe as written was best)" if best.number == 0 else ""
    return f" (your recipe: {first.value:.4f}, {best.value - first.value:+.4f})"


def write_recipe(path: Path, raw: dict, *, source: Path, best: TrialRecord, records: list[TrialRecord],
                 changes: list[str], metric: str, budget: Budget) -> Path:
    """The tuned recipe: the user's YAML with the chosen values, and a header saying where it came from."""
    first = next((r for r in records if r.number == 0 and r.state == "complete"), None)
    header = [
        f"# Tuned by `embedkit tune {source} --budget {budget.text}`: trial {best.number} of {len(records)}, "
        f"dev {metric} {best.value:.4f}" + (f" (the recipe as written: {first.value:.4f})" if first else "") + ".",
        "# Changed from the recipe: " + ("; ".join(changes) if changes else "nothing (the recipe was best)") + ".",
        f"# Reproduce the model beside this file: embedkit train {path}",
    ]
    body = yaml.safe_dump(raw, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return write_text(path, "\n".join(header) + "\n" + body)
