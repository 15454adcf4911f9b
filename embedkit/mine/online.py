"""Online re-mining: the trainer asks for fresh negatives from the model it is training.

    from embedkit.mine import MiningSettings, RemineState, remine

    state = RemineState.from_examples(train_pairs, MiningSettings(range_min=10, range_max=50, num_negatives=1))
    # or RemineState.from_beir(load_beir(folder, "train"), settings), or RemineState(task=load_task(...), ...)
    for epoch in range(epochs):
        examples = remine(encoder, state)      # list[TrainingExample] with negatives and scores
        ...train one epoch on `examples` ...   # state.last_stats holds this round's filter counts

Every call re-encodes the pool with the encoder as it is now (no cache by default: the weights changed), applies the same
filters as `embedkit mine`, and draws with seed `settings.seed + round` (round = 0, 1, ...), so successive rounds
sample different negatives while a re-run of the whole training reproduces them. `encoder` is anything with
`encode(texts, kind=..., batch_size=..., normalize=...) -> float32 array` (an embedkit Encoder); `encode` switches a
torch module to eval mode and back. Rows of queries short of negatives follow `settings.on_short`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

from embedkit.data import TrainingExample
from embedkit.mine.cache import corpus_vectors
from embedkit.mine.core import MiningStats
from embedkit.mine.mining import MiningTask, iter_rows, query_encoder, task_from_beir, task_from_pairs
from embedkit.mine.settings import MiningSettings


@dataclass
class RemineState:
    task: MiningTask
    settings: MiningSettings
    rounds: int = 0  # completed re-mining rounds
    vary_seed: bool = True  # seed + round; False draws with settings.seed every time
    last_stats: MiningStats | None = None

    @classmethod
    def from_examples(cls, examples: Iterable, settings: MiningSettings | None = None,
                      corpus: dict[str, dict] | None = None) -> "RemineState":
        """From (query, positive) pairs (TrainingExample or anything with .query/.positive) and an optional corpus."""
        return cls(task=task_from_pairs(examples, corpus), settings=settings or MiningSettings())

    @classmethod
    def from_beir(cls, dataset, settings: MiningSettings | None = None) -> "RemineState":
        return cls(task=task_from_beir(dataset), settings=settings or MiningSettings())


def remine(encoder, state: RemineState, *, progress: bool = False, use_cache: bool = False,
           cache_dir=None) -> list:
    """Mine negatives for every (query, positive) of `state.task` with the current `encoder`; advance the round.

    `use_cache` reads / writes the corpus-embedding cache (keyed by the weights' fingerprint): only for weights
    that are worth caching, e.g. the loaded base model before the first optimizer step.
    """
    settings = replace(state.settings, seed=state.settings.seed + (state.rounds if state.vary_seed else 0))
    stats = MiningStats()
    task = state.task
    with corpus_vectors(encoder, task.corpus_ids, task.corpus_texts, batch_size=settings.batch_size,
                        use_cache=use_cache, cache_dir=cache_dir, progress=progress) as (source, _info):
        rows = list(iter_rows(task, query_encoder(encoder, task, settings.batch_size), source, settings, stats,
                              progress=progress))
    state.rounds += 1
    state.last_stats = stats
    return [TrainingExample(query=r["query"], positive=r["positive"], negatives=r["negatives"], scores=r["scores"])
            for r in rows]
