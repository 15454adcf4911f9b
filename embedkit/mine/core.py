"""Index-level mining: query vectors x corpus vectors -> chosen negatives per query, plus statistics.

Nothing here knows about texts or files, so the 1M-document benchmark, the CLI and the trainer's re-mining hook all
run this same code. Queries are processed in blocks of `settings.query_block`; for each block:

  1. top-`range_max` search over the corpus, streamed chunk by chunk (search.py);
  2. the block's positive vectors are gathered (one streaming pass) and scored against their query;
  3. near-duplicate similarity of each window candidate to the query's positives (one streaming pass; skipped when
     `duplicate_threshold` is None);
  4. optional rescoring (cross-encoder) of the candidates still in play and of the positives;
  5. filters (filters.py) and sampling.

Memory per block: corpus_chunk x dim + query_block x (dim + 2 x range_max) floats, independent of the corpus size
(except search="hnsw", whose index holds the corpus).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from embedkit.mine.filters import FilterOutcome, apply_filters, margin_reference, positive_mask, sample_negatives
from embedkit.mine.search import HnswIndex, choose_search, exact_topk, gather_rows, max_similarity_to_groups
from embedkit.mine.settings import FILTERS, MiningSettings
from embedkit.mine.vectors import VectorSource

log = logging.getLogger(__name__)


class Rescorer(Protocol):
    """Rescores (query, document) pairs, e.g. with a cross-encoder. Positions are global query positions."""

    def score_candidates(self, query_positions: np.ndarray, cand_idx: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """float [n, window]: new scores where mask is True (other entries are ignored)."""
        ...

    def score_positives(self, query_positions: np.ndarray, pos_idx: np.ndarray) -> np.ndarray:
        """float [n_pairs]: new score of each (query, positive) pair."""
        ...


@dataclass
class BlockResult:
    start: int  # global position of the block's first query
    negatives: list[np.ndarray]  # per query: corpus indices of the chosen negatives (best score first)
    negative_scores: list[np.ndarray]
    positive_scores: np.ndarray  # per (query, positive) pair of the block, in pos_idx order


@dataclass
class MiningStats:
    queries: int = 0
    pairs: int = 0
    candidates: int = 0  # real candidates in the windows (before filters)
    removed: dict[str, int] = field(default_factory=lambda: {name: 0 for name in FILTERS})
    survivors: int = 0
    negatives: int = 0
    short: list[dict[str, Any]] = field(default_factory=list)  # {"query": position, "found": n}
    rows_short: int = 0  # (query, positive) rows whose query found fewer than num_negatives
    rows_without_negative: int = 0  # ... and none at all
    positive_above_window: int = 0  # queries with a positive ranked before range_min (the skipped head)
    positive_in_window: int = 0  # queries with a positive inside the window (the filter removed it)
    positive_not_retrieved: int = 0  # queries with no positive in the top range_max at all
    positive_scores: list[np.ndarray] = field(default_factory=list)
    negative_scores: list[np.ndarray] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: {"search": 0.0, "positives": 0.0, "duplicates": 0.0,
                                                               "rescore": 0.0, "filter": 0.0})
    search_method: str = ""

    def add(self, outcome: FilterOutcome) -> None:
        self.candidates += outcome.candidates
        for name, count in outcome.removed.items():
            self.removed[name] += count
        self.survivors += int(outcome.alive.sum())

    def all_positive_scores(self) -> np.ndarray:
        return np.concatenate(self.positive_scores) if self.positive_scores else np.empty(0, np.float32)

    def all_negative_scores(self) -> np.ndarray:
        return np.concatenate(self.negative_scores) if self.negative_scores else np.empty(0, np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "pairs": self.pairs,
            "search": self.search_method,
            "candidates_in_window": self.candidates,
            "removed": dict(self.removed),
            "survivors": self.survivors,
            "negatives_written": self.negatives,
            "queries_short": len(self.short),
            "rows_short": self.rows_short,
            "rows_without_negative": self.rows_without_negative,
            "positive_ranked_before_window": self.positive_above_window,
            "positive_ranked_in_window": self.positive_in_window,
            "positive_not_in_top_range_max": self.positive_not_retrieved,
            "positive_scores": distribution(self.all_positive_scores()),
            "negative_scores": distribution(self.all_negative_scores()),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


MARGIN_WARNING_SHARE = 0.5  # the margins removed at least this share of the candidates, and ...
SHORT_WARNING_SHARE = 0.5  # ... at least this share of the rows are short of negatives


def margin_warning(stats: dict[str, Any], settings: dict[str, Any], *, names: str = "cli") -> dict[str, Any] | None:
    """The one-line warning when the margin filters removed most candidates and left most rows short of
    negatives (a sign of weak positives: the threshold follows the positive's score), else None.

    `stats` is MiningStats.to_dict(), `settings` MiningSettings.to_dict(); `names` "cli" or "recipe" picks how the
    advice names the settings (--margin-from / mining.margin_from)."""
    candidates = stats.get("candidates_in_window") or 0
    pairs = stats.get("pairs") or 0
    removed = stats.get("removed", {})
    margin = int(removed.get("relative_margin", 0)) + int(removed.get("absolute_margin", 0))
    short = int(stats.get("rows_short", 0))
    if not candidates or not pairs or margin < MARGIN_WARNING_SHARE * candidates or short < SHORT_WARNING_SHARE * pairs:
        return None
    none = int(stats.get("rows_without_negative", 0))
    advice = ("--margin-from strongest, a smaller --relative-margin, or `embedkit tune` (which then searches the "
              "margin)") if names == "cli" else ("mining.margin_from: strongest, a smaller mining.relative_margin, "
                                                 "or `embedkit tune` (which then searches the margin)")
    which = " + ".join(name.replace("_", " ") for name in ("relative_margin", "absolute_margin")
                       if settings.get(name) is not None) or "margin"
    message = (f"the {which} filter removed {margin:,} of {candidates:,} candidates ({margin / candidates:.0%}) and "
               f"left {short:,} of {pairs:,} rows ({short / pairs:.0%}; {none:,} with no negative at all) short of "
               f"negatives: the margin is measured from the query's {settings.get('margin_from', 'weakest')} "
               f"positive and many positives score low (weak or graded positives?); try {advice}")
    return {"code": "margin_removes_most", "margin_removed": margin, "candidates": candidates,
            "rows_short": short, "rows_without_negative": none, "rows": pairs, "message": message}


def distribution(values: np.ndarray) -> dict[str, float | int]:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"count": 0}
    q = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"count": int(values.size), "mean": round(float(values.mean()), 4), "std": round(float(values.std()), 4),
            "min": round(float(q[0]), 4), "p25": round(float(q[1]), 4), "median": round(float(q[2]), 4),
            "p75": round(float(q[3]), 4), "max": round(float(q[4]), 4)}


QueryVectors = np.ndarray | Callable[[int, int], np.ndarray]


def mine_embeddings(
    queries: QueryVectors,
    n_queries: int,
    corpus: VectorSource,
    pos_ptr: np.ndarray,
    pos_idx: np.ndarray,
    settings: MiningSettings,
    *,
    pos_grade: np.ndarray | None = None,
    stats: MiningStats | None = None,
    rescorer: Rescorer | None = None,
    progress: bool = False,
) -> Iterator[BlockResult]:
    """Mine negatives for every query; yields one BlockResult per query block (stats are filled in as it goes).

    queries: a [n_queries, dim] array, or a function (start, end) -> vectors of those queries (so a text pipeline
    can encode one block at a time). Positives of query q: pos_idx[pos_ptr[q]:pos_ptr[q+1]] (corpus indices; every
    query needs at least one). `pos_grade` (aligned with pos_idx) holds their relevance grades, which decide the
    margin reference (`settings.margin_grade`). Vectors should be L2-normalised: scores are inner products.
    progress: log the steps at INFO (a command's own run) rather than DEBUG (a round of mining inside training).
    """
    settings.validate()
    stats = stats if stats is not None else MiningStats()
    level = logging.INFO if progress else logging.DEBUG
    pos_ptr = np.asarray(pos_ptr, dtype=np.int64)
    pos_idx = np.asarray(pos_idx, dtype=np.int64)
    if pos_ptr.shape != (n_queries + 1,) or pos_ptr[0] != 0 or pos_ptr[-1] != pos_idx.size:
        raise ValueError("pos_ptr must have n_queries + 1 entries, from 0 to len(pos_idx)")
    if n_queries and np.diff(pos_ptr).min() < 1:
        raise ValueError("every query needs at least one positive")
    if pos_idx.size and (pos_idx.min() < 0 or pos_idx.max() >= corpus.n):
        raise ValueError("positive index outside the corpus")
    if pos_grade is not None:
        pos_grade = np.asarray(pos_grade, dtype=np.int64)
        if pos_grade.shape != pos_idx.shape:
            raise ValueError("pos_grade must have one grade per entry of pos_idx")
    method = choose_search(settings.search, n_queries, corpus.n)
    stats.search_method = method
    k = settings.range_max
    lo, hi = settings.range_min, settings.range_max
    hnsw = None
    for a in range(0, n_queries, settings.query_block):
        b = min(a + settings.query_block, n_queries)
        q = np.ascontiguousarray(queries(a, b) if callable(queries) else queries[a:b], dtype=np.float32)
        if q.shape != (b - a, corpus.dim):
            raise ValueError(f"query vectors have shape {q.shape}, expected {(b - a, corpus.dim)}")
        m = b - a
        t0 = time.perf_counter()
        if method == "hnsw":
            if hnsw is None:
                log.log(level, f"building HNSW index over {corpus.n:,} documents")
                hnsw = HnswIndex(corpus, settings.corpus_chunk)
            top_s, top_i = hnsw.search(q, k)
        else:
            log.log(level, f"searching {m:,} queries x {corpus.n:,} documents (exact, chunks of "
                           f"{settings.corpus_chunk:,})")
            top_s, top_i = exact_topk(q, corpus, k, settings.corpus_chunk)
        t1 = time.perf_counter()
        # Positives of this block, re-based to the block.
        ptr = pos_ptr[a:b + 1] - pos_ptr[a]
        pidx = pos_idx[pos_ptr[a]:pos_ptr[b]]
        owner = np.repeat(np.arange(m), np.diff(ptr))
        pos_vecs = gather_rows(corpus, pidx, settings.corpus_chunk)
        pos_scores = np.einsum("ij,ij->i", q[owner], pos_vecs).astype(np.float32)
        is_pos_full = positive_mask(top_i, ptr, pidx, corpus.n)
        t2 = time.perf_counter()
        stats.positive_above_window += int(is_pos_full[:, :lo].any(axis=1).sum())
        stats.positive_in_window += int((is_pos_full[:, lo:hi].any(axis=1) & ~is_pos_full[:, :lo].any(axis=1)).sum())
        stats.positive_not_retrieved += int((~is_pos_full.any(axis=1)).sum())
        cand_i = np.ascontiguousarray(top_i[:, lo:hi])
        cand_s = np.ascontiguousarray(top_s[:, lo:hi])
        is_pos = is_pos_full[:, lo:hi]
        dup = None
        if settings.duplicate_threshold is not None:
            check = (cand_i >= 0) & ~is_pos
            rows, cols = np.nonzero(check)
            dup = np.full(cand_i.shape, -np.inf, dtype=np.float32)
            dup[rows, cols] = max_similarity_to_groups(corpus, cand_i[rows, cols], rows, ptr, pos_vecs,
                                                       settings.corpus_chunk)
        t3 = time.perf_counter()
        if rescorer is not None:
            in_play = (cand_i >= 0) & ~is_pos
            if dup is not None:
                in_play &= ~(dup >= settings.duplicate_threshold)
            positions = np.arange(a, b)
            new = np.asarray(rescorer.score_candidates(positions, cand_i, in_play), dtype=np.float32)
            cand_s = np.where(in_play, new, cand_s).astype(np.float32)
            # Re-rank the window by the new scores; candidates out of play keep their place at the end.
            key = np.where(in_play, -cand_s.astype(np.float64), np.inf)
            order = np.argsort(key, axis=1, kind="stable")
            cand_i, cand_s, is_pos = (np.take_along_axis(x, order, axis=1) for x in (cand_i, cand_s, is_pos))
            if dup is not None:
                dup = np.take_along_axis(dup, order, axis=1)
            pos_scores = np.asarray(rescorer.score_positives(positions[owner], pidx), dtype=np.float32)
        t4 = time.perf_counter()
        grades = pos_grade[pos_ptr[a]:pos_ptr[b]] if pos_grade is not None else None
        pos_ref = margin_reference(pos_scores, ptr, grades, settings)
        outcome = apply_filters(cand_i, cand_s, pos_ref, is_pos, settings, dup)
        chosen = sample_negatives(outcome.alive, settings, np.arange(a, b))
        negatives = [cand_i[r, c] for r, c in enumerate(chosen)]
        negative_scores = [cand_s[r, c] for r, c in enumerate(chosen)]
        t5 = time.perf_counter()
        stats.add(outcome)
        stats.queries += m
        stats.pairs += int(pidx.size)
        stats.positive_scores.append(pos_scores)
        counts = np.diff(ptr)
        for r, neg_s in enumerate(negative_scores):
            if neg_s.size < settings.num_negatives:
                stats.short.append({"query": a + r, "found": int(neg_s.size)})
                stats.rows_short += int(counts[r])
                stats.rows_without_negative += int(counts[r]) if neg_s.size == 0 else 0
            if neg_s.size and (settings.on_short == "keep" or neg_s.size == settings.num_negatives):
                stats.negatives += int(neg_s.size) * int(counts[r])
                stats.negative_scores.append(np.repeat(neg_s, counts[r]))
        for name, seconds in zip(("search", "positives", "duplicates", "rescore", "filter"),
                                 (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            stats.seconds[name] += seconds
        yield BlockResult(start=a, negatives=negatives, negative_scores=negative_scores, positive_scores=pos_scores)
