"""Filters over generated (query, positive) rows, each counting what it removed.

In order (cheap first, the model-based one last, so it encodes only the survivors):

    empty          the generator said nothing usable (after `clean_query`)
    length         fewer than min_words or more than max_words words in the query
    copy           the query copies its positive: its longest word run shared with the positive has at least
                   `copy_min_words` words and covers at least `max_copy` of the query (a small model's favourite
                   failure is to repeat the first sentence; a short title or keyword query that appears in the text
                   stays)
    near_duplicate the same query again (same words after lower-casing and dropping punctuation, anywhere in the
                   run; the first is kept), or one sharing >= `duplicate_jaccard` of its word set with an earlier
                   query of the same document (k samples of one document often differ by a word)
    round_trip     Promptagator's consistency check: the filter model must rank the query's source document
                   within its top K over the whole corpus, else the query is too vague or about something else
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass
from typing import Any, Sequence

FILTER_NAMES = ("empty", "length", "copy", "near_duplicate", "round_trip")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class FilterSettings:
    min_words: int = 2  # one word is rarely a usable training query, and it is what a confused model emits
    max_words: int = 48  # a query longer than this is a paragraph: the model did not answer the prompt
    max_copy: float = 0.8
    copy_min_words: int = 6
    duplicate_jaccard: float | None = 0.8  # None: exact duplicates only
    round_trip_k: int = 0  # 0: off (needs a filter model)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def copied_fraction(query: str, positive: str) -> tuple[int, float]:
    """(length of the longest word run the query shares with the positive, that length / the query's words)."""
    q, p = words(query), words(positive)
    if not q or not p:
        return 0, 0.0
    match = difflib.SequenceMatcher(None, q, p, autojunk=False).find_longest_match(0, len(q), 0, len(p))
    return match.size, match.size / len(q)


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class FilterReport:
    def __init__(self) -> None:
        self.counts = {name: 0 for name in FILTER_NAMES}
        self.examples: dict[str, list[str]] = {name: [] for name in FILTER_NAMES}

    def remove(self, name: str, row: dict[str, Any]) -> None:
        self.counts[name] += 1
        if len(self.examples[name]) < 3:  # a few removed queries make a count readable
            self.examples[name].append(row.get("query", ""))


def cheap_filters(rows: Sequence[dict[str, Any]], settings: FilterSettings, report: FilterReport
                  ) -> list[dict[str, Any]]:
    """Every filter but round_trip, in order; rows keep their order."""
    kept = []
    seen: set[tuple[str, ...]] = set()
    per_doc: dict[str, list[set[str]]] = {}
    for row in rows:
        query_words = words(row["query"])
        if not query_words:
            report.remove("empty", row)
            continue
        n = len(row["query"].split())
        if n < settings.min_words or n > settings.max_words:
            report.remove("length", row)
            continue
        run, fraction = copied_fraction(row["query"], row["positive"])
        if run >= settings.copy_min_words and fraction >= settings.max_copy:
            report.remove("copy", row)
            continue
        key = tuple(query_words)
        word_set = set(query_words)
        earlier = per_doc.setdefault(row["doc_id"], [])
        if key in seen or (settings.duplicate_jaccard is not None
                           and any(_jaccard(word_set, e) >= settings.duplicate_jaccard for e in earlier)):
            report.remove("near_duplicate", row)
            continue
        seen.add(key)
        earlier.append(word_set)
        kept.append(row)
    return kept


def round_trip_filter(rows: Sequence[dict[str, Any]], doc_ids: Sequence[str], doc_vectors: Any,
                      query_vectors: Any, k: int, report: FilterReport, *, chunk_rows: int = 131072
                      ) -> list[dict[str, Any]]:
    """Keep a row when its source document is in the top k of its query over all documents.

    `doc_vectors`: an `embedkit.mine.vectors` source over `doc_ids` (L2-normalised); `query_vectors`: one
    normalised row per row. The search is `embedkit mine`'s exact streamed inner-product top k (ties broken by
    corpus position).
    """
    from embedkit.mine.search import exact_topk

    if not rows:
        return []
    position = {doc_id: i for i, doc_id in enumerate(doc_ids)}
    _scores, top = exact_topk(query_vectors, doc_vectors, min(k, len(doc_ids)), chunk_rows)
    kept = []
    for row, ranked in zip(rows, top):
        if position[row["doc_id"]] in set(ranked.tolist()):
            kept.append(row)
        else:
            report.remove("round_trip", row)
    return kept
