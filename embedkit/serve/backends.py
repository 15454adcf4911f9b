"""What the server runs: a model behind two calls, `token_ids` (per request, any thread) and `embed_ids` (the batch).

`TorchBackend` wraps an `Encoder` (any model folder or embedded name); `OnnxBackend` wraps an `OnnxEncoder` (an
`embedkit export --format onnx` folder); `OpenVinoBackend` an `OpenVinoEncoder` (`--format openvino`). Each
computes exactly what `encode` computes, so the server's vectors equal the in-process ones. `TorchRerankBackend`
wraps a `Reranker` (`embedkit serve --rerank`, for `/v1/rerank`) and scores exactly what `Reranker.score` scores. `verify_probes` is the start-up check of either kind: the recorded
fingerprint of the weights (exact) and the probe vectors or probe scores (within a tolerance).

The backends are a registry (`register_serve_backend`): `embedkit serve --backend` accepts, and its help lists,
exactly the registered ones, and `auto` picks the backend that recognises the folder's format. A new backend is
one `ServeBackend` subclass (docs/extending.md walks through one).
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from embedkit.errors import ModelError
from embedkit.export.onnx import ONNX_CONFIG_NAME, OnnxEncoder
from embedkit.export.openvino import OPENVINO_CONFIG_NAME, OpenVinoEncoder
from embedkit.manifest import MANIFEST_NAME
from embedkit.models.probes import PROBES_NAME, ProbeCheck, check_probes, has_probes, probes_path
from embedkit.models.rerank_template import pair_token_ids
from embedkit.models.tokenization import length_sorted_batches, tokenize, tokenize_pairs

log = logging.getLogger(__name__)


class ThreadSafeTokenizer:
    """Prompt + tokenise, callable from several threads at once (the server tokenises off its event loop).

    A Hugging Face fast tokenizer stores its truncation setting and changes it on every call that asks for another
    one; a change while another thread is tokenising fails ("Already borrowed") or applies the other call's limit. So
    each truncation length gets its own copy, set once when it is made and only read afterwards.
    """

    def __init__(self, tokenizer, prompts: dict[str, str]) -> None:
        self._tokenizer = tokenizer
        self._prompts = prompts
        self._copies: dict[int | None, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, texts: Sequence[str], kind: str, max_length: int | None) -> list[list[int]]:
        """Token ids of the prompted texts; cut to `max_length` tokens (special tokens kept) unless it is None.
        The same ids as the encoders' (embedkit.models.tokenization.tokenize)."""
        return tokenize(self.copy_for(max_length), texts, kind, prompts=self._prompts, max_length=max_length)

    def pairs(self, queries: Sequence[str], documents: Sequence[str], max_length: int | None) -> list["PairIds"]:
        """(query, document) pairs' ids, cut longest side first to `max_length` unless it is None: the same ids as
        `Reranker.pair_ids` (embedkit.models.tokenization.tokenize_pairs). Single texts are cut longest-first too,
        so a copy made by either call has the truncation setting the other asks for (nothing is changed after)."""
        ids, type_ids = tokenize_pairs(self.copy_for(max_length), queries, documents, prompts=self._prompts,
                                       max_length=max_length)
        return [PairIds(row, types) for row, types in zip(ids, type_ids)]

    def copy_for(self, max_length: int | None):
        """This thread-safe tokenizer's copy that truncates to `max_length` (None: not at all), made once."""
        tokenizer = self._copies.get(max_length)
        if tokenizer is None:
            with self._lock:
                tokenizer = self._copies.get(max_length)
                if tokenizer is None:
                    tokenizer = copy.deepcopy(self._tokenizer)
                    tokenize(tokenizer, ["a"], max_length=max_length)  # sets this copy's truncation, once
                    self._copies[max_length] = tokenizer
        return tokenizer


