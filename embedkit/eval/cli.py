"""`embedkit eval` and `embedkit compare` as plain typer-annotated functions (registered by embedkit/cli.py).

Heavy libraries (torch, transformers, mteb, faiss) are imported inside the functions so `embedkit --help`
stays fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer

from embedkit.atomic import write_json
from embedkit.device import DEVICE_HELP
from embedkit.errors import ConfigError, EmbedkitError
from embedkit.eval.compare import compare, load_report, seed_average
from embedkit.eval.report import plot_reports, summary_rows, synthetic_notes, write_report
from embedkit.eval.runner import evaluate
from embedkit.eval.tasks import parse_task_specs
from embedkit.launch import (NNODES_OPTION, NODE_RANK_OPTION, NPROC_HELP, RDZV_BACKEND_OPTION, RDZV_ENDPOINT_OPTION,
                             RDZV_ID_OPTION, processes, report_error)
from embedkit.logs import quieten
from embedkit.models.exported import export_format, load_exported_encoder

log = logging.getLogger(__name__)

TASK_HELP = (
    "Task to evaluate; repeat for several. Forms: 'beir:DIR[:SPLIT]' (BEIR folder, split defaults to test, e.g. "
    "beir:../shared/data/scifact:test), 'sts:FILE' (.jsonl/.csv/.tsv with sentence1, sentence2, score, e.g. "
    "sts:../shared/data/sts/sick/test.jsonl), 'mteb:NAME' (an installed mteb task; offline only if its data is "
    "cached), or an embedded default: 'stsb' (STS-Benchmark test), 'stsb-paraphrase' (retrieval derived from "
    "STS-B). Default: stsb and stsb-paraphrase."
)


def _fail(exc: EmbedkitError) -> typer.Exit:
    report_error(f"error: {exc.one_line()}")  # stderr; under --nproc once, from the process that failed first
    return typer.Exit(exc.exit_code)


def eval_command(
    ctx: typer.Context,
    model: str = typer.Option(
        "minilm", "--model", "-m",
        help="Model to evaluate: an embedded default ('minilm', 'smollm2-135m'), a model folder saved by "
             "'embedkit train', or a Hugging Face id (needs the hub).",
    ),
    task: Optional[List[str]] = typer.Option(None, "--task", "-t", help=TASK_HELP),
    output: Path = typer.Option(
        Path("eval_report.json"), "--output", "-o",
        help="Report JSON to write (a Markdown summary is written beside it with the .md suffix). Compare two "
             "reports with 'embedkit compare'.",
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Texts per encoder forward pass."),
    seed: int = typer.Option(0, "--seed", help="Random seed (recorded in the report; evaluation is deterministic)."),
    top_k: int = typer.Option(100, "--top-k", min=100, help="Documents retrieved per query (>= 100 for recall@100)."),
    search: str = typer.Option(
        "auto", "--search",
        help="Retrieval search: 'exact' (chunked matrix product), 'faiss' (IndexFlatIP), or 'auto' (FAISS from "
             "200,000 documents). Both are exact.",
    ),
    no_cache: bool = typer.Option(
        False, "--no-cache",
        help="Encode the corpus even when cached embeddings exist (cache: $EMBEDKIT_HOME/embeddings, keyed by "
             "model fingerprint, prompts and corpus hash).",
    ),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache folder (default: $EMBEDKIT_HOME "
                                                                        "or ~/.cache/embedkit)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the summary table."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    nproc: int = typer.Option(1, "--nproc", min=1, help=NPROC_HELP),
    nnodes: int = NNODES_OPTION,
    node_rank: int = NODE_RANK_OPTION,
    rdzv_endpoint: str | None = RDZV_ENDPOINT_OPTION,
    rdzv_backend: str = RDZV_BACKEND_OPTION,
    rdzv_id: str = RDZV_ID_OPTION,
    rerank: Optional[str] = typer.Option(
        None, "--rerank",
        help="A reranker (cross-encoder folder from 'embedkit train' with task: rerank, or a sentence-transformers "
             "CrossEncoder) to order each query's first --rerank-top documents: the report's retrieval metrics and "
             "per-query values become the two-stage ones (first-stage metrics kept under first_stage)."),
    rerank_top: int = typer.Option(100, "--rerank-top", min=1,
                                   help="Documents per query the reranker scores (at most --top-k)."),
) -> None:
    """Evaluate a model on retrieval and STS tasks and write a JSON + Markdown report.

    --nproc N runs N processes (torch.distributed: gloo on the CPU, nccl with one GPU each) that share every
    encoding; the first writes the report and the embedding cache. Metrics equal a one-process run.

    Examples (the first runs the embedded default tasks stsb and stsb-paraphrase):

      embedkit eval --model minilm -o reports/minilm.json

      embedkit eval -m runs/my-model -t beir:../shared/data/scifact:test -t sts:../shared/data/sts/sick/test.jsonl

      embedkit eval -m runs/my-model --rerank runs/my-reranker --rerank-top 100 -t beir:../shared/data/scifact:test
    """
    try:
        specs = parse_task_specs(task)  # fail on a bad spec before the model loads
        if quiet:
            quieten()
        with processes(nproc, device, ctx=ctx) as procs:
            log.info("loading model %s%s", model, f" ({procs.world} processes)" if procs.world > 1 else "")
            from embedkit.models import load_model

            if export_format(model) is not None:  # an ONNX / OpenVINO export: its own runtime, on the CPU
                if procs.world > 1:
                    raise ConfigError("--nproc shards a model folder's encoding; an export folder (onnx, openvino) "
                                      "is encoded by one process", field="--nproc")
                encoder = load_exported_encoder(model)
            else:
                encoder = load_model(model, device=procs.device)
            reranker = None
            if rerank is not None:
                from embedkit.models.reranker import load_reranker

                reranker = load_reranker(rerank, device=procs.device)
            with procs.shard(encoder):
                report = evaluate(encoder, specs, batch_size=batch_size, seed=seed, top_k=top_k, search=search,
                                  cache_dir=cache_dir, use_cache=not no_cache, progress=True, reranker=reranker,
                                  rerank_top=rerank_top)
            if procs.is_main:
                json_path, md_path = write_report(report, output)
    except EmbedkitError as exc:
        raise _fail(exc) from None
    if not procs.is_main:
        return
    for name, metric, value in summary_rows(report):
        typer.echo(f"{name:<28} {metric:<16} {value:.4f}")
    for name, note in synthetic_notes(report):
        typer.echo(f"{name}: {note}")
    typer.echo(f"report: {json_path} (summary: {md_path})")


def compare_command(
    baseline: List[Path] = typer.Option(
        ..., "--baseline", "-b",
        help="Report of the reference model (from 'embedkit eval'). Repeat for several trained seeds of it."),
    candidate: List[Path] = typer.Option(
        ..., "--candidate", "-c",
        help="Report of the model to check, on the same tasks. Repeat for several trained seeds of it."),
    max_drop: float = typer.Option(
        0.01, "--max-drop", min=0.0,
        help="Margin m: largest tolerated drop of a task's main metric, absolute (0.01 = one nDCG@10 / Spearman "
             "point). The test is about the margin: H0 drop <= m vs H1 drop > m.",
    ),
    alpha: float = typer.Option(
        0.05, "--alpha", min=1e-6, max=0.5,
        help="Default mode: a task regresses when p(drop > max_drop) < alpha. Not used by --strict.",
    ),
    strict: bool = typer.Option(
        False, "--strict",
        help="Non-inferiority: a task passes only when the lower end of the 95% interval of (candidate - baseline) "
             "is above -max_drop; otherwise exit 1. Tasks without per-query scores fail.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the resampling (same seed, same p-values and intervals)."),
    resamples: int = typer.Option(
        2000, "--resamples", min=100, help="Sign assignments / bootstrap resamples per task (each of the tests)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the comparison as JSON here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a PNG bar chart of both reports here."),
) -> None:
    """Gate a candidate against a baseline on the same tasks: exit 0 pass, 1 regression, 2 not comparable
    (different tasks, data, queries or pairs) or bad input.

    Per task its main metric decides; d = candidate - baseline, m = --max-drop.
    All tests are paired over the same queries / pairs, and seeded.

    p(drop>m), one-sided: H0 mean d >= -m (drop at most m) vs H1 mean d < -m
    (drop beyond m). The differences are shifted by +m first. Retrieval: a
    sign-flip randomization test over per-query differences d_i + m (p = share
    of random sign assignments whose mean is as low as the observed mean).
    STS: a paired bootstrap over pairs that recomputes Spearman for both
    models (p = share of resamples with d + m >= 0).

    p(improve), one-sided: the same tests without the shift, H0 mean d <= 0
    vs H1 mean d > 0.

    95% CI of d: paired bootstrap percentile interval (2.5th and 97.5th
    percentiles over --resamples resamples of queries / pairs).

    Several seeds (-b r1.json -b r2.json -c s1.json -c s2.json): the tests run
    on each side's seed average, and each task also gets a 95% interval over
    the seeds (Welch's t on the seeds' main metric): the training run's own
    noise, which the per-query tests leave out. --strict asks both intervals
    to lie above -m.

    Default: exit 1 when a task has p(drop>m) < --alpha, i.e. its drop is
    significantly larger than m; a noisy drop a little over m passes.
    --strict (non-inferiority): exit 0 only when every task's 95% CI lower
    end is > -m, else exit 1. Tasks without per-query scores (mteb tasks):
    the default mode compares the observed drop with m; --strict fails them.

    Output, one line per task: task metric baseline candidate diff
    [95% CI lo, hi] p(drop>m) p(improve) verdict: reason.

    Example (CI):

      embedkit eval -m runs/candidate -o candidate.json && embedkit compare -b eval/baselines/minilm.json -c candidate.json
    """
    try:
        base_reports, cand_reports = [load_report(p) for p in baseline], [load_report(p) for p in candidate]
        result = compare(base_reports, cand_reports, max_drop=max_drop, alpha=alpha, seed=seed, resamples=resamples,
                         strict=strict)
        base_report, cand_report = seed_average(base_reports), seed_average(cand_reports)
        if output is not None:
            write_json(output, result.to_dict())
        if plot is not None:
            def label(side: str, paths: List[Path]) -> str:
                return f"{side} ({paths[0].name})" if len(paths) == 1 else f"{side} (mean of {len(paths)} seeds)"

            plot_reports([(label("baseline", baseline), base_report), (label("candidate", candidate), cand_report)],
                         plot)
    except EmbedkitError as exc:
        raise _fail(exc) from None
    for line in result.summary_lines():
        typer.echo(line)
    for method in sorted({t.method for t in result.tasks}):
        typer.echo(f"test: {method}")
    raise typer.Exit(result.exit_code)
