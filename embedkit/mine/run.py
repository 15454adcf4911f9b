"""`embedkit mine` end to end: data + model -> mined.jsonl, .summary.json, .scores.png, .manifest.json.

Files written beside the output (all atomically):
    mined.jsonl               one row per (query, positive): query, positive, negatives, scores, ids
    mined.summary.json        filter counts, short queries (by id), score distributions, timings
    mined.scores.png          histogram of positive vs kept-negative scores
    mined.manifest.json       model description, data hashes, settings (filters, seed), the teacher (name, path,
                              fingerprint) when one rescored the rows, library versions

With a teacher (`teacher=`, `embedkit mine --teacher`) the rows' `scores` are the teacher reranker's logits for
(query, positive) and (query, negative) (see TeacherRescorer), ready for `loss.distillation`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from embedkit.atomic import atomic_path, write_json
from embedkit.errors import ConfigError
from embedkit.manifest import base_manifest, device_fields, sha256_file
from embedkit.mine.cache import corpus_vectors
from embedkit.mine.core import MiningStats, margin_warning
from embedkit.mine.mining import (
    MiningTask,
    TeacherRescorer,
    align_precomputed,
    iter_rows,
    query_encoder,
    short_report,
)
from embedkit.mine.report import write_histogram
from embedkit.mine.settings import MiningSettings
from embedkit.models.ray_encode import RaySettings

log = logging.getLogger(__name__)


def sidecar(output: Path, suffix: str) -> Path:
    """mined.jsonl -> mined.summary.json etc."""
    return output.with_name(output.stem + suffix)


def mine_to_file(
    encoder,
    task: MiningTask,
    output: str | Path,
    settings: MiningSettings,
    *,
    corpus_embeddings: str | Path | None = None,
    corpus_ids: str | Path | None = None,
    teacher: str | Path | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    histogram: bool = True,
    progress: bool = False,
    device: Any = None,
    write: bool = True,
    ray: RaySettings | None = None,
) -> dict[str, Any]:
    """Mine `task` with `encoder`; write the output files; return the summary (also written as JSON).

    teacher: a reranker folder that rescores the window's candidates and the positives; its logits become the
    rows' scores and the margins apply to them. device: where the teacher runs (default: the encoder's device).
    write=False mines the same rows and writes nothing (no output, no cache): the other processes of a sharded run
    (`embedkit mine --nproc`), which must make the same encode calls as the one that writes. progress: log the steps
    at INFO rather than DEBUG. ray: encode the pool on Ray Data (embedkit.models.ray_encode), into the cache.
    """
    output = Path(output)
    if output.suffix.lower() != ".jsonl":
        raise ConfigError("the output is JSON Lines: give a path ending in .jsonl", path=output, field="output")
    shard_folder = corpus_embeddings is not None and Path(corpus_embeddings).is_dir()  # holds its own ids
    if (corpus_embeddings is None) != (corpus_ids is None) and not shard_folder:
        raise ConfigError("precomputed embeddings need both --corpus-embeddings (.npy) and --corpus-ids (or a "
                          "folder of vector shards from `embedkit encode --ray`, alone)",
                          field="corpus_ids" if corpus_ids is None else "corpus_embeddings")
    level = logging.INFO if progress else logging.DEBUG
    started = time.perf_counter()
    device = device if device is not None else getattr(encoder, "device", "cpu")
    rescorer = (TeacherRescorer(teacher, task, batch_size=settings.batch_size, device=device)
                if teacher else None)
    stats = MiningStats()
    rows_written = 0
    with contextlib.ExitStack() as stack:
        if corpus_embeddings is not None:
            source = align_precomputed(task, corpus_embeddings, corpus_ids)
            corpus_info: dict[str, Any] = {"precomputed": str(corpus_embeddings)}
        else:
            log.log(level, f"encoding {len(task.corpus_texts):,} documents")
            source, corpus_info = stack.enter_context(corpus_vectors(
                encoder, task.corpus_ids, task.corpus_texts, batch_size=settings.batch_size, cache_dir=cache_dir,
                use_cache=use_cache, progress=progress, write_cache=write, ray=ray))
            if corpus_info["cached"]:
                log.log(level, "corpus embeddings from cache %s", corpus_info["path"])
        encode_started = time.perf_counter()
        queries = query_encoder(encoder, task, settings.batch_size)
        rows = iter_rows(task, queries, source, settings, stats, rescorer=rescorer, progress=progress)
        if write:
            with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    rows_written += 1
        else:
            rows_written = sum(1 for _ in rows)
    finished = time.perf_counter()
    stats_dict = stats.to_dict()
    warning = margin_warning(stats_dict, settings.to_dict())  # the CLI prints it after the summary
    summary: dict[str, Any] = {
        "output": str(output),
        "rows_written": rows_written,
        "pool_size": len(task.corpus_ids),
        "settings": settings.to_dict(),
        "stats": stats_dict,
        "warnings": [warning] if warning is not None else [],
        "short_queries": short_report(task, stats, settings),
        "corpus_embeddings": corpus_info,
        "teacher": rescorer.path if rescorer is not None else None,
        "seconds": {"total": round(finished - started, 3), "mining": round(finished - encode_started, 3)},
    }
    if not write:
        return summary
    summary_path = sidecar(output, ".summary.json")
    write_json(summary_path, summary)
    files = {"output": str(output), "summary": str(summary_path)}
    if histogram:
        png = sidecar(output, ".scores.png")
        score_kind = "teacher logit" if rescorer is not None else "bi-encoder cosine"
        write_histogram(png, stats.all_positive_scores(), stats.all_negative_scores(),
                        f"{output.name}: {score_kind} scores")
        files["histogram"] = str(png)
    manifest = base_manifest(
        "mining",
        model=encoder.describe(),
        **device_fields(getattr(encoder, "device", None)),
        data=task.description,
        settings=settings.to_dict(),
        seed=settings.seed,
        teacher=rescorer.describe() if rescorer is not None else None,
        outputs={**files, "rows": rows_written, "sha256": sha256_file(output)},
        summary={k: summary[k] for k in ("rows_written", "pool_size", "stats", "warnings")},
    )
    write_json(sidecar(output, ".manifest.json"), manifest)
    files["manifest"] = str(sidecar(output, ".manifest.json"))
    summary["files"] = files
    return summary