class PairIds:
    """One (query, document) pair's token ids and token type ids. Its len() is its token count: all the
    MicroBatcher reads of a row (it sorts, budgets and pads calls by it), so pairs are batched like texts."""

    __slots__ = ("ids", "type_ids")

    def __init__(self, ids: Sequence[int], type_ids: Sequence[int]) -> None:
        self.ids, self.type_ids = ids, type_ids

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class FingerprintCheck:
    """The model's identity now against the one recorded when it was trained or exported."""

    ok: bool
    what: str  # "weights fingerprint" (torch: Encoder.fingerprint) or "<graph> sha256" (ONNX)
    recorded: str
    actual: str
    source: str  # the file the recorded value comes from

    def summary(self) -> str:
        if self.ok:
            return f"{self.what} {self.actual[:12]} matches {Path(self.source).name}"
        return f"{self.what} {self.actual[:12]} differs from {self.recorded[:12]} recorded in {Path(self.source).name}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SERVE_BACKENDS: dict[str, type["ServeBackend"]] = {}
DEFAULT_SERVE_BACKEND = "torch"  # what `auto` serves a folder no backend recognises with


def register_serve_backend(cls: type["ServeBackend"]) -> type["ServeBackend"]:
    """Class decorator: make `cls` servable as `embedkit serve --backend <cls.kind>`."""
    if cls.kind in SERVE_BACKENDS:
        raise ValueError(f"a serve backend {cls.kind!r} is already registered")
    SERVE_BACKENDS[cls.kind] = cls
    return cls


def backend_help() -> str:
    """`embedkit serve --backend`'s help, from the registry."""
    return "; ".join(f"'{kind}': {cls.help}" for kind, cls in SERVE_BACKENDS.items()) + (
        "; 'auto': the backend that recognises the folder's format, else " + f"'{DEFAULT_SERVE_BACKEND}'.")


class ServeBackend(ABC):
    """One served embedding model. The server calls `token_ids` per request (from several threads) and `embed_ids`
    per batch; `verify_probes` calls `fingerprint_check` and `probe_check` (which calls `encode`) at start-up."""

    kind: ClassVar[str]  # registry key: `--backend <kind>`
    help: ClassVar[str]  # one line for `embedkit serve --help`
    # Capabilities, read by the server instead of testing `kind`:
    # the folder it serves may also hold a generative head, which the server then loads for /v1/chat/completions.
    serves_chat: ClassVar[bool] = False
    # The folder format this backend needs, for error messages ("an ONNX export folder"), and how to make one
    # ("{path}": the model asked for); None: any model folder.
    folder_format: ClassVar[str | None] = None
    folder_hint: ClassVar[str] = ""
    # The file of recorded outputs `probe_check` re-computes (named in the start-up log when it is missing).
    probe_file: ClassVar[str] = PROBES_NAME

    name: str
    dim: int
    max_length: int
    normalize: bool
    folder: Path | None

    @classmethod
    def recognizes(cls, folder: Path) -> bool:
        """Whether `folder` is in this backend's own format (`auto` serves it with this backend)."""
        return False

    @classmethod
    @abstractmethod
    def load(cls, spec: "ModelSpec", *, threads: int | None, device: Any) -> "ServeBackend":
        """The backend for a `--model` argument; `threads`: CPU threads per model call; `device`: where it runs."""

    @abstractmethod
    def token_ids(self, texts: Sequence[str], kind: str, *, max_length: int | None = None) -> list[list[int]]: ...

    @abstractmethod
    def embed_ids(self, id_lists: Sequence[Sequence[int]]) -> np.ndarray: ...

    @abstractmethod
    def describe(self) -> dict[str, Any]: ...

    def fingerprint_check(self) -> FingerprintCheck | None:
        """The model's identity against the one recorded when it was trained or exported (None: nothing recorded)."""
        return None

    def probe_check(self, atol: float | None = None) -> ProbeCheck | None:
        """The folder's probe_vectors.json re-embedded through `encode` (None: the folder has none)."""
        folder = getattr(self, "folder", None)  # a backend of another package may not set it
        if folder is None or not has_probes(folder):
            return None
        return check_probes(lambda texts, kind: self.encode(texts, kind), folder, atol=atol)

    def encode(self, texts: Sequence[str], kind: str = "document", batch_size: int = 32) -> np.ndarray:
        """Length-sorted batched encode through the same two calls the server uses."""
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        ids = self.token_ids(texts, kind, max_length=self.max_length)
        for rows in length_sorted_batches(ids, batch_size):
            out[rows] = self.embed_ids([ids[i] for i in rows])
        return out


