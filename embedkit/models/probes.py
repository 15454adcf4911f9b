"""Probe vectors: a few texts and the vectors a model gave them, stored beside the model to catch drift.

A trained model folder carries `probe_vectors.json` (written by the trainer through `write_probes`). Whatever later
loads that model (an ONNX export, `embedkit serve`, a vLLM server) re-embeds the same texts and compares with
`check_probes`; a mismatch means the weights, tokenizer, pooling or prompts are not what was trained.

File format (JSON object):

    {
      "format": "embedkit-probes/1",          # optional on read; always written
      "texts":  ["...", ...],                  # n probe texts
      "kind":   ["query" | "document", ...],   # n kinds (picks the model's prompt)
      "vectors": [[float, ...], ...],          # n x dim vectors as the model produced them
      "normalize": true,                       # optional: whether the vectors are L2-normalised
      "atol": 0.0001,                          # optional: the tolerance a check should use by default
      "model_fingerprint": "sha256...",        # optional: Encoder.fingerprint of the writer
      "created_by": "train" | "export" | ...   # optional: who wrote it
    }

It lives beside the encoders (embedkit.models), below every stage that writes or checks probes: training and
`embedkit llm` write them, export and serving check them.

`vectors_fn(texts, kind) -> np.ndarray [len(texts), dim]` is any embedding function: `Encoder.encode`,
`OnnxEncoder.encode`, or a client of a remote OpenAI-compatible server.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from embedkit.atomic import write_json
from embedkit.errors import ModelError

PROBES_NAME = "probe_vectors.json"
PROBES_FORMAT = "embedkit-probes/1"
DEFAULT_ATOL = 1e-4

# Short and long, query and document, general and domain, punctuation and digits: enough to exercise the tokenizer,
# the prompt, the pooling over padding and the normalisation.
DEFAULT_PROBES: tuple[tuple[str, str], ...] = (
    ("what are the symptoms of diabetes?", "query"),
    ("Insulin lowers the level of glucose in the blood.", "document"),
    ("how do interest rates affect inflation", "query"),
    ("The court ruled that the contract was void because one party had been misled about the price.", "document"),
    ("a", "document"),
    ("COVID-19 vaccines reduced hospitalisation by 90% in adults over 65 (n=12,000).", "document"),
    ("How is asthma treated in children?", "query"),
    ("A man is playing a guitar on the stage while the audience sings along.", "document"),
)

VectorsFn = Callable[[Sequence[str], str], np.ndarray]

# A served text must get the same vector alone or in any batch (issue #16): the int8 graph quantises each token on
# its own, so only float rounding differs (~1e-7). Dynamic per-tensor int8 differed by up to 0.04.
BATCH_INVARIANCE_ATOL = 1e-4

# Texts of very different lengths (1 to ~120 tokens), so every batch carries real padding.
BATCH_TEXTS: tuple[str, ...] = tuple(t for t, _ in DEFAULT_PROBES) + (
    "Is it safe?",
    "42",
    "résumé naïve café – “quotes” and emoji 🙂",
    "The committee postponed its decision on the new drug until the long-term safety data from the third trial "
    "phase, which followed more than four thousand patients for five years, had been reviewed by independent experts.",
    "Photosynthesis converts light, water and carbon dioxide into glucose and oxygen inside chloroplasts. " * 4,
    "what is the capital of australia",
    "Tenants are usually entitled to reasonable notice before a landlord enters the rented home.",
    "symptoms",
)


@dataclass
class ProbeCheck:
    """The outcome of a probe check; `ok` is False on any mismatch."""

    ok: bool
    n: int
    max_abs_diff: float
    min_cosine: float
    atol: float
    path: str
    worst_text: str

    def summary(self) -> str:
        verdict = "match" if self.ok else "MISMATCH"
        return (f"probe vectors {verdict}: {self.n} probes, max |diff| {self.max_abs_diff:.2e} (atol {self.atol:.0e}), "
                f"min cosine {self.min_cosine:.6f}" + ("" if self.ok else f", worst probe {self.worst_text!r}"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probes_path(folder: str | Path) -> Path:
    return Path(folder) / PROBES_NAME


def has_probes(folder: str | Path) -> bool:
    return probes_path(folder).is_file()


def read_probes(folder: str | Path) -> dict[str, Any]:
    """Read and validate `probe_vectors.json` in `folder` (one-line ModelError on anything malformed)."""
    path = probes_path(folder)
    if not path.is_file():
        raise ModelError("no probe vectors in this folder", path=path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"unreadable probe vectors ({exc})", path=path) from None
    if not isinstance(data, dict):
        raise ModelError("probe vectors must be a JSON object", path=path)
    for key in ("texts", "kind", "vectors"):
        if not isinstance(data.get(key), list):
            raise ModelError("missing or not a list", path=path, field=key)
    texts, kinds, vectors = data["texts"], data["kind"], data["vectors"]
    if not texts or not (len(texts) == len(kinds) == len(vectors)):
        raise ModelError(f"texts, kind and vectors must be non-empty and of equal length "
                         f"({len(texts)}, {len(kinds)}, {len(vectors)})", path=path)
    if not all(isinstance(t, str) for t in texts):
        raise ModelError("every probe text must be a string", path=path, field="texts")
    bad_kinds = sorted({k for k in kinds if k not in ("query", "document")}, key=str)
    if bad_kinds:
        raise ModelError(f"kinds must be 'query' or 'document', not {bad_kinds}", path=path, field="kind")
    try:
        matrix = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError):
        raise ModelError("vectors must be a list of equal-length number lists", path=path, field="vectors") from None
    if matrix.ndim != 2 or matrix.shape[1] == 0 or not np.isfinite(matrix).all():
        raise ModelError("vectors must be a finite n x dim matrix", path=path, field="vectors")
    data["vectors"] = matrix
    return data


def write_probes(
    encoder: Any,
    folder: str | Path,
    *,
    probes: Sequence[tuple[str, str]] = DEFAULT_PROBES,
    atol: float = DEFAULT_ATOL,
    created_by: str = "train",
    vectors_fn: VectorsFn | None = None,
) -> Path:
    """Embed the probe texts with `encoder` (or `vectors_fn`) and write `probe_vectors.json` into `folder`, atomically.

    Call it after the model is saved: the probes then describe exactly what is in the folder.
    """
    fn = vectors_fn or (lambda texts, kind: encoder.encode(list(texts), kind=kind))
    texts = [t for t, _ in probes]
    kinds = [k for _, k in probes]
    vectors = embed_by_kind(fn, texts, kinds)
    record: dict[str, Any] = {
        "format": PROBES_FORMAT,
        "texts": texts,
        "kind": kinds,
        "vectors": [[float(x) for x in row] for row in vectors],
        "normalize": bool(getattr(encoder, "normalize", True)),
        "atol": float(atol),
        "model_fingerprint": getattr(encoder, "fingerprint", None),
        "created_by": created_by,
    }
    return write_json(probes_path(folder), record, indent=None)


def check_probes(vectors_fn: VectorsFn, folder: str | Path, atol: float | None = None) -> ProbeCheck:
    """Re-embed the probes of `folder` with `vectors_fn` and compare: ok when every |diff| <= atol.

    `atol` defaults to the tolerance recorded in the file, else 1e-4. Raises ModelError when the file is malformed or
    the dimensions differ (that is a mismatch no tolerance can excuse).
    """
    data = read_probes(folder)
    path = probes_path(folder)
    expected: np.ndarray = data["vectors"]
    tolerance = float(atol if atol is not None else data.get("atol", DEFAULT_ATOL))
    got = embed_by_kind(vectors_fn, data["texts"], data["kind"])
    if got.shape != expected.shape:
        raise ModelError(f"probe vectors have shape {list(expected.shape)} but the model gives {list(got.shape)}",
                         path=path)
    diff = np.abs(got - expected)
    per_row = diff.max(axis=1)
    denom = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    cosines = (got * expected).sum(axis=1) / np.maximum(denom, 1e-12)
    worst = int(per_row.argmax())
    ok = bool(np.isfinite(got).all() and per_row.max() <= tolerance)
    return ProbeCheck(ok=ok, n=len(got), max_abs_diff=float(per_row.max()), min_cosine=float(cosines.min()),
                      atol=tolerance, path=str(path), worst_text=data["texts"][worst])


def batch_invariance(encode_fn: Callable[[Sequence[str]], np.ndarray], texts: Sequence[str] | None = None, *,
                     batch_sizes: Sequence[int] = (8, 32), seed: int = 0) -> float:
    """Max |diff| between each text's vector encoded alone and encoded inside batches with other texts.

    `encode_fn(texts) -> [len(texts), dim]` must run its texts as ONE batch (e.g. `lambda t: encoder.encode(t,
    "document", batch_size=len(t))`, or one request to a server). Every text is encoded alone, then once per size in
    `batch_sizes` inside a seeded random batch of exactly that many texts (others of different lengths, repeated when
    there are too few). Compare the result with BATCH_INVARIANCE_ATOL. `texts` defaults to BATCH_TEXTS.
    """
    texts = list(BATCH_TEXTS if texts is None else texts)
    if not texts:
        raise ModelError("batch_invariance needs at least one text")
    alone = np.concatenate([np.asarray(encode_fn([t]), dtype=np.float32) for t in texts])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for size in batch_sizes:
        order = rng.permutation(len(texts))
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            fill = rng.permutation(np.resize(order, size * 2))  # other texts (repeats when there are too few)
            rows = np.concatenate([rows, fill[: size - len(rows)]]) if len(rows) < size else rows
            got = np.asarray(encode_fn([texts[i] for i in rows]), dtype=np.float32)
            worst = max(worst, float(np.abs(got - alone[rows]).max()))
    return worst


def embed_by_kind(fn: VectorsFn, texts: Sequence[str], kinds: Sequence[str]) -> np.ndarray:
    """Call fn once per kind, keep the original order."""
    out: np.ndarray | None = None
    for kind in ("query", "document"):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        if not rows:
            continue
        vectors = np.asarray(fn([texts[i] for i in rows], kind), dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(rows):
            raise ModelError(f"the embedding function returned shape {list(vectors.shape)} for {len(rows)} texts")
        if out is None:
            out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        out[rows] = vectors
    assert out is not None
    return out
