"""Command functions of `embedkit data ...` (registered by embedkit/cli.py). Heavy imports stay inside."""

from __future__ import annotations

from pathlib import Path

import typer

from embedkit.data.check import check_path, format_summary, summary_json


def check_command(
    path: Path = typer.Argument(
        ...,
        help="What to check: a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), an STS file "
        "(.jsonl/.csv/.tsv with sentence1, sentence2, score) or a training file (.jsonl/.json/.csv/.tsv/.parquet "
        "with query, positive and optional negatives). The kind is detected from the layout and column names.",
    ),
    kind: str | None = typer.Option(
        None, "--kind", help="Skip detection and check the path as 'beir', 'sts' or 'tuples'."
    ),
    query: str | None = typer.Option(None, "--query", help="Training files: column holding the query (default: query)."),
    positive: str | None = typer.Option(
        None, "--positive", help="Training files: column holding the relevant text (default: positive)."
    ),
    negatives: str | None = typer.Option(
        None,
        "--negatives",
        help="Training files: where the hard negatives are. One name = a column holding a list "
        "(default: 'negatives' if present); 'neg_a,neg_b' = one negative per column; 'negative_*' = every "
        "matching column.",
    ),
    scores: str | None = typer.Option(
        None, "--scores", help="Training files: column with teacher scores (positive first, then negatives)."
    ),
    file_format: str | None = typer.Option(
        None, "--format", help="Training files: jsonl, json, csv, tsv or parquet, when the suffix does not say."
    ),
    sentence1: str | None = typer.Option(None, "--sentence1", help="STS files: first sentence column (default: sentence1)."),
    sentence2: str | None = typer.Option(None, "--sentence2", help="STS files: second sentence column (default: sentence2)."),
    score: str | None = typer.Option(None, "--score", help="STS files: gold score column (default: score)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of readable lines."),
) -> None:
    """Validate a data set completely and print what it holds.

    Every problem is reported as one line naming the file, line and field; the exit code is 0 only for valid data.
    """
    summary = check_path(
        path,
        kind=kind,
        query=query,
        positive=positive,
        negatives=negatives,
        scores=scores,
        format=file_format,
        sentence1=sentence1,
        sentence2=sentence2,
        score=score,
    )
    typer.echo(summary_json(summary) if json_output else format_summary(summary))
