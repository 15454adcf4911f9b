"""The false-negative filters and the sampling, on plain arrays (no model, no I/O): easy to check by hand.

Inputs are per query block: `cand_idx` / `cand_scores` [n_queries, window] hold the ranks range_min..range_max-1
of each query's ranking (index -1 where the pool ran out); `pos_ref` [n_queries] is the score the margins are
measured from (see `margin_reference`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedkit.mine.settings import FILTERS, MiningSettings


@dataclass
class FilterOutcome:
    alive: np.ndarray  # bool [n_queries, window]: candidates that survived every filter
    removed_by: np.ndarray  # int8 [n_queries, window]: -1 alive or empty, else index into FILTERS
    candidates: int  # real candidates in the window (index >= 0)
    removed: dict[str, int]  # filter name -> candidates it removed (each counted once, first filter wins)


def positive_mask(cand_idx: np.ndarray, pos_ptr: np.ndarray, pos_idx: np.ndarray, n_docs: int) -> np.ndarray:
    """bool [n_queries, window]: candidate j of query q is one of q's positives (pos_idx[pos_ptr[q]:pos_ptr[q+1]])."""
    nq = cand_idx.shape[0]
    owners = np.repeat(np.arange(nq, dtype=np.int64), np.diff(pos_ptr))
    pos_keys = owners * (n_docs + 1) + pos_idx
    keys = np.arange(nq, dtype=np.int64)[:, None] * (n_docs + 1) + cand_idx
    return np.isin(keys, pos_keys) & (cand_idx >= 0)


def margin_reference(pos_scores: np.ndarray, pos_ptr: np.ndarray, pos_grade: np.ndarray | None,
                     settings: MiningSettings) -> np.ndarray:
    """float [n_queries]: the score each query's margins are measured from.

    The reference set is the query's positives graded `settings.margin_grade` ("top": its highest grade; "all"; K:
    grade >= K, falling back to all of its positives when none is); the reference is the weakest or the strongest
    score in that set (`settings.margin_from`). Without grades every positive is in the set.
    """
    scores = np.asarray(pos_scores, dtype=np.float64)
    ptr = np.asarray(pos_ptr, dtype=np.int64)
    nq = ptr.size - 1
    if nq == 0:
        return np.empty(0, np.float32)
    sizes = np.diff(ptr)
    starts = ptr[:-1]
    in_set = np.ones(scores.size, dtype=bool)
    grade = settings.margin_grade
    if pos_grade is not None and grade != "all":
        grades = np.asarray(pos_grade, dtype=np.int64)
        if grade == "top":
            in_set = grades == np.repeat(np.maximum.reduceat(grades, starts), sizes)
        else:
            in_set = grades >= int(grade)
            none = np.add.reduceat(in_set.astype(np.int64), starts) == 0
            in_set |= np.repeat(none, sizes)
    if settings.margin_from == "strongest":
        ref = np.maximum.reduceat(np.where(in_set, scores, -np.inf), starts)
    else:
        ref = np.minimum.reduceat(np.where(in_set, scores, np.inf), starts)
    return ref.astype(np.float32)


def relative_threshold(pos_ref: np.ndarray, relative_margin: float) -> np.ndarray:
    """A candidate scored above this is removed: pos - |pos| * margin (pos * (1 - margin) when pos > 0)."""
    return pos_ref - np.abs(pos_ref) * relative_margin


def apply_filters(
    cand_idx: np.ndarray,
    cand_scores: np.ndarray,
    pos_ref: np.ndarray,
    is_positive: np.ndarray,
    settings: MiningSettings,
    dup_sim: np.ndarray | None = None,
) -> FilterOutcome:
    valid = cand_idx >= 0
    scores = cand_scores.astype(np.float64)
    ref = pos_ref.astype(np.float64)[:, None]
    tests: dict[str, np.ndarray | None] = {
        "known_positive": is_positive,
        "near_duplicate": (dup_sim >= settings.duplicate_threshold)
        if (dup_sim is not None and settings.duplicate_threshold is not None) else None,
        "absolute_margin": (scores > ref - settings.absolute_margin) if settings.absolute_margin is not None else None,
        "relative_margin": (scores > relative_threshold(ref, settings.relative_margin))
        if settings.relative_margin is not None else None,
        "max_score": (scores > settings.max_score) if settings.max_score is not None else None,
        "min_score": (scores < settings.min_score) if settings.min_score is not None else None,
    }
    alive = valid.copy()
    removed_by = np.full(cand_idx.shape, -1, dtype=np.int8)
    removed: dict[str, int] = {}
    for number, name in enumerate(FILTERS):
        hit = tests[name]
        if hit is None:
            continue
        hit = hit & alive
        removed[name] = int(hit.sum())
        removed_by[hit] = number
        alive &= ~hit
    return FilterOutcome(alive=alive, removed_by=removed_by, candidates=int(valid.sum()), removed=removed)


def sample_negatives(alive: np.ndarray, settings: MiningSettings, query_positions: np.ndarray) -> list[np.ndarray]:
    """Column positions of the chosen negatives for each query, in rank order.

    "top" takes the first survivors; "random" draws without replacement from all survivors with a generator seeded
    by (seed, query position), so a query's draw does not depend on which block or machine mined it.
    """
    chosen = []
    n = settings.num_negatives
    for row, position in zip(alive, query_positions):
        columns = np.flatnonzero(row)
        if columns.size > n:
            if settings.sampling == "top":
                columns = columns[:n]
            else:
                rng = np.random.default_rng([settings.seed, int(position)])
                columns = np.sort(rng.choice(columns, size=n, replace=False))
        chosen.append(columns)
    return chosen
