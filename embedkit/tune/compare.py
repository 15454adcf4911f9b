"""`embedkit tune --test TASK`: the tuned model against the base model and the default recipe's model, on a test
split the search never saw, with `embedkit compare` (difference, 95% interval, p(improvement), the default gate).

The default recipe's model is the recipe as written, trained on the same training data as the tuned one (one more
training run; when the search kept every value of the recipe, the tuned model *is* that model and is reused).

A reranker recipe (`task: rerank`) is compared as it is served, in two stages: the first stage alone
(rerank.first_stage, the baseline in place of the base model: a reranker's start has no ranking of its own), and the
default and tuned rerankers each ordering the first stage's top rerank.top_k (`embedkit eval --rerank`'s report, so
the per-query values `embedkit compare` pairs are the two stages').
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from embedkit.device import free_memory, resolve_device
from embedkit.train import train  # the bi-encoder, or a task: rerank recipe's reranker
from embedkit.train.config import Recipe, format_override

log = logging.getLogger("embedkit.tune")

GATE_MARGIN = 0.01  # the regression gate's margin in the verdict (as `embedkit compare`'s default)
TEST_DIR = "test"  # under the tune output: the three models' reports on the test
DEFAULT_MODEL_DIR = "default-model"  # under the tune output: the default recipe's model, when it is trained


def _evaluate(encoder, spec, batch_size: int, path: Path, **two_stage) -> dict[str, Any]:
    """`two_stage`: reranker= and rerank_top= (embedkit.eval.runner.evaluate's)."""
    from embedkit.eval.report import write_report
    from embedkit.eval.runner import evaluate

    report = evaluate(encoder, [spec], batch_size=batch_size, **two_stage)
    write_report(report, path)
    return report


def _baseline(recipe: Recipe, device: str):
    """What the tuned model is compared with besides the default recipe's: (its name in the reports, what the log
    calls it, the model the test ranks with)."""
    from embedkit.models import load_model

    if recipe.task == "rerank":
        return "first_stage", f"the first stage {recipe.rerank.first_stage} alone", load_model(
            recipe.rerank.first_stage, device=device)
    m = recipe.model
    return "base", f"the base model {m.name}", load_model(m.name, pooling=m.pooling, prompts=m.prompts,
                                                          max_length=m.max_length, dtype=m.dtype,
                                                          padding_side=m.padding_side, device=device)


def compare_on_test(spec, *, recipe: Recipe, tuned_dir: Path, output: Path, same_as_default: bool,
                    device: str) -> dict[str, Any]:
    """`recipe`: the recipe as written (with the user's --set), typed; its model is the default one."""
    from embedkit.eval.compare import compare
    from embedkit.models import load_model
    from embedkit.models.reranker import load_reranker

    folder = output / TEST_DIR
    batch = recipe.data.dev_batch_size
    rerank = recipe.task == "rerank"
    started = time.perf_counter()
    baseline_name, described, baseline = _baseline(recipe, device)
    log.info("test %s: evaluating %s", spec.name, described)
    reports = {baseline_name: _evaluate(baseline, spec, batch, folder / f"{baseline_name}.json")}
    del baseline
    free_memory()
    if same_as_default:
        default_dir = tuned_dir
        log.info("the tuned recipe is the recipe as written: its model is the default recipe's model")
    else:
        default_dir = output / DEFAULT_MODEL_DIR
        log.info("training the default recipe (as written) on the same data -> %s", default_dir)
        train(recipe.with_overrides([format_override("training.output_dir", str(default_dir))]))
        free_memory()
    for name, folder_of_model in (("default", default_dir), ("tuned", tuned_dir)):
        log.info("test %s: evaluating the %s model%s", spec.name, name, " behind the first stage" if rerank else "")
        if rerank:  # the reranker orders the first stage's top rerank.top_k
            encoder = load_model(recipe.rerank.first_stage, device=device)
            two_stage = {"reranker": load_reranker(folder_of_model,
                                                   device=str(resolve_device(device, field="model.device"))),
                         "rerank_top": recipe.rerank.top_k}
        else:
            encoder, two_stage = load_model(folder_of_model, device=device), {}
        reports[name] = _evaluate(encoder, spec, batch, folder / f"{name}.json", **two_stage)
        del encoder, two_stage
        free_memory()
    out: dict[str, Any] = {"task": spec.name, "spec": spec.spec, "metric": spec.main_metric,
                           "scores": {k: r["results"][spec.name]["metrics"][spec.main_metric]
                                      for k, r in reports.items()},
                           "reports": {k: str(folder / f"{k}.json") for k in reports},
                           "default_model": str(default_dir), "comparisons": {},
                           "first_stage": recipe.rerank.first_stage if rerank else None,
                           "rerank_top": recipe.rerank.top_k if rerank else None}
    for baseline in (baseline_name, "default"):
        result = compare(reports[baseline], reports["tuned"], max_drop=GATE_MARGIN, seed=0)
        (task,) = result.tasks
        out["comparisons"][f"tuned_vs_{baseline}"] = {
            "baseline": baseline, "difference": task.difference, "ci_low": task.ci_low, "ci_high": task.ci_high,
            "p_improvement": task.p_improvement, "p_drop_beyond_margin": task.p_value, "verdict": task.verdict,
            "reason": task.reason, "exit_code": result.exit_code, "lines": result.summary_lines()}
        log.info("tuned vs %s on %s: %+.4f [%+.4f, %+.4f], p(improvement) %.4f", baseline, spec.name,
                 task.difference, task.ci_low if task.ci_low is not None else float("nan"),
                 task.ci_high if task.ci_high is not None else float("nan"),
                 task.p_improvement if task.p_improvement is not None else float("nan"))
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out
