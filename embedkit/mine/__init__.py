"""Mine stage: hard negatives that avoid false negatives (issue #5).

    embedkit mine --model minilm --data ../shared/data/scifact --split train --output mined.jsonl

Python API (names load lazily, so importing embedkit.mine is cheap):
    MiningSettings                 window, number, sampling, margins, near-duplicate threshold, seed, search
    load_task(data, split=, corpus=)  -> MiningTask (pool + queries with all their positives)
    mine_to_file(encoder, task, output, settings, ...) -> summary dict (writes jsonl, summary, png, manifest)
    mine_embeddings(query_vectors, n_queries, corpus_source, pos_ptr, pos_idx, settings)  index-level engine
    RemineState, remine(encoder, state)   online re-mining for the trainer (see embedkit/mine/online.py)
"""

from __future__ import annotations

from embedkit._lazy import lazy_exports

_EXPORTS = {
    "MiningSettings": "embedkit.mine.settings",
    "parse_range": "embedkit.mine.settings",
    "MiningTask": "embedkit.mine.mining",
    "load_task": "embedkit.mine.mining",
    "task_from_pairs": "embedkit.mine.mining",
    "task_from_beir": "embedkit.mine.mining",
    "mine_to_file": "embedkit.mine.run",
    "mine_embeddings": "embedkit.mine.core",
    "MiningStats": "embedkit.mine.core",
    "ArraySource": "embedkit.mine.vectors",
    "NpyFileSource": "embedkit.mine.vectors",
    "RemineState": "embedkit.mine.online",
    "remine": "embedkit.mine.online",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
