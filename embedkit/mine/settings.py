"""Mining settings: one dataclass shared by `embedkit mine`, the Python API and the trainer's re-mining hook."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from embedkit.errors import ConfigError

SAMPLING = ("random", "top")
MARGIN_FROM = ("weakest", "strongest")
MARGIN_GRADES = ("top", "all")
SEARCH = ("auto", "exact", "hnsw")
ON_SHORT = ("keep", "drop")

# Filter names in the order they are applied. A removed candidate is counted once, under the first filter that
# removes it, so the counts add up to (candidates in window) - (survivors).
FILTERS = ("known_positive", "near_duplicate", "absolute_margin", "relative_margin", "max_score", "min_score")


@dataclass
class MiningSettings:
    """How negatives are chosen for each query.

    range_min, range_max   rank window [range_min, range_max) of the model's ranking of the whole pool (rank 0 is
                           the most similar document; known positives count as ranks). Candidates come only from
                           this window. Skipping the top ranks avoids unlabelled positives ("false negatives").
    num_negatives          how many negatives per query.
    sampling               "random" (seeded, uniform among the survivors of the window) or "top" (the best-scored
                           survivors: NV-Retriever's TopK-PercPos when combined with relative_margin).
    absolute_margin        remove a candidate if  score > pos - absolute_margin.
    relative_margin        remove a candidate if  score > pos - |pos| * relative_margin   (= pos * (1 - perc) for a
                           positive pos; the |pos| form keeps the threshold below pos when pos < 0).
                           `pos` is the query's margin reference, see margin_from / margin_grade.
    margin_from            which positive of the reference set the margins are measured from: "weakest" (the
                           lowest-scored: a negative must score clearly below every reference positive, the safe
                           side against unlabelled positives) or "strongest" (the best-scored: only candidates close
                           to the query's best match are removed; for data with many weak positives).
    margin_grade           which positives form the reference set, by their relevance grade (BEIR qrels score):
                           "top" (default) the query's highest-graded positives, "all" every positive, or an integer
                           K: positives graded >= K (all of the query's positives when none is). Positives outside
                           the set are still never chosen as negatives; they only do not lower the threshold. With
                           binary labels (all grades equal, or no grades: pairs files) every choice is "all".
    max_score, min_score   remove candidates scored above / below an absolute value.
    duplicate_threshold    remove a candidate whose embedding has cosine >= this with any positive of the query
                           (exact and near duplicates of a positive under another id). None disables it.
    seed                   random sampling seed; each query draws from its own generator seeded by (seed, query
                           position), so results do not depend on chunk sizes or thread counts.
    on_short               "keep": a query with fewer than num_negatives survivors keeps what it has; "drop": its
                           rows are left out of the output. Either way it is listed in the summary.
    search                 "exact" (brute-force inner product, streamed over corpus chunks, bounded memory),
                           "hnsw" (faiss IndexHNSWFlat; approximate, holds the whole corpus in memory) or "auto"
                           (exact unless queries x documents > HNSW_MIN_WORK).
    corpus_chunk           documents per chunk when streaming corpus vectors (memory ~ corpus_chunk x dim x 4 B).
    query_block            queries mined together (memory ~ query_block x (dim + range_max) x 12 B).
    """

    range_min: int = 10
    range_max: int = 100
    num_negatives: int = 3
    sampling: str = "random"
    absolute_margin: float | None = None
    relative_margin: float | None = 0.05
    margin_from: str = "weakest"
    margin_grade: str | int = "top"
    max_score: float | None = None
    min_score: float | None = None
    duplicate_threshold: float | None = 0.98
    seed: int = 42
    on_short: str = "keep"
    search: str = "auto"
    corpus_chunk: int = 131072
    query_block: int = 65536
    batch_size: int = 32
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes recorded in the manifest

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "MiningSettings":
        _int(self.range_min, "range_min", minimum=0)
        _int(self.range_max, "range_max", minimum=1)
        if self.range_min >= self.range_max:
            raise ConfigError(f"the rank window is empty: range_min ({self.range_min}) must be below range_max "
                              f"({self.range_max})", field="range")
        _int(self.num_negatives, "num_negatives", minimum=1)
        if self.num_negatives > self.range_max - self.range_min:
            raise ConfigError(f"cannot pick {self.num_negatives} negatives from a window of "
                              f"{self.range_max - self.range_min} ranks; widen --range or lower --num-negatives",
                              field="num_negatives")
        _choice(self.sampling, "sampling", SAMPLING)
        _choice(self.margin_from, "margin_from", MARGIN_FROM)
        self.margin_grade = parse_margin_grade(self.margin_grade)
        _choice(self.on_short, "on_short", ON_SHORT)
        _choice(self.search, "search", SEARCH)
        for name in ("absolute_margin", "relative_margin", "max_score", "min_score", "duplicate_threshold"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ConfigError(f"expected a finite number or nothing, got {value!r}", field=name)
        if self.absolute_margin is not None and self.absolute_margin < 0:
            raise ConfigError("a margin below 0 would keep negatives scored above the positive",
                              field="absolute_margin")
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise ConfigError("relative_margin is a fraction of the positive's score: 0 <= value < 1 (0.05 = 5%)",
                              field="relative_margin")
        _int(self.seed, "seed", minimum=0)
        _int(self.corpus_chunk, "corpus_chunk", minimum=1)
        _int(self.query_block, "query_block", minimum=1)
        _int(self.batch_size, "batch_size", minimum=1)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_margin_grade(value: Any) -> str | int:
    """'top' | 'all' | a grade >= 1 (int, or its text as the CLI gives it)."""
    if value in MARGIN_GRADES:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"expected 'top', 'all' or a relevance grade >= 1, got {value!r}", field="margin_grade")
    return value


def parse_range(text: str) -> tuple[int, int]:
    """'10:100' -> (10, 100); ':50' -> (0, 50)."""
    lo, sep, hi = str(text).partition(":")
    try:
        if not sep:
            raise ValueError
        return (int(lo) if lo.strip() else 0), int(hi)
    except ValueError:
        raise ConfigError(f"expected a rank window START:END such as 10:100, got {text!r}", field="range") from None


def _int(value: Any, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"expected an integer >= {minimum}, got {value!r}", field=name)


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"expected one of {', '.join(choices)}, got {value!r}", field=name)
