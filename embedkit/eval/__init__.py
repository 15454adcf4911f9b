"""Evaluation: metrics (pytrec_eval, scipy), task specs, the runner, reports and the regression gate.

    from embedkit.eval import evaluate, compare, write_report
    report = evaluate(encoder, ["stsb", "beir:../shared/data/scifact:test"])
    write_report(report, "reports/minilm.json")
    compare("eval/baselines/minilm.json", "reports/candidate.json").exit_code   # 0 ok, 1 regression, 2 not comparable

Only numpy is imported here; torch, mteb, faiss and pytrec_eval load when they are first needed.
"""

from embedkit.eval.compare import Comparison, compare, load_report
from embedkit.eval.report import plot_reports, render_markdown, write_report
from embedkit.eval.runner import evaluate
from embedkit.eval.tasks import DEFAULT_TASKS, TaskSpec, load_task, parse_task_spec, parse_task_specs

__all__ = [
    "Comparison", "DEFAULT_TASKS", "TaskSpec", "compare", "evaluate", "load_report", "load_task", "parse_task_spec",
    "parse_task_specs", "plot_reports", "render_markdown", "write_report",
]
