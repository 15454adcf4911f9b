"""Generator-free pseudo-queries: they cost nothing and need no model, so they are the baseline a generator must beat.

    title  the document's title is the query, its text the positive (documents without a title give none);
    ict    Inverse Cloze Task (Lee et al., 2019): one sentence is the query, the passage without it (title kept)
           the positive;
    crop   independent cropping (Contriever, Izacard et al., 2022): two random spans of the document, each
           10-50 % of its words; one is the query, the other the positive (they may overlap, as in Contriever).

Each (document, query index) draws from its own seeded stream, so a query does not depend on which other documents
were sampled or on where an interrupted run resumed.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from embedkit.data.beir import mteb_document_text
from embedkit.data.documents import Document

FREE_STYLES = ("title", "ict", "crop")
CROP_RATIO = (0.1, 0.5)  # Contriever's span length, as a fraction of the document's words
CROP_MIN_WORDS = 8  # shorter documents give spans of one or two words: no pair
# A sentence ends at . ! or ? followed by white space and an upper-case letter, digit or quote (not "e.g. the").
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


@dataclass(frozen=True)
class Pair:
    query: str
    positive: str


def item_rng(seed: int, doc_id: str, index: int) -> random.Random:
    """The random stream of one (document, query index): the same whatever else is generated in the run."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}\0{index}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def queries_available(style: str, doc: Document, k: int) -> int:
    """How many distinct queries `style` can make from `doc` (at most k)."""
    if style == "title":
        return 1 if doc.title.strip() and doc.text.strip() else 0
    if style == "ict":
        n = len(split_sentences(doc.text))
        return min(k, n) if n >= 2 else 0
    if style == "crop":
        return k if len(doc.text.split()) >= CROP_MIN_WORDS else 0
    raise ValueError(f"not a generator-free style: {style!r}")


def make_pair(style: str, doc: Document, index: int, seed: int) -> Pair:
    """Query number `index` (0-based, < queries_available) of `doc` in `style`."""
    if style == "title":
        return Pair(" ".join(doc.title.split()), doc.text.strip())
    if style == "ict":
        sentences = split_sentences(doc.text)
        # The k queries of a document are k different sentences: one seeded permutation per document, read in order.
        order = list(range(len(sentences)))
        item_rng(seed, doc.doc_id, -1).shuffle(order)
        chosen = order[index]
        rest = " ".join(sentences[:chosen] + sentences[chosen + 1:])
        return Pair(sentences[chosen], mteb_document_text(doc.title, rest))  # the title stays, as eval encodes it
    if style == "crop":
        words = doc.text.split()
        rng = item_rng(seed, doc.doc_id, index)
        query, positive = _crop(words, rng), _crop(words, rng)
        return Pair(" ".join(query), " ".join(positive))
    raise ValueError(f"not a generator-free style: {style!r}")


def _crop(words: list[str], rng: random.Random) -> list[str]:
    length = max(1, round(rng.uniform(*CROP_RATIO) * len(words)))
    start = rng.randrange(0, len(words) - length + 1)
    return words[start:start + length]
