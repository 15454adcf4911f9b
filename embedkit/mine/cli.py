"""`embedkit mine` (registered by embedkit/cli.py). Heavy imports (torch, faiss) stay inside the function."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from embedkit.device import DEVICE_HELP
from embedkit.launch import (NNODES_OPTION, NODE_RANK_OPTION, NPROC_HELP, RAY_ADDRESS_OPTION, RAY_OPTION,
                             RAY_WORKERS_OPTION, RDZV_BACKEND_OPTION, RDZV_ENDPOINT_OPTION, RDZV_ID_OPTION,
                             SHARD_SIZE_OPTION, processes)
from embedkit.mine.settings import MiningSettings, parse_range

log = logging.getLogger(__name__)


def mine_command(
    ctx: typer.Context,
    model: str = typer.Option(
        ..., "--model", "-m",
        help="Embedding model that ranks the pool: 'minilm', 'smollm2-135m', a local folder, or a Hugging Face id. "
        "Use the model you are about to fine-tune (its own mistakes are the useful negatives)."),
    data: Path = typer.Option(
        ..., "--data", "-d",
        help="What to mine for. A pairs file (.jsonl/.json/.csv/.tsv/.parquet with query and positive columns): a "
        "query text that appears in several rows has all those positives. Or a BEIR folder: queries of --split with "
        "their qrels (score > 0) as positives, the folder's corpus as the pool."),
    output: Path = typer.Option(
        ..., "--output", "-o",
        help="Where to write the mined rows (.jsonl), one per (query, positive): {query, positive, negatives, "
        "scores (positive first, then each negative), ids}. .summary.json, .scores.png and .manifest.json go "
        "beside it."),
    corpus: Path | None = typer.Option(
        None, "--corpus",
        help="Pairs only: documents to draw negatives from (a BEIR corpus.jsonl with _id, title, text, or a BEIR "
        "folder). Without it the pool is the set of all positives, which is small: negatives from a bigger pool "
        "are harder and more varied."),
    split: str = typer.Option("train", "--split", help="BEIR only: which qrels/<split>.tsv gives the positives."),
    window: str = typer.Option(
        "10:100", "--range",
        help="Rank window START:END (0-based, END excluded) of the model's ranking of the whole pool; negatives "
        "come only from it. Known positives count as ranks. Skipping the first ranks avoids unlabelled "
        "positives; END bounds how easy a negative may get."),
    num_negatives: int = typer.Option(3, "--num-negatives", "-n", help="Negatives per query (NV-Retriever: <= 10)."),
    sampling: str = typer.Option(
        "random", "--sampling",
        help="'random': seeded uniform draw from the survivors of the window. 'top': the best-scored survivors "
        "('top' with --relative-margin 0.05 is NV-Retriever's TopK-PercPos)."),
    seed: int = typer.Option(42, "--seed", help="Seed of the random draw (each query gets its own stream)."),
    absolute_margin: float | None = typer.Option(
        None, "--absolute-margin",
        help="Drop a candidate if score > positive score - MARGIN (e.g. 0.05). Off by default."),
    relative_margin: float | None = typer.Option(
        0.05, "--relative-margin",
        help="Drop a candidate if score > positive score x (1 - PERC) (|pos| form for negative scores): 0.05 keeps "
        "only negatives scored at least 5% below the positive (NV-Retriever TopK-PercPos). "
        "--no-relative-margin turns it off."),
    no_relative_margin: bool = typer.Option(False, "--no-relative-margin", help="Turn the relative margin off."),
    margin_from: str = typer.Option(
        "weakest", "--margin-from",
        help="Which positive the margins are measured from when a query has several (of the grade --margin-grade "
        "picks): 'weakest' (default: a negative must score clearly below every such positive; the safe side "
        "against unlabelled positives) or 'strongest' (only candidates close to the query's best match are "
        "removed; for binary labels with many weak positives, when the miner warns that the margin removed most "
        "candidates)."),
    margin_grade: str = typer.Option(
        "top", "--margin-grade",
        help="Graded qrels (BEIR score 1, 2, 3, ...): which positives set the margin. 'top' (default): the query's "
        "highest-graded ones, so weakly relevant documents (grade 1 beside grade 2-3 ones), which often score "
        "below plenty of unrelated documents, do not drag the threshold down and remove most candidates; they are "
        "still never chosen as negatives. 'all': every positive. K: positives graded >= K (all of them when a "
        "query has none). Binary labels and pairs files: every choice means all positives."),
    max_score: float | None = typer.Option(None, "--max-score", help="Drop candidates scored above this value."),
    min_score: float | None = typer.Option(None, "--min-score", help="Drop candidates scored below this value."),
    duplicate_threshold: float | None = typer.Option(
        0.98, "--duplicate-threshold",
        help="Drop a candidate whose embedding has cosine >= this with one of the query's positives: the same "
        "document under another id, or a near copy."),
    no_duplicate_filter: bool = typer.Option(False, "--no-duplicate-filter",
                                             help="Turn the near-duplicate filter off."),
    on_short: str = typer.Option(
        "keep", "--short",
        help="A query with fewer survivors than --num-negatives: 'keep' writes its rows with fewer negatives, "
        "'drop' leaves them out. Either way every such query is listed (id, text, count) in the summary."),
    teacher: Path | None = typer.Option(
        None, "--teacher", "--cross-encoder",
        help="A reranker (cross-encoder) folder, from 'embedkit train' with task: rerank or a sentence-transformers "
        "CrossEncoder: rescore the window's candidates and the positives with it, re-rank, and apply the margins to "
        "its scores. The rows' scores are then its logits (teacher scores for loss.distillation) and the manifest "
        "names it (fingerprint). --cross-encoder is the older name. None ships with embedkit."),
    search: str = typer.Option(
        "auto", "--search",
        help="'exact': brute-force inner product streamed over corpus chunks (memory stays bounded). 'hnsw': faiss "
        "HNSW graph (approximate, holds the corpus in memory, faster for huge query sets). 'auto': exact unless "
        "queries x documents > 5e10."),
    corpus_embeddings: Path | None = typer.Option(
        None, "--corpus-embeddings",
        help="Precomputed document vectors (float32 .npy, L2-normalised, from the same model) instead of encoding "
        "the pool. Needs --corpus-ids and a pool with ids (a BEIR folder or --corpus). Or a folder of vector "
        "shards from `embedkit encode --ray` (it holds its ids: no --corpus-ids)."),
    corpus_ids: Path | None = typer.Option(
        None, "--corpus-ids", help="Ids of the rows of --corpus-embeddings: one per line (.txt) or a JSON list."),
    query_column: str = typer.Option("query", "--query", help="Pairs only: column holding the query."),
    positive_column: str = typer.Option("positive", "--positive", help="Pairs only: column holding the positive."),
    batch_size: int = typer.Option(32, "--batch-size", help="Encoding batch size."),
    corpus_chunk: int = typer.Option(131072, "--corpus-chunk",
                                     help="Documents per search chunk (memory ~ chunk x dim x 4 bytes)."),
    no_cache: bool = typer.Option(False, "--no-cache",
                                  help="Do not read or write the corpus-embedding cache (under EMBEDKIT_HOME)."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Cache folder (default: EMBEDKIT_HOME)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    device: str = typer.Option("auto", "--device", help=f"Where the model (and --teacher) runs: {DEVICE_HELP}"),
    nproc: int = typer.Option(1, "--nproc", min=1, help=NPROC_HELP),
    nnodes: int = NNODES_OPTION,
    node_rank: int = NODE_RANK_OPTION,
    rdzv_endpoint: str | None = RDZV_ENDPOINT_OPTION,
    rdzv_backend: str = RDZV_BACKEND_OPTION,
    rdzv_id: str = RDZV_ID_OPTION,
    ray: bool = RAY_OPTION,
    ray_address: str | None = RAY_ADDRESS_OPTION,
    ray_workers: int | None = RAY_WORKERS_OPTION,
    shard_size: int = SHARD_SIZE_OPTION,
) -> None:
    """Mine hard negatives for (query, positive) pairs, keeping out likely false negatives.

    For each query the model ranks the whole pool; candidates come from the --range window, minus every known
    positive, near duplicates of a positive, and anything scored too close to the positive (--relative-margin,
    --absolute-margin). Then --num-negatives are drawn. Queries left short are reported, never silently dropped.

    Weak positives: the margin follows the positive's score, so low-scored positives lower the threshold and can
    remove most candidates. With graded qrels only the query's highest-graded positives set it (--margin-grade
    top: a grade-1 "partially relevant" document is a real positive but says little about which unjudged
    documents are false negatives); every judged positive is still excluded as a negative. When the margins
    remove most candidates and leave most rows short of negatives, one warning line says so (also in the
    summary's "warnings"); then try --margin-from strongest or a smaller margin, or let `embedkit tune` search it.

    --nproc N runs N processes (torch.distributed: gloo on the CPU, nccl with one GPU each) that share the encoding
    of the pool and the queries; each mines the same rows, the first writes the files (identical to one process).

    --ray encodes the pool on Ray Data (a local Ray, or --ray-address), shard by shard, into the corpus-embedding
    cache: an interrupted run, started again, resumes from the shards it finished (not with --no-cache).

    Examples:

      embedkit mine -m minilm -d ../shared/data/scifact --split train -o runs/scifact-mined.jsonl

      embedkit mine -m minilm -d pairs.jsonl --corpus corpus.jsonl --range 30:200 -n 5 --sampling top -o mined.jsonl

      embedkit mine -m minilm -d beir/ --corpus-embeddings emb.npy --corpus-ids ids.txt -o mined.jsonl

      embedkit mine -m minilm -d ../shared/data/scifact --teacher runs/my-reranker -o mined.jsonl   (teacher logits)
    """
    from embedkit.mine.mining import load_task
    from embedkit.mine.report import format_summary, warning_lines
    from embedkit.mine.run import mine_to_file
    from embedkit.models import load_model
    from embedkit.models.ray_encode import check_ray_options, ray_settings

    check_ray_options(ray, ray_address, nproc)
    on_ray = ray_settings(ray, ray_address, ray_workers, shard_size, device)
    lo, hi = parse_range(window)
    settings = MiningSettings(
        range_min=lo, range_max=hi, num_negatives=num_negatives, sampling=sampling, seed=seed,
        absolute_margin=absolute_margin, relative_margin=None if no_relative_margin else relative_margin,
        margin_from=margin_from, margin_grade=margin_grade,
        max_score=max_score, min_score=min_score,
        duplicate_threshold=None if no_duplicate_filter else duplicate_threshold, on_short=on_short,
        search=search, corpus_chunk=corpus_chunk, batch_size=batch_size,
    )
    task = load_task(data, split=split, corpus=corpus, query=query_column, positive=positive_column)
    with processes(nproc, device, ctx=ctx) as procs:
        log.info(f"{task.n_queries:,} queries, {int(task.pos_idx.size):,} pairs, pool of {len(task.corpus_ids):,} "
                 f"documents" + (f"; {procs.world} processes" if procs.world > 1 else ""))
        encoder = load_model(model, device=procs.device)
        with procs.shard(encoder):
            summary = mine_to_file(encoder, task, output, settings, corpus_embeddings=corpus_embeddings,
                                   corpus_ids=corpus_ids, teacher=teacher, cache_dir=cache_dir,
                                   use_cache=not no_cache, progress=True, device=procs.device, write=procs.is_main,
                                   ray=on_ray)
    if not procs.is_main:
        return
    if json_output:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        typer.echo(format_summary(summary))
        typer.echo("wrote " + ", ".join(summary["files"].values()))
    for line in warning_lines(summary):
        log.warning("%s", line)
