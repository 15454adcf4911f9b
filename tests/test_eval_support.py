"""Helpers for the eval tests (no tests here): a fake encoder and tiny data sets written to tmp folders.

The fake encoder is a legitimate stand-in for unit-testing metric, search, cache and report logic: it has the
Encoder interface, is deterministic, and texts that share words get similar embeddings (hashed bag of words),
so retrieval on it is meaningful; `noise` blends in a per-text random vector to make a clearly worse model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def _word_vector(word: str, dim: int, salt: str = "") -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(f"{salt}{word}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim)


class FakeEncoder:
    def __init__(self, dim: int = 32, noise: float = 0.0, name: str = "fake", prompts: dict | None = None) -> None:
        self.dim, self.noise, self.name = dim, noise, name
        self.prompts = prompts or {}
        self.fingerprint = hashlib.sha256(f"{name}:{dim}:{noise}".encode()).hexdigest()
        self.calls: list[tuple[str, int]] = []  # (kind, number of texts) per encode call

    def describe(self) -> dict:
        return {"name": self.name, "path": None, "fingerprint": self.fingerprint, "pooling": "mean",
                "prompts": self.prompts, "max_length": 64, "dim": self.dim, "dtype": "float32"}

    def encode(self, texts, kind="query", batch_size=32, normalize=True, show_progress=None):
        assert kind in ("query", "document")
        self.calls.append((kind, len(texts)))
        out = np.zeros((len(texts), self.dim))
        for i, text in enumerate(texts):
            text = self.prompts.get(kind, "") + text
            words = [w.strip(".,").lower() for w in text.split()] or [""]
            v = sum(_word_vector(w, self.dim) for w in words)
            v = v / (np.linalg.norm(v) + 1e-12)
            if self.noise:
                r = _word_vector(text, self.dim, salt="noise")
                v = (1 - self.noise) * v + self.noise * r / np.linalg.norm(r)
            out[i] = v
        if normalize:
            out /= np.linalg.norm(out, axis=1, keepdims=True) + 1e-12
        return out.astype(np.float32)


TOPICS = ["apple", "river", "guitar", "planet", "coffee", "soccer", "winter", "robot", "garden", "ocean",
          "violin", "desert", "castle", "rocket", "forest", "bridge", "camera", "island", "lemon", "tiger"]


def write_beir(folder: Path, *, n_topics: int = 20, unknown_doc_in_qrels: bool = False) -> Path:
    """A tiny BEIR folder: one query and two documents per topic (one relevant)."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus, queries, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for i, topic in enumerate(TOPICS[:n_topics]):
        corpus.append({"_id": f"d{i}a", "title": topic, "text": f"all about the {topic} and {topic} facts"})
        corpus.append({"_id": f"d{i}b", "title": "", "text": f"a note that mentions {topic} once"})
        queries.append({"_id": f"q{i}", "text": f"tell me about {topic} facts"})
        qrels.append(f"q{i}\td{i}a\t1")
    if unknown_doc_in_qrels:
        qrels.append("q0\tno-such-doc\t1")
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    return folder


def write_sts(path: Path, *, with_scores: bool = True, n: int = 40) -> Path:
    """A tiny STS file: pairs share 0..3 of 4 words with gold score = shared words (plus a fixed jitter).

    No pair is two identical sentences: their cosine is 1 up to float rounding, and such near-ties would make
    Spearman depend on the last bit of the arithmetic.
    """
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        a = list(rng.choice(TOPICS, 4, replace=False))
        shared = i % 4
        b = a[:shared] + list(rng.choice([t for t in TOPICS if t not in a], 4 - shared, replace=False))
        row = {"sentence1": " ".join(a), "sentence2": " ".join(b)}
        if with_scores:
            row["score"] = float(shared) + 0.01 * i
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
