"""Probe vectors: the embeddings of a few fixed texts, stored with a model to prove a copy is the same model.

`probe_vectors.json` holds, for each of PROBE_TEXTS, the vector as a query and as a document. An exported (ONNX)
or served copy re-embeds the texts and compares (`compare_probes`): a wrong pooling, prompt, tokenizer or weight
file shows up as a cosine well below 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

PROBE_FILE = "probe_vectors.json"
PROBE_TEXTS = [
    "What are the symptoms of type 2 diabetes?",
    "Aspirin irreversibly inhibits cyclooxygenase and reduces platelet aggregation.",
    "How do I reset my password?",
    "The mitochondria is the powerhouse of the cell.",
    "a",
    "Ünïcödé, emoji 🙂 and 数字 123 mixed in one line.",
    "Short query",
    " ".join(["A long document that will be truncated by models with a short maximum length."] * 40),
]


def probe_vectors(encoder) -> dict[str, Any]:
    vectors = {kind: encoder.encode(PROBE_TEXTS, kind=kind, batch_size=8, normalize=True) for kind in ("query", "document")}
    return {
        "format": "embedkit.probes/1",
        "texts": PROBE_TEXTS,
        "normalized": True,
        "dim": int(vectors["query"].shape[1]),
        "fingerprint": encoder.fingerprint,
        "query": np.round(vectors["query"].astype(np.float64), 7).tolist(),
        "document": np.round(vectors["document"].astype(np.float64), 7).tolist(),
    }


def write_probe_vectors(encoder, folder: str | Path) -> Path:
    from embedkit.atomic import write_json

    return write_json(Path(folder) / PROBE_FILE, probe_vectors(encoder), indent=None)


def compare_probes(folder: str | Path, encode: Callable[[list[str], str], np.ndarray]) -> dict[str, float]:
    """Minimum cosine per kind between stored probes and `encode(texts, kind)` (1.0 = same model)."""
    import json

    stored = json.loads((Path(folder) / PROBE_FILE).read_text())
    out = {}
    for kind in ("query", "document"):
        ref = np.asarray(stored[kind], dtype=np.float64)
        got = np.asarray(encode(stored["texts"], kind), dtype=np.float64)
        got /= np.linalg.norm(got, axis=1, keepdims=True) + 1e-12
        ref /= np.linalg.norm(ref, axis=1, keepdims=True) + 1e-12
        out[kind] = float((ref * got).sum(1).min())
    return out
