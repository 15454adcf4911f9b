"""`embedkit tune RECIPE --budget 30m|N [--test TASK] ...` (registered by embedkit/cli.py)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from embedkit.device import DEVICE_HELP
from embedkit.errors import ConfigError
from embedkit.tune.budget import BUDGET_HELP, parse_budget


def tune_command(
    recipe: Path = typer.Argument(..., help="The recipe to tune (see recipes/). Trial 0 is this recipe as written; "
                                            "the search is centred on its values."),
    budget: str = typer.Option(
        ..., "--budget", "-b",
        help=f"How much searching: {BUDGET_HELP}. A time budget counts from the start (ranking the dev corpus and "
             "the base model's mining probe spend it too) and starts a trial only when it is expected to end in "
             "time (its steps x the texts each example carries at the trials' measured rate, plus its rounds of "
             "online mining at the cost the base model's probe measured); a proposal that would end late runs with the "
             "most epochs that fit, and the search stops when not even the fewest do. The final training and --test "
             "come after it. Size it to the data: each re-mining round encodes the whole pool (SciFact's 5,183 "
             "abstracts: ~3.5 min on 2 cores), so 60 min there gave 2 long trials."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o",
        help="Output folder (default: the recipe's training.output_dir + '-tune'): tuned_recipe.yaml, model/ (the "
             "final model), tune_report.md / .json, dev_curve.png, split/ (the dev split), test/ (with --test)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value first, as in `embedkit train`: "
                                                     "--set training.batch_size=64 (YAML value)."),
    test: Optional[str] = typer.Option(
        None, "--test",
        help="A task the search never sees, e.g. beir:../shared/data/scifact:test. After the final model: the base "
             "model, the default recipe's model (one more training run) and the tuned model are evaluated on it and "
             "compared with `embedkit compare` (difference, 95% CI, p(improvement)). Refused when it shares a qrels "
             "file, a query id or a query text with data.dev or the training data."),
    allow_train_overlap: bool = typer.Option(
        False, "--allow-train-overlap",
        help="Accept --test query texts that are also training queries (public splits repeat a few: 2 of "
             "SciFact's 300 test claims, 113 of MedQuAD's 1,495 test questions up to case); they train every "
             "compared model alike and stay out of the dev split. Never a shared qrels file or query id, nor any "
             "overlap with data.dev."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the dev split and of the sampler (default: the "
                                                            "recipe's training.seed). Same seed, same trials."),
    device: Optional[str] = typer.Option(None, "--device", help=f"Overrides model.device for every run: {DEVICE_HELP}"),
    dev_fraction: float = typer.Option(0.2, "--dev-fraction",
                                       help="Share of the training queries carved out as dev (no data.dev in the "
                                            "recipe). The final model trains on all of them."),
    max_dev_queries: int = typer.Option(500, "--max-dev-queries", help="At most this many dev queries."),
    dev_docs: int = typer.Option(
        1000, "--dev-docs",
        help="Dev corpus size (0: every document): the dev queries' positives, then the documents the base model "
             "ranks nearest to them (from all the training data's documents), then seeded random ones. Dev is "
             "evaluated several times per trial; ~1,000 documents keep that cheap."),
    dev_corpus: str = typer.Option(
        "nearest", "--dev-corpus",
        help="'nearest' (default): fill the dev corpus with the base model's nearest documents first (three "
             "quarters of the free slots), so dev measures what fine-tuning must fix and separates the trials; "
             "'random': a seeded random sample only (cheaper: no base-model ranking; dev scores near the ceiling "
             "on a large corpus)."),
    evals_per_epoch: int = typer.Option(
        1, "--evals-per-epoch",
        help="Dev evaluations per epoch of a trial: what the pruner sees. One: on a small corpus on the CPU an "
             "evaluation of ~1,000 documents costs a fifth of an epoch, and a trial of several epochs is judged "
             "often enough once per epoch"),
    params: Optional[str] = typer.Option(
        None, "--params",
        help="Search only these (comma-separated): lr, epochs, temperature, hard_negatives, mining_range, "
             "relative_margin, margin_from, lora_r; for a task: rerank recipe lr, epochs, hard_negatives, loss_type, "
             "warmup_ratio, lora_r. Default: every one the recipe can use."),
    folds: Optional[int] = typer.Option(
        None, "--folds",
        help="Dev folds: every training query scored once, out of fold, each trial trained once per fold. Default: "
             "1 (one split) when the split holds enough dev queries to tell a 0.01 gain from noise, else 5 (few "
             "labels: ~100 queries give 100 dev scores instead of 20)."),
    resume: bool = typer.Option(
        False, "--resume",
        help="Go on with the search an interrupted run left in --output (same recipe and options): its trials "
             "count, its budget time used counts, the next trial starts."),
    no_final: bool = typer.Option(False, "--no-final", help="Search and write the recipe; do not train the final "
                                                           "model (no --test then)."),
    keep_trials: bool = typer.Option(False, "--keep-trials", help="Keep every trial's model folder under trials/."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also the trials' own training lines."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Find the recipe that suits your data: a budgeted search on a dev split, then the final model.

    1. Dev split: carved from the training queries (query-disjoint, seeded; its corpus: the dev positives and the
    documents the base model ranks nearest to them, then random ones), or the recipe's data.dev (refused when it
    overlaps --test or the training data: the test is scored only at the end). With few training queries, 5 dev
    folds instead: every query scored once, out of fold (--folds).
    2. Search (Optuna TPE, seeded, one trial at a time, each in a process of its own) over lr, epochs,
    temperature, and where the recipe can use them the hard negatives, the mining window and margin (mining.online)
    and the LoRA rank (adapter lora / qlora). A recipe without any negatives can have them mined: mined_negatives
    0 (as written) .. 3 turns online mining on in a trial, with its window as a dependent parameter. Trial 0 is your
    recipe, trial 1 your recipe trained longer (3 epochs or yours, 2x the lr, a mined negative). Short trials first:
    the epochs are capped, the cap doubling when the best trial ran at it. Bad trials stop early (a median pruner
    on the dev evaluations, or on the folds done). A line per dev evaluation and at least one a minute; an
    interrupted search goes on with --resume.
    3. The best trial's values go into OUTPUT/tuned_recipe.yaml (your recipe otherwise unchanged) when it beats
    your recipe on the same dev queries by more than twice the noise (the standard error of the difference),
    else your recipe stays. It trains the final model on all the training data into OUTPUT/model: `embedkit train
    OUTPUT/tuned_recipe.yaml` reproduces it, same weights.
    4. Report: tune_report.md / .json (trials: params, dev score with its spread, pruned / complete, seconds; the
    search space and why its bounds hold on other corpora), dev_curve.png, and with --test the comparisons.

    Works for every recipe the engine trains: full fine-tuning, LoRA / QLoRA, LLM encoders, on the CPU or a GPU
    (model.device or --device). The search space and its reasons: embedkit/tune/space.py.

    Rerankers (task: rerank, with rerank.first_stage): the dev score is the two stages' (the first stage's top
    rerank.top_k of the dev corpus, reranked by the trial's model); the search covers lr, epochs, the negatives per
    query, the loss (listwise or bce), the warm-up and the LoRA rank of a yes/no reranker; --test compares the
    first stage alone, the default reranker and the tuned one, each reranking the first stage's top rerank.top_k.

    Examples:

      embedkit tune recipes/minilm-scifact.yaml --budget 2h --test beir:../shared/data/scifact:test --allow-train-overlap

      embedkit tune recipes/minilm-medquad.yaml --budget 20 -o runs/medquad-tune

      embedkit tune my-recipe.yaml --budget 30m --params lr,epochs --device cuda

      embedkit tune recipes/minilm-rerank-scifact.yaml --budget 1h --test beir:../shared/data/scifact:test

      embedkit train runs/medquad-tune/tuned_recipe.yaml      # the same model again
    """
    from embedkit.tune.run import tune

    parsed_budget = parse_budget(budget)  # a bad budget fails before anything loads
    if dev_corpus not in ("nearest", "random"):
        raise ConfigError(f"expected 'nearest' or 'random', got {dev_corpus!r}", field="--dev-corpus")
    wanted = [p.strip() for p in params.split(",") if p.strip()] if params else None
    # stdout carries the result only: what libraries print while the runs go (DeepSpeed's accelerator line, ...)
    # goes to stderr with the progress lines, so `--json` stays parseable.
    with contextlib.redirect_stdout(sys.stderr):
        result = tune(recipe, budget=parsed_budget, output=output, overrides=list(set_), seed=seed, device=device,
                      test=test, dev_fraction=dev_fraction, max_dev_queries=max_dev_queries, dev_docs=dev_docs,
                      evals_per_epoch=evals_per_epoch, params=wanted, final=not no_final, keep_trials=keep_trials,
                      verbose=verbose, nearest_dev=dev_corpus == "nearest",
                      allow_train_overlap=allow_train_overlap, folds=folds, resume=resume)
    report = result.report
    summary = {"output": str(result.output), "tuned_recipe": str(result.recipe_path),
               "model": str(result.model_dir) if result.model_dir else None, "best_trial": result.best.number,
               "dev": result.best.value, "metric": report["metric"], "chosen": result.best.params,
               "trials": len(result.trials), "test": report.get("test") and {
                   k: {"difference": v["difference"], "ci_low": v["ci_low"], "ci_high": v["ci_high"],
                       "p_improvement": v["p_improvement"]} for k, v in report["test"]["comparisons"].items()}}
    if json_output:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"best trial {result.best.number} of {len(result.trials)}: dev {report['metric']} "
               f"{result.best.value:.4f} ({', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in result.best.params.items())})")
    if report.get("test"):
        test_report = report["test"]
        for name, c in test_report["comparisons"].items():
            ci = "" if c["ci_low"] is None else f" [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
            p = "" if c["p_improvement"] is None else f", p(improvement) {c['p_improvement']:.4f}"
            typer.echo(f"test {test_report['task']}: tuned vs {c['baseline']} {c['difference']:+.4f}{ci}{p}")
    typer.echo(f"recipe: {result.recipe_path}" + (f"; model: {result.model_dir}" if result.model_dir else "")
               + f"; report: {result.output / 'tune_report.md'}")