@register_serve_backend
class TorchBackend(ServeBackend):
    kind = "torch"
    help = "any model folder or embedded name, in PyTorch"
    serves_chat = True

    @classmethod
    def load(cls, spec: "ModelSpec", *, threads: int | None, device: Any) -> "TorchBackend":
        from embedkit.models import load_model

        if threads:
            import torch

            torch.set_num_threads(int(threads))
        return cls(load_model(spec.path, device=device), name=spec.name)

    def __init__(self, encoder, *, name: str | None = None) -> None:
        self.encoder = encoder.eval()
        self.name = name or encoder.name
        self.dim = encoder.dim
        self.max_length = encoder.max_length
        self.normalize = bool(encoder.normalize)
        self.folder = Path(encoder.source_path) if encoder.source_path else None
        self._tokenize = ThreadSafeTokenizer(encoder.tokenizer, encoder.prompts)

    def token_ids(self, texts: Sequence[str], kind: str, *, max_length: int | None = None) -> list[list[int]]:
        return self._tokenize(texts, kind, max_length)

    def embed_ids(self, id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.encoder.forward(self.encoder.collate(id_lists)).cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {**self.encoder.describe(), "backend": "torch", "device": str(self.encoder.device)}

    def fingerprint_check(self) -> FingerprintCheck | None:
        """Encoder.fingerprint (sha256 over every weight, the tokenizer and the embedding settings) against the one
        recorded beside the probe vectors (else in the folder's manifest) when the model was trained or exported."""
        if self.folder is None:
            return None
        return _weights_fingerprint_check(lambda: self.encoder.fingerprint, probes_path(self.folder), self.folder)


@register_serve_backend
class OnnxBackend(ServeBackend):
    kind = "onnx"
    help = "an `embedkit export --format onnx` folder; fastest on CPU, int8 if exported so"
    folder_format = "an ONNX export folder"
    folder_hint = "make one with `embedkit export --model {path} --format onnx --output DIR`"

    @classmethod
    def recognizes(cls, folder: Path) -> bool:
        return (folder / ONNX_CONFIG_NAME).is_file()

    @classmethod
    def load(cls, spec: "ModelSpec", *, threads: int | None, device: Any) -> "OnnxBackend":
        return cls(OnnxEncoder(spec.path, threads=threads, device=device), name=spec.name)

    def __init__(self, onnx_encoder, *, name: str | None = None) -> None:
        self.encoder = onnx_encoder
        self.name = name or onnx_encoder.name
        self.dim = onnx_encoder.dim
        self.max_length = onnx_encoder.max_length
        self.normalize = onnx_encoder.normalize
        self.folder = onnx_encoder.folder
        self._tokenize = ThreadSafeTokenizer(onnx_encoder.tokenizer, onnx_encoder.prompts)

    def token_ids(self, texts: Sequence[str], kind: str, *, max_length: int | None = None) -> list[list[int]]:
        return self._tokenize(texts, kind, max_length)

    def embed_ids(self, id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        return self.encoder.embed_ids(id_lists)

    def describe(self) -> dict[str, Any]:
        return self.encoder.describe()

    def fingerprint_check(self) -> FingerprintCheck | None:
        """The sha256 of the served graph file against the one the export recorded in its manifest. (The tokenizer
        files are not hashed by the export; the probe vectors cover them.)"""
        source = self.folder / MANIFEST_NAME
        graphs = ((_json_object(source).get("export") or {}).get("graphs") or {})
        recorded = (graphs.get(self.encoder.variant) or {}).get("sha256")
        if not isinstance(recorded, str) or not recorded:
            return None
        actual = self.encoder.graph_hash  # hashed when the folder was loaded
        return FingerprintCheck(actual == recorded, f"{self.encoder.graph_path.name} sha256", recorded, actual,
                                str(source))


@register_serve_backend
class OpenVinoBackend(OnnxBackend):
    """The ONNX backend's calls (ThreadSafeTokenizer for `token_ids`, the encoder's `embed_ids`, the recorded hash and
    the probes at start-up) over an `OpenVinoEncoder`, so the server's vectors equal `OpenVinoEncoder.encode`'s."""

    kind = "openvino"
    help = "an `embedkit export --format openvino` folder (OpenVINO IR, int8 if exported so), on the CPU"
    folder_format = "an OpenVINO export folder"
    folder_hint = "make one with `embedkit export --model {path} --format openvino --output DIR`"

    @classmethod
    def recognizes(cls, folder: Path) -> bool:
        return (folder / OPENVINO_CONFIG_NAME).is_file()

    @classmethod
    def load(cls, spec: "ModelSpec", *, threads: int | None, device: Any) -> "OpenVinoBackend":
        # `--threads` becomes OpenVINO's INFERENCE_NUM_THREADS; `device` is not used: the IR runs on the CPU. One
        # stream: a one-text request gets every thread (on one of two streams it took 1.6-1.75x as long).
        return cls(OpenVinoEncoder(spec.path, threads=threads, streams=1), name=spec.name)


@dataclass
class RerankProbeCheck:
    """A reranker folder's probe pairs (rerank_probes.json) re-scored now, against the logits recorded when it was
    saved; `ok` is False on any mismatch."""

    ok: bool
    n: int
    max_abs_diff: float
    atol: float
    path: str

    def summary(self) -> str:
        verdict = "match" if self.ok else "MISMATCH"
        return f"probe scores {verdict}: {self.n} pairs, max |diff| {self.max_abs_diff:.2e} (atol {self.atol:.0e})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TorchRerankBackend:
    """One served reranker (`embedkit serve --rerank`, for /v1/rerank): a `Reranker` (cross-encoder) behind the two
    calls the server makes, `pair_ids` per request (from several threads) and `score_ids` per micro-batch.

    Its scores are `Reranker.score`'s: the same pair ids (a cross-encoder's tokenize_pairs, longest side cut first;
    a yes/no LLM reranker's prompt, the document cut first: pair_token_ids), the same collate and forward, the same
    sigmoid in torch. `verify_probes` calls `fingerprint_check` and `probe_check` (which
    re-scores the folder's rerank_probes.json through `score`) at start-up, as for an embedding model."""

    kind = "torch"

    @classmethod
    def load(cls, spec: "ModelSpec", *, threads: int | None, device: Any) -> "TorchRerankBackend":
        """The backend for a `--rerank` argument. A folder of another kind (an embedding model) is a one-line
        ModelError naming both kinds (load_reranker)."""
        import torch

        from embedkit.models.reranker import load_reranker

        if threads:
            torch.set_num_threads(int(threads))
        return cls(load_reranker(spec.path, device=device), name=spec.name)

    def __init__(self, reranker, *, name: str | None = None) -> None:
        from embedkit.models.reranker import RERANK_PROBES_NAME  # the module of `reranker`: already loaded

        self.reranker = reranker.eval()
        self.name = name or reranker.name
        self.max_length = reranker.max_length
        self.folder = Path(reranker.source_path) if reranker.source_path else None
        self.probe_file = RERANK_PROBES_NAME
        self._tokenize = ThreadSafeTokenizer(reranker.tokenizer, {})  # a cross-encoder has no prompts
        self._template = getattr(reranker, "template", None)  # a yes/no LLM reranker's prompt

    def pair_ids(self, queries: Sequence[str], documents: Sequence[str], *,
                 max_length: int | None = None) -> list[PairIds]:
        """The pairs' ids, cut to `max_length` (None: not cut) as the reranker cuts them in training and eval."""
        if self._template is None:
            return self._tokenize.pairs(queries, documents, max_length)
        # the untruncating copy: pair_token_ids cuts by offsets itself, so the tokenizer's own setting never changes
        ids = pair_token_ids(self._tokenize.copy_for(None), self._template, queries, documents,
                             max_length=max_length, path=self.folder)
        return [PairIds(row, []) for row in ids]

    def token_ids(self, texts: Sequence[str], *, max_length: int | None = None) -> list[list[int]]:
        """Ids of single texts (special tokens included): the server's length checks of over-long texts."""
        return self._tokenize(texts, "document", max_length)

    def score_ids(self, pairs: Sequence[PairIds], *, logits: bool = False) -> np.ndarray:
        """Scores [len(pairs)] of one padded batch: sigmoid probabilities, or raw logits with `logits`."""
        import torch

        reranker = self.reranker
        with torch.inference_mode():
            values = reranker(reranker.collate([p.ids for p in pairs], [p.type_ids for p in pairs]))
            return (values if logits else torch.sigmoid(values)).cpu().numpy()

    def score(self, queries: Sequence[str], documents: Sequence[str], *, logits: bool = False,
              batch_size: int = 32) -> np.ndarray:
        """Length-sorted batched scores through the same two calls the server uses."""
        pairs = self.pair_ids(queries, documents, max_length=self.max_length)
        out = np.empty(len(pairs), dtype=np.float32)
        for rows in length_sorted_batches(pairs, batch_size):
            out[rows] = self.score_ids([pairs[i] for i in rows], logits=logits)
        return out

    def describe(self) -> dict[str, Any]:
        return {**self.reranker.describe(), "backend": self.kind, "device": str(self.reranker.device)}

    def fingerprint_check(self) -> FingerprintCheck | None:
        """Reranker.fingerprint against the one recorded beside the probe scores (else in the manifest)."""
        if self.folder is None:
            return None
        return _weights_fingerprint_check(lambda: self.reranker.fingerprint, self.folder / self.probe_file,
                                          self.folder)

    def probe_check(self, atol: float | None = None) -> RerankProbeCheck | None:
        """The folder's rerank_probes.json re-scored (logits) through `score` (None: the folder has none)."""
        from embedkit.models.reranker import check_rerank_probes

        if self.folder is None or not (self.folder / self.probe_file).is_file():
            return None
        result = check_rerank_probes(lambda queries, documents: self.score(queries, documents, logits=True),
                                     self.folder, atol=atol)
        return RerankProbeCheck(result["ok"], result["n"], result["max_abs_diff"], result["atol"],
                                str(self.folder / self.probe_file))


def _weights_fingerprint_check(actual: Callable[[], str], probes: Path, folder: Path) -> FingerprintCheck | None:
    """`actual()` (a model's weights fingerprint: computed only when something was recorded) against the fingerprint
    recorded beside the probes (`probes`, else in the folder's manifest) when the model was trained or exported."""
    for source, read in ((probes, lambda data: data.get("model_fingerprint")),
                         (folder / MANIFEST_NAME, lambda data: (data.get("model") or {}).get("fingerprint"))):
        recorded = read(_json_object(source))
        if isinstance(recorded, str) and recorded:
            now = actual()
            return FingerprintCheck(now == recorded, "weights fingerprint", recorded, now, str(source))
    return None


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON file's object, or {} when it is missing or unreadable (then nothing was recorded there)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class ModelSpec:
    """One `--model` argument: `PATH`, an embedded name, or `NAME=PATH` to choose the served name."""

    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        if "=" in text:
            name, _, path = text.partition("=")
            if not name or not path:
                raise ModelError(f"--model {text!r}: expected PATH or NAME=PATH")
            return cls(name, path)
        path = Path(text)
        name = path.name if path.exists() else text
        if path.exists() and name in ("model", "onnx", "hf", ""):  # runs/x/model -> x-model reads better
            name = f"{path.resolve().parent.name}-{name}".strip("-")
        return cls(name, text)


def load_backend(spec: ModelSpec, backend: str = "auto", *, threads: int | None = None,
                 device: Any = "cpu") -> ServeBackend:
    """The registered backend `backend` for `spec`; `auto`: the one that recognises the folder's format (onnx for an
    ONNX export folder), else torch. `device` (cpu, cuda:N, a torch.device): where the torch backend runs; ONNX uses
    onnxruntime's CUDA provider there only when the installed onnxruntime has one, else the CPU."""
    if backend != "auto" and backend not in SERVE_BACKENDS:
        raise ModelError(f"unknown backend {backend!r}; choose auto, {', '.join(SERVE_BACKENDS)}")
    folder = Path(spec.path)
    recognized = next((cls for cls in SERVE_BACKENDS.values() if folder.is_dir() and cls.recognizes(folder)), None)
    chosen = (recognized or SERVE_BACKENDS[DEFAULT_SERVE_BACKEND]) if backend == "auto" else SERVE_BACKENDS[backend]
    if recognized is not None and recognized is not chosen:
        raise ModelError(f"this is {recognized.folder_format}: serve it with --backend {recognized.kind} (or auto)",
                         path=spec.path)
    if chosen.folder_format is not None and recognized is not chosen:
        hint = f"; {chosen.folder_hint.format(path=spec.path)}" if chosen.folder_hint else ""
        raise ModelError(f"--backend {chosen.kind} needs {chosen.folder_format}{hint}", path=spec.path)
    return chosen.load(spec, threads=threads, device=device)


def verify_probes(backend, *, atol: float | None = None, allow_mismatch: bool = False) -> dict | None:
    """Start-up check of a served model folder (an embedding model or a reranker): its fingerprint recorded at
    training/export time (exact: every weight, `FingerprintCheck`) and its probe outputs computed now (within a
    tolerance): probe_vectors.json re-embedded, or a reranker's rerank_probes.json re-scored (`probe_check`).

    Raises ModelError (one line) on a mismatch of either unless `allow_mismatch`, which only prints a loud warning.
    Returns the probe check as a dict (with the fingerprint check under "fingerprint"), or None without probes.
    """
    identity = backend.fingerprint_check()
    if identity is None:
        log.info(f"[{backend.name}] no recorded fingerprint: serving without an exact weights check")
    result = backend.probe_check(atol)
    if result is None:
        log.info(f"[{backend.name}] no {backend.probe_file}: serving without a parity check")
    problems = [check.summary() for check in (identity, result) if check is not None and not check.ok]
    if problems and not allow_mismatch:
        also = f"; {result.summary()}" if result is not None and result.ok else ""
        raise ModelError(f"refusing to serve {backend.name}: {'; '.join(problems)}{also}; the model differs from the "
                         "one it was trained or exported as (pass --allow-mismatch to serve it anyway)",
                         path=(result.path if result is not None and not result.ok else identity.source))
    for check in (identity, result):
        if check is not None and check.ok:
            log.info(f"[{backend.name}] {check.summary()}")
    if problems:
        banner = "!" * 100
        log.warning(f"{banner}\nWARNING [{backend.name}]: {'; '.join(problems)}\nWARNING: serving anyway because "
                    f"of --allow-mismatch: its outputs differ from the model the probes were written for.\n{banner}")
    if result is None:
        return None
    return {**result.to_dict(), "fingerprint": identity.to_dict() if identity is not None else None}
