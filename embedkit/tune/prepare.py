"""What `embedkit tune` learns from the base model before the search: the dev corpus's nearest documents
(`base_model_ranker`, used by embedkit/tune/split.py) and what one round of online mining yields and costs
(`mining_probe`). Each runs as a job of its own process (embedkit/tune/jobs.py)."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from embedkit.device import free_memory, resolve_device, torch_threads
from embedkit.tune.budget import duration

log = logging.getLogger("embedkit.tune")

CHUNK_ROWS = 65536  # documents per block of the dev ranking's exact search
ROUND_SAMPLE = 128  # texts of each kind timed to estimate a mining round (a few seconds on 2 cores)


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


def ranking_model(recipe, device: str):
    """The bi-encoder that ranks the dev corpus: the recipe's base model (its prompts, pooling and max length, as the
    dev evaluation encodes them), or for a reranker recipe its first stage (rerank.first_stage, loaded as its dev
    evaluation loads it): the documents the first stage ranks nearest are the candidates the reranker must order."""
    from embedkit.models.encoder import load_model

    if recipe.task == "rerank":
        return load_model(recipe.rerank.first_stage, device=device)
    m = recipe.model
    return load_model(m.name, pooling=m.pooling, prompts=m.prompts, max_length=m.max_length, dtype=m.dtype,
                      padding_side=m.padding_side, attention=m.attention, device=device)


def ranker_name(recipe) -> str:
    return f"the first stage ({recipe.rerank.first_stage})" if recipe.task == "rerank" else "the base model"


def base_model_ranker(recipe, device) -> Callable[[list[str], list[str], int], list[list[int]]]:
    """rank(queries, documents, k) with `ranking_model`: the dev corpus's nearest documents
    (embedkit/tune/split.py). The documents' embeddings go to the embedding cache (`embedkit eval`'s and
    `embedkit mine`'s), so a second `tune` of the same data does not encode them again (MedQuAD's 14,070 answers:
    6 min on 2 cores)."""
    from embedkit.mine.cache import corpus_vectors
    from embedkit.mine.search import exact_topk

    def rank(queries, documents, k):
        started = time.perf_counter()
        try:
            with torch_threads(recipe.training.threads):
                encoder = ranking_model(recipe, str(resolve_device(device, field="model.device")))
                log.info("ranking %d documents for the %d dev queries with %s (the dev corpus: their nearest "
                         "documents)", len(documents), len(queries), ranker_name(recipe))
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
        log.info("ranked in %s", duration(time.perf_counter() - started))
        return ranked

    return rank
