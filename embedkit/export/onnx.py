"""ONNX export: one graph = transformer + pooling + normalisation, verified against torch after every export.

Folder layout written by `export_onnx(model, out)`:

    model.onnx              fp32 graph: inputs input_ids, attention_mask (int64 [batch, seq]) -> sentence_embedding
    model_int8.onnx         with --quantize int8: per-token int8 (below), the folder's default graph
    tokenizer files         the model's tokenizer (pads on `padding_side`; EOS appended for last-token models)
    embedkit_onnx.json      how to feed the graph: kind ("embedding"), prompts, max_length, padding side, pooling,
                            dim, default graph
    probe_vectors.json      vectors the default graph gave the probe texts (checked again by `embedkit serve`)
    embedkit_manifest.json  provenance + the parity results (torch vs fp32, fp32 vs int8 on a check set, batch vs alone)

`OnnxEncoder(folder)` loads it with onnxruntime and offers `encode(texts, kind, batch_size)` like `Encoder`.
A reranker's export (embedkit.export.onnx_rerank) shares the exporter settings (`export_graph`), the int8 graph
(`write_graphs`), the runtime's loading (`OnnxGraph`) and the manifest's export record; "kind" in embedkit_onnx.json
keeps each runtime to its own kind of folder.

int8 = per-token dynamic activation scales + 7-bit per-channel weights (`quantize_int8`). Why this method
(issues #15/#16; table and commands in bench/README.md, `bench/bench_export.py`, MiniLM):
- A served vector must not depend on the other texts of its batch. onnxruntime's dynamic quantisation takes one
  activation scale per tensor, i.e. per batch: a text's vector moved by up to 0.05 with its batch. Here every token
  gets its own scale, so a text's vector is the same alone or in any batch (max |diff| ~1e-7, float rounding).
- Static (calibrated) quantisation is batch-independent too, but one fixed scale per tensor lost too much (mean
  cosine to fp32 0.93 with MinMax, Percentile or Entropy calibration; the FFN down-projection's input alone costs
  0.06; leaving it fp32 gave 0.992 at 0.67x per-token speed), and its scales fit only the calibration data's domain.
  Per-token scales need no calibration: mean cosine 0.9958, lowest text 0.9715 (dynamic: 0.9935, 0.9516).
- Speed: as fast as onnxruntime's dynamic int8 (texts/s at 1 / 2 threads: 1247 / 2234 vs 1288 / 1901), x4.1 torch
  fp32 and x2.0 onnxruntime fp32: one fused MatMulIntegerToFloat per product, Q/K/V merged into one product.
- 7-bit weights: the u8 x s8 kernels of CPUs without VNNI sum byte products in saturating int16 pairs; 255 * 63 * 2
  stays below 32767, so the integer sums are exact on AVX2, AVX-512 and VNNI machines alike (8-bit weights: mean
  cosine 0.9971, but 5e-5 of MiniLM's pair sums would overflow on AVX2).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from embedkit.atomic import atomic_dir, write_json
from embedkit.errors import ModelError
from embedkit.export.checkset import load_check_set, ndcg_from_vectors
from embedkit.export.formats import ONNX_CONFIG_NAME
from embedkit.manifest import MANIFEST_NAME, base_manifest, sha256_file
from embedkit.models.adapters import merge_adapter
from embedkit.models.probes import (BATCH_INVARIANCE_ATOL, DEFAULT_ATOL, DEFAULT_PROBES, batch_invariance, check_probes,
                                    embed_by_kind, has_probes, write_probes)
from embedkit.models.tokenization import collate, length_sorted_batches, prepare_tokenizer, tokenize

log = logging.getLogger(__name__)

FP32_GRAPH = "model.onnx"
INT8_GRAPH = "model_int8.onnx"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "sentence_embedding"  # not "embedding": that name collides with nodes inside BERT graphs
# What an export folder holds ("kind" in embedkit_onnx.json), and the runtime that loads it.
KIND_EMBEDDING = "embedding"
KIND_RERANKER = "reranker"
ONNX_KINDS = {KIND_EMBEDDING: "an embedding model (load it with OnnxEncoder)",
              KIND_RERANKER: "a reranker (cross-encoder; load it with OnnxReranker)"}

# Parity bounds (see issue #6): an export that misses one of them is not written.
FP32_MAX_ABS_DIFF = 1e-5
INT8_MIN_MEAN_COSINE = 0.99
# Every check-set text, not only the mean. MiniLM per-token int8: lowest 0.9715 (STS-B: "Yes you got it.", few tokens
# to average the rounding over); 0.95 leaves room for other models; a text hit by a damaged weight falls far lower
# (tests/test_export.py: one negated token embedding, mean cosine still 0.994, that text 0.88).
INT8_MIN_COSINE = 0.95
INT8_MAX_NDCG_DROP = 0.005
# 7-bit weights: u8 x s8 products summed in pairs stay within int16 on CPUs without VNNI (AVX2 vpmaddubsw saturates
# at 32767; 255 * 63 * 2 = 32130), so the integer results are exact, and the same, on every x86 CPU.
INT8_WEIGHT_QMAX = 63

# Texts of very different lengths so parity batches carry real padding.
_PARITY_EXTRA = (
    "a",
    "Is it safe?",
    "The committee postponed its decision on the new drug until the long-term safety data from the third trial "
    "phase, which followed more than four thousand patients for five years, had been reviewed by independent experts.",
    "42",
    "résumé naïve café – “quotes” and emoji 🙂",
)


class ExportError(ModelError):
    """An export failed its parity check; nothing was written."""

    exit_code = 3


# ---------------------------------------------------------------------------------------------------------- encoder
def onnx_providers(device: Any = "cpu") -> list:
    """onnxruntime providers for a device: the CPU provider, with the CUDA provider first when `device` is a GPU
    (cuda, cuda:N, or a torch.device) and this onnxruntime build reports it (onnxruntime-gpu); else the CPU."""
    import onnxruntime as ort

    text = str(device)
    if text.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        index = int(text.split(":")[1]) if ":" in text else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_session(graph_path: Path, *, threads: int | None = None, device: Any = "cpu"):
    """An onnxruntime session for one graph file; a graph onnxruntime cannot load is a one-line ModelError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(graph_path), options, providers=onnx_providers(device))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelError(f"onnxruntime cannot load the graph: {exc}".splitlines()[0], path=graph_path) from exc


def read_onnx_config(folder: Path, kind: str) -> dict[str, Any]:
    """The folder's embedkit_onnx.json, refused in one line when the folder is not an ONNX export or holds the other
    kind of model (an export written before rerankers has no "kind": it is an embedding model)."""
    path = Path(folder) / ONNX_CONFIG_NAME
    if not path.is_file():
        raise ModelError("not an ONNX export folder (no embedkit_onnx.json); create one with "
                         "`embedkit export --format onnx`", path=folder)
    config = json.loads(path.read_text())
    found = config.get("kind", KIND_EMBEDDING)
    if found != kind:
        raise ModelError(f"this ONNX export is {ONNX_KINDS.get(found, repr(found))}, not {ONNX_KINDS[kind]}",
                         path=folder)
    return config


class OnnxGraph:
    """What every exported ONNX folder's runtime shares: the folder's config, the graph variant it runs, the saved
    tokenizer and one onnxruntime session. Subclasses say which `kind` of export they run.

    `variant` picks the graph: None (the folder's default), "fp32" or "int8".
    """

    kind: str  # KIND_EMBEDDING or KIND_RERANKER: the folders this runtime loads

    def __init__(self, folder: str | Path, *, variant: str | None = None, threads: int | None = None,
                 device: Any = "cpu") -> None:
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.config = self.read_config(self.folder)
        graphs = self.config["graphs"]
        self.variant = variant or self.config["default_variant"]
        if self.variant not in graphs:
            raise ModelError(f"this export has no {self.variant!r} graph; it has {', '.join(sorted(graphs))}",
                             path=self.folder)
        self.graph_path = self.folder / graphs[self.variant]
        self.max_length = int(self.config["max_length"])
        self.name = self.config.get("name") or self.folder.name
        self.fingerprint = f"{self.config.get('fingerprint', '')}:{self.variant}"
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.session = self.open_runtime(threads=threads, device=device)
        # The graph's own hash too: two int8 exports of one model (another calibration set, another embedkit)
        # give other vectors, and eval's embedding cache and a RAG index key on this fingerprint. Hashed once, at
        # load; `embedkit serve` compares the same value with the manifest's.
        self.graph_hash = self.graph_sha256()
        self.fingerprint += f":{self.graph_hash[:16]}"

    # The two places where the runtime shows: a runtime for another format of the same graph (OpenVINO IR,
    # embedkit.export.openvino) overrides them and keeps the rest (config, tokenizer, batching).
    def read_config(self, folder: Path) -> dict[str, Any]:
        return read_onnx_config(folder, self.kind)

    def open_runtime(self, *, threads: int | None, device: Any):
        return onnx_session(self.graph_path, threads=threads, device=device)

    def graph_sha256(self) -> str:
        """The served graph's hash, as the export recorded it in the manifest (export.graphs.VARIANT.sha256)."""
        return sha256_file(self.graph_path)


class OnnxEncoder(OnnxGraph):
    """Encode with an exported ONNX graph: tokenizer + onnxruntime session, length-sorted batches."""

    kind = KIND_EMBEDDING

    def __init__(self, folder: str | Path, *, variant: str | None = None, threads: int | None = None,
                 device: Any = "cpu") -> None:
        super().__init__(folder, variant=variant, threads=threads, device=device)
        self.pooling = self.config["pooling"]
        self.prompts = dict(self.config.get("prompts") or {})
        self.normalize = bool(self.config["normalize"])
        self.padding_side = self.config.get("padding_side", "right")
        self.dim = int(self.config["dim"])
        # Batch width rounded up to this many tokens (an OpenVINO folder records it; ONNX folders pad to the longest).
        self.pad_to_multiple_of = int(self.config.get("pad_to_multiple_of", 1))
        # The saved tokenizer already appends EOS for last-token pooling (Encoder did it); this only re-checks.
        self.pad_id = prepare_tokenizer(self.tokenizer, self.pooling, path=self.folder)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.folder), "backend": "onnx", "variant": self.variant,
                "pooling": self.pooling, "prompts": self.prompts, "max_length": self.max_length,
                "normalize": self.normalize, "dim": self.dim, "fingerprint": self.fingerprint,
                "providers": self.session.get_providers()}

    def token_ids(self, texts: Sequence[str], kind: str, *, truncate: bool = True) -> list[list[int]]:
        """As Encoder.token_ids (embedkit.models.tokenization), with the exported prompts and max_length."""
        return tokenize(self.tokenizer, texts, kind, prompts=self.prompts,
                        max_length=self.max_length if truncate else None)

    def collate(self, id_lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        batch = collate(id_lists, self.pad_id, self.padding_side, to="numpy",
                        pad_to_multiple_of=self.pad_to_multiple_of)
        return batch["input_ids"], batch["attention_mask"]

    def embed_ids(self, id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Run the graph on one padded batch of token-id lists."""
        input_ids, mask = self.collate(id_lists)
        return self.run_graph(input_ids, mask)

    def run_graph(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The graph's sentence embeddings [batch, dim] for one padded batch."""
        return self.session.run([OUTPUT_NAME], {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def encode(self, texts: Sequence[str] | str, kind: str = "document", batch_size: int = 32,
               normalize: bool | None = None, show_progress: bool | None = None) -> np.ndarray:
        if normalize is not None and bool(normalize) != self.normalize:
            raise ModelError(f"this graph has normalize={self.normalize} built in; re-export to change it")
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.token_ids(texts, kind)
        for rows in length_sorted_batches(ids, batch_size):
            out[rows] = self.embed_ids([ids[i] for i in rows])
        return out


# ---------------------------------------------------------------------------------------------------------- export
def features_module(model):
    """`model.forward(features)` (Encoder: pooled, normalised vectors; Reranker: relevance logits) as a module taking
    the features as separate tensors, which is what torch.onnx exports."""
    import torch

    class FeaturesGraph(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            features = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                features["token_type_ids"] = token_type_ids
            return self.inner.forward(features)

    return FeaturesGraph(model).eval()


def torch_to_onnx(encoder, path: Path, *, exporter: str = "torchscript", opset: int = 17) -> None:
    """Write `encoder` (transformer + pooling + normalisation) as one ONNX graph with dynamic batch/sequence axes."""
    feats = encoder.tokenize(["a short one", "a somewhat longer example sentence with more tokens in it"], "document")
    export_graph(features_module(encoder), (feats["input_ids"], feats["attention_mask"]), path,
                 input_names=INPUT_NAMES, output_name=OUTPUT_NAME, exporter=exporter, opset=opset)


def export_graph(module, args: tuple, path: Path, *, input_names: Sequence[str], output_name: str,
                 exporter: str = "torchscript", opset: int = 17) -> None:
    """Write `module(*args)` as an ONNX graph: every input int64 [batch, sequence] with both axes dynamic, the output's
    first axis the batch. The one place the torch.onnx exporter settings live (embeddings and rerankers alike).
    `args[1]` is the attention mask: its rows must differ in length, so the traced graph takes the padded path."""
    import torch

    names = list(input_names)
    if bool(args[1].all()):  # a batch without padding would trace a graph that never masks
        raise ExportError("could not build a padded example batch for tracing")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {name: {0: "batch", 1: "sequence"} for name in names}
            torch.onnx.export(
                module, args, str(path), input_names=names, output_names=[output_name],
                dynamic_axes={**axes, output_name: {0: "batch"}},
                opset_version=opset, dynamo=False, do_constant_folding=True,
            )
        elif exporter == "dynamo":
            torch.onnx.export(
                module, args, str(path), input_names=names, output_names=[output_name],
                dynamic_shapes={name: {0: "batch", 1: "sequence"} for name in names},
                opset_version=max(opset, 18), dynamo=True, verbose=False,
            )
        else:
            raise ModelError(f"unknown exporter {exporter!r}; choose 'torchscript' or 'dynamo'")


def check_quantize(quantize: str | None) -> None:
    if quantize not in (None, "int8"):
        raise ModelError(f"unknown quantization {quantize!r}; only 'int8' is supported for ONNX")


def write_graphs(folder: Path, quantize: str | None) -> dict[str, str]:
    """Add the int8 graph beside the fp32 one when asked; returns {variant: file name} of the folder's graphs."""
    graphs = {"fp32": FP32_GRAPH}
    if quantize == "int8":
        log.info("quantising to int8 (per-token activation scales, 7-bit per-channel weights) ...")
        quantize_int8(folder / FP32_GRAPH, folder / INT8_GRAPH)
        graphs["int8"] = INT8_GRAPH
    return graphs


def write_export_manifest(folder: Path, model: Any, source: Any, graphs: dict[str, str], *, exporter: str, opset: int,
                          quantize: str | None, default_variant: str, started: float, parity: dict[str, Any],
                          source_probes: Any, fmt: str = "onnx", graph_sha256: Any = sha256_file,
                          graph_bytes: Any = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The export folder's manifest (of an embedding model or a reranker, `source`): what was exported from where,
    how (`export_record`), and the parity checks it passed. Written into `folder`; returned. `fmt`: the folder's
    format ("onnx", "openvino": what `embedkit eval` reads to pick the runtime); `graph_sha256(path)`,
    `graph_bytes(path)`: a graph's hash and size (an OpenVINO IR counts its weights file too); `extra`: more
    top-level sections."""
    manifest = base_manifest("export", base_model=source.base_model, model=source.describe(),
                             export=export_record(folder, graphs, exporter=exporter, opset=opset, quantize=quantize,
                                                  default_variant=default_variant, started=started, fmt=fmt,
                                                  graph_sha256=graph_sha256, graph_bytes=graph_bytes),
                             parity=parity, source_probes=source_probes, **(extra or {}))
    manifest["model"]["path"] = str(model)
    write_json(folder / MANIFEST_NAME, manifest)
    return manifest


def export_record(folder: Path, graphs: dict[str, str], *, exporter: str, opset: int, quantize: str | None,
                  default_variant: str, started: float, fmt: str = "onnx", graph_sha256: Any = sha256_file,
                  graph_bytes: Any = None) -> dict[str, Any]:
    """The manifest's "export" section: how the graphs were made, and each graph's sha256 (`embedkit serve` compares
    the served file with it)."""
    return {"format": fmt, "exporter": exporter, "opset": opset, "quantize": quantize,
            "default_variant": default_variant,
            "graphs": {v: {"file": f, "sha256": graph_sha256(folder / f),
                           "bytes": (graph_bytes or (lambda path: path.stat().st_size))(folder / f)}
                       for v, f in graphs.items()},
            "seconds": round(time.time() - started, 1)}


def refuse_changed_source(ok: bool, what: str, path: Any, allow_probe_mismatch: bool) -> None:
    """The model to export must reproduce the probes it was saved with (`what`: which, and how far off), unless
    told otherwise: an export of weights that changed after training would pass its parity checks all the same."""
    if not ok and not allow_probe_mismatch:
        raise ExportError(f"the model does not reproduce its own {what}; it changed after training (pass "
                          "--allow-probe-mismatch to export anyway)", path=path)


def quantize_int8(src: Path, dst: Path, *, weight_qmax: int = INT8_WEIGHT_QMAX,
                  embeddings: bool = True) -> dict[str, int]:
    """Write `src` with per-token int8 matrix products to `dst` (see the module docstring); returns what it changed.

    Every MatMul by a constant 2-D weight becomes, per activation X [..., K] (MatMuls sharing X, such as Q/K/V, are
    merged into one [K, N] product and split after it):

        s = max|X| over K / 127                       one scale per token: never shared across tokens or texts
        q = QuantizeLinear(X / s, 1, 128)             uint8 (one scale for the scaled tensor: the fast kernel)
        Y = MatMulIntegerToFloat(q, Wq, 1, ws, 128) * s
        Wq = round(W / ws) in [-weight_qmax, weight_qmax], ws = max|W| / weight_qmax per output column

    Embedding tables read by Gather become int8 with one scale per row. Attention's activation-by-activation
    products, softmax, LayerNorm and GELU stay fp32.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    floats = {i.name: i for i in graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2}
    nodes = list(graph.node)
    groups: dict[str, list[int]] = {}  # activation -> indices of the MatMuls it feeds
    tables: dict[int, str] = {}  # Gather index -> embedding table
    for index, node in enumerate(nodes):
        if node.op_type == "MatMul" and node.input[1] in floats:
            groups.setdefault(node.input[0], []).append(index)
        elif (embeddings and node.op_type == "Gather" and node.input[0] in floats
              and all(a.i == 0 for a in node.attribute if a.name == "axis")):
            tables[index] = node.input[0]
    if not groups:
        raise ExportError("the graph has no MatMul with constant weights to quantise", path=src)
    consts = {"q/one": np.float32(1), "q/eps": np.float32(1e-12), "q/127": np.float32(127), "q/zp": np.uint8(128),
              "q/-1": np.array([-1], np.int64)}

    def node(op, inputs, outputs, **attrs):
        return helper.make_node(op, inputs, outputs, name=outputs[0], **attrs)

    def reduce_max(x, out):
        if opset >= 18:
            return node("ReduceMax", [x, "q/-1"], [out], keepdims=1)
        return node("ReduceMax", [x], [out], axes=[-1], keepdims=1)

    first = {indices[0]: (x, indices) for x, indices in groups.items()}
    merged = {i for indices in groups.values() for i in indices}
    out: list = []
    for index, original in enumerate(nodes):
        if index in tables:
            name = tables[index]
            table = numpy_helper.to_array(floats[name]).astype(np.float32)
            scale = np.maximum(np.abs(table).max(axis=1, keepdims=True), 1e-12) / 127.0
            consts[f"{name}/q"] = np.round(table / scale).astype(np.int8)
            consts[f"{name}/s"] = scale.astype(np.float32)
            y, ids = original.output[0], original.input[1]
            out += [node("Gather", [f"{name}/q", ids], [f"{y}/q"], axis=0),
                    node("Gather", [f"{name}/s", ids], [f"{y}/s"], axis=0),
                    node("Cast", [f"{y}/q"], [f"{y}/f"], to=TensorProto.FLOAT),
                    node("Mul", [f"{y}/f", f"{y}/s"], [y])]
            continue
        if index not in first:
            if index not in merged:
                out.append(original)
            continue
        x, indices = first[index]
        w = np.concatenate([numpy_helper.to_array(floats[nodes[i].input[1]]) for i in indices], axis=1)
        w = w.astype(np.float32)
        ws = np.maximum(np.abs(w).max(axis=0), 1e-12) / weight_qmax
        p = f"{x}/int8"
        consts[f"{p}/w"] = np.clip(np.round(w / ws), -weight_qmax, weight_qmax).astype(np.int8)
        consts[f"{p}/ws"] = ws.astype(np.float32)
        outputs = [nodes[i].output[0] for i in indices]
        y = outputs[0] if len(outputs) == 1 else f"{p}/y"
        out += [
            node("Abs", [x], [f"{p}/abs"]),
            reduce_max(f"{p}/abs", f"{p}/amax"),  # [..., 1]: one value per token
            node("Max", [f"{p}/amax", "q/eps"], [f"{p}/amax+"]),
            node("Div", ["q/127", f"{p}/amax+"], [f"{p}/inv"]),
            node("Div", [f"{p}/amax+", "q/127"], [f"{p}/s"]),
            node("Mul", [x, f"{p}/inv"], [f"{p}/xs"]),  # each token now spans [-127, 127]
            node("QuantizeLinear", [f"{p}/xs", "q/one", "q/zp"], [f"{p}/q"]),  # round + 128, uint8
            node("MatMulIntegerToFloat", [f"{p}/q", f"{p}/w", "q/one", f"{p}/ws", "q/zp"], [f"{p}/f"],
                 domain="com.microsoft"),
            node("Mul", [f"{p}/f", f"{p}/s"], [y]),
        ]
        if len(outputs) > 1:
            consts[f"{p}/split"] = np.array([numpy_helper.to_array(floats[nodes[i].input[1]]).shape[1]
                                             for i in indices], np.int64)
            out.append(node("Split", [y, f"{p}/split"], outputs, axis=-1))
    used = {name for n in out for name in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    del graph.node[:]
    graph.node.extend(out)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    return {"matmuls": len(merged), "products": len(groups), "embedding_tables": len(set(tables.values()))}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(denom, 1e-12)


def parity_texts(check) -> list[tuple[str, str]]:
    items = [(t, "query") for t in list(check.queries.values())[:64]]
    items += [(t, "document") for t in list(check.corpus.values())[:64]]
    items += [(t, "document") for t in _PARITY_EXTRA] + list(DEFAULT_PROBES)
    return items


def _encode_items(encode, items: list[tuple[str, str]], batch_size: int) -> np.ndarray:
    return embed_by_kind(lambda texts, kind: encode(list(texts), kind, batch_size), [t for t, _ in items],
                          [k for _, k in items])


@dataclass
class ExportSource:
    """What every export of an embedding model starts from: the model (LoRA merged, in eval mode), its probe check,
    the check set, the parity texts and torch's vectors of them (the reference each exported graph must match)."""

    encoder: Any
    source_probes: dict[str, Any] | None
    check: Any  # embedkit.export.checkset.CheckSet
    items: list[tuple[str, str]]
    reference: np.ndarray


def load_export_source(model: str | Path, *, adapter: str | Path | None = None,
                       check_set: str | Path | None = None, allow_probe_mismatch: bool = False) -> ExportSource:
    """Load `model` for export (merging `adapter`), check it still reproduces its own probe vectors, load the check
    set and compute torch's vectors of the parity texts. Shared by the ONNX and OpenVINO exports."""
    import torch

    from embedkit.models import load_model

    encoder = load_model(model, adapter=adapter)
    if encoder.has_adapter:
        encoder = merge_adapter(encoder)
    encoder.eval()
    source_probes = None
    if encoder.source_path and has_probes(encoder.source_path):
        result = check_probes(lambda t, k: encoder.encode(list(t), kind=k), encoder.source_path)
        source_probes = result.to_dict()
        log.info(f"source model: {result.summary()}")
        refuse_changed_source(result.ok, f"probe vectors ({result.summary()})", result.path, allow_probe_mismatch)
    check = load_check_set(check_set, model_folders=[Path(f) for f in (adapter, encoder.source_path) if f])
    log.info(f"check set: {check.name} ({check.source}): {len(check.queries)} queries, {len(check.corpus)} documents")
    items = parity_texts(check)
    with torch.inference_mode():
        reference = _encode_items(lambda t, k, b: encoder.encode(t, kind=k, batch_size=b), items, 16)
    return ExportSource(encoder, source_probes, check, items, reference)


def embedding_config(encoder, *, fmt: str, graphs: dict[str, str], default_variant: str) -> dict[str, Any]:
    """How to feed an exported embedding graph (embedkit_onnx.json; the OpenVINO folder's config has the same keys)."""
    return {
        "format": fmt, "kind": KIND_EMBEDDING, "name": encoder.name, "fingerprint": encoder.fingerprint,
        "graphs": graphs, "default_variant": default_variant, "inputs": list(INPUT_NAMES), "output": OUTPUT_NAME,
        "pooling": encoder.pooling, "prompts": encoder.prompts, "max_length": encoder.max_length,
        "normalize": encoder.normalize, "padding_side": encoder.padding_side, "dim": encoder.dim,
        "is_causal": encoder.is_causal,
    }


def check_fp32_parity(fp32, source: ExportSource, parity: dict[str, Any], *, max_abs_diff: float, output: Path,
                      what: str = "ONNX fp32") -> np.ndarray:
    """The whole path (saved tokenizer + fp32 graph `fp32`) against torch, in batches with and without padding;
    raises ExportError past `max_abs_diff`. Returns the graph's vectors of the parity texts (batches of 16)."""
    items = source.items
    got = np.concatenate([_encode_items(fp32.encode, items, 16)[None], _encode_items(fp32.encode, items, 1)[None]])
    diff = float(np.abs(got - source.reference[None]).max())
    parity["fp32_max_abs_diff"] = diff
    parity["fp32_max_abs_diff_bound"] = max_abs_diff
    log.info(f"parity {what} vs torch: max |diff| {diff:.2e} (bound {max_abs_diff:.0e})")
    if not diff < max_abs_diff:
        raise ExportError(f"{what} output differs from torch by {diff:.2e} (bound {max_abs_diff:.0e}); "
                          "nothing was written", path=output)
    return got[0]


def check_int8_quality(fp32, int8, source: ExportSource, fp32_vectors: np.ndarray, parity: dict[str, Any], *,
                       method: str, min_mean_cosine: float, min_cosine: float, max_ndcg_drop: float,
                       output: Path, label: str = "int8") -> None:
    """The int8 graph against the fp32 one on the check set and the parity texts: mean and lowest cosine, nDCG@10
    drop; raises ExportError past a bound. `method` (how the int8 graph was made) goes into `parity`. `label`: what
    is judged, naming the parity keys ("int8": int8_mean_cosine, ndcg_at_10_int8, ...; "bf16" for an OpenVINO fp32
    IR run at bf16)."""
    check, items = source.check, source.items
    vectors = {}
    for name, graph in (("fp32", fp32), (label, int8)):
        vectors[name] = [graph.encode(list(check.queries.values()), "query", 32),
                         graph.encode(list(check.corpus.values()), "document", 32)]
    ndcg_fp32, ndcg_int8 = (ndcg_from_vectors(check, *vectors[name]) for name in ("fp32", label))
    cos = _cosines(np.concatenate(vectors[label] + [_encode_items(int8.encode, items, 16)]),
                   np.concatenate(vectors["fp32"] + [fp32_vectors]))
    parity.update({
        f"{label}_method": method,
        f"{label}_texts": len(cos), f"{label}_mean_cosine": float(cos.mean()), f"{label}_min_cosine": float(cos.min()),
        f"{label}_mean_cosine_bound": min_mean_cosine, f"{label}_min_cosine_bound": min_cosine,
        "ndcg_at_10_fp32": ndcg_fp32, f"ndcg_at_10_{label}": ndcg_int8, "ndcg_at_10_max_drop": max_ndcg_drop,
    })
    log.info(f"parity {label} vs fp32 on {len(cos)} texts: mean cosine {cos.mean():.4f} (bound "
             f"{min_mean_cosine}), min {cos.min():.4f} (bound {min_cosine}); nDCG@10 on {check.name}: fp32 "
             f"{ndcg_fp32:.4f}, {label} {ndcg_int8:.4f} (max drop {max_ndcg_drop})")
    if not cos.mean() >= min_mean_cosine:
        raise ExportError(f"{label} graph: mean cosine to fp32 {cos.mean():.4f} < {min_mean_cosine}; "
                          "nothing was written", path=output)
    if not cos.min() >= min_cosine:
        raise ExportError(f"{label} graph: a text's cosine to fp32 is {cos.min():.4f} < {min_cosine}; "
                          "nothing was written", path=output)
    if not ndcg_fp32 - ndcg_int8 <= max_ndcg_drop:
        raise ExportError(f"{label} graph: nDCG@10 {ndcg_int8:.4f} vs fp32 {ndcg_fp32:.4f} drops more than "
                          f"{max_ndcg_drop}; nothing was written", path=output)


def check_batch_independence(default, source: ExportSource, parity: dict[str, Any], *, max_batch_diff: float,
                             output: Path) -> None:
    """The graph a folder serves must give a text the same vector alone and inside any batch (ExportError if not)."""
    batch_texts = [t for t, _ in source.items]
    batch_diff = batch_invariance(lambda t: default.encode(t, "document", batch_size=len(t)), batch_texts)
    record_batch_invariance(parity, default.variant, batch_diff, max_batch_diff, count_key="batch_invariance_texts",
                            count=len(batch_texts), unit="texts", subject="a text's vector", output=output)


def record_batch_invariance(parity: dict[str, Any], graph: str, batch_diff: float, bound: float, *, count_key: str,
                            count: int, unit: str, subject: str, output: Path) -> None:
    """The batch-vs-alone check's entries in the parity record (embedding and reranker exports alike), logged;
    ExportError when `batch_diff` misses `bound`."""
    parity.update({"batch_invariance_graph": graph, count_key: count, "batch_invariance_batch_sizes": [8, 32],
                   "batch_invariance_max_abs_diff": batch_diff, "batch_invariance_bound": bound})
    log.info(f"batch vs alone ({graph}, {count} {unit} in batches of 8 and 32): max |diff| {batch_diff:.2e} "
             f"(bound {bound:.0e})")
    if not batch_diff <= bound:
        raise ExportError(f"{graph} graph: {subject} depends on its batch (max |diff| {batch_diff:.2e} > "
                          f"{bound:.0e}); nothing was written", path=output)


def parity_record(check) -> dict[str, Any]:
    """The manifest's "parity" section as it starts: which check set, how big."""
    return {"check_set": check.name, "check_set_source": check.source, "check_set_queries": len(check.queries),
            "check_set_documents": len(check.corpus)}


def export_onnx(
    model: str | Path,
    output: str | Path,
    *,
    quantize: str | None = None,
    adapter: str | Path | None = None,
    exporter: str = "torchscript",
    opset: int = 17,
    check_set: str | Path | None = None,
    max_abs_diff: float = FP32_MAX_ABS_DIFF,
    min_mean_cosine: float = INT8_MIN_MEAN_COSINE,
    min_cosine: float = INT8_MIN_COSINE,
    max_ndcg_drop: float = INT8_MAX_NDCG_DROP,
    max_batch_diff: float | None = None,
    allow_probe_mismatch: bool = False,
) -> dict[str, Any]:
    """Export `model` (a folder or embedded name) to `output` and verify it. Returns the manifest.

    `check_set`: a spec for `embedkit.export.checkset.load_check_set` (default: the model's own dev or training
    data named in its manifest, else builtin-40). Raises ExportError (and writes nothing) when a parity bound is
    missed: fp32 vs torch; int8 vs fp32 (mean and minimum cosine, nDCG@10 drop); the default graph's batch-vs-alone
    difference (`max_batch_diff`, default BATCH_INVARIANCE_ATOL).
    """
    check_quantize(quantize)
    started = time.time()
    source = load_export_source(model, adapter=adapter, check_set=check_set,
                                allow_probe_mismatch=allow_probe_mismatch)
    encoder = source.encoder
    max_batch_diff = BATCH_INVARIANCE_ATOL if max_batch_diff is None else max_batch_diff

    output = Path(output)
    with atomic_dir(output) as tmp:
        log.info(f"exporting {encoder.name} to ONNX ({exporter}, opset {opset}) ...")
        torch_to_onnx(encoder, tmp / FP32_GRAPH, exporter=exporter, opset=opset)
        encoder.tokenizer.padding_side = encoder.padding_side
        encoder.tokenizer.save_pretrained(tmp)
        graphs = write_graphs(tmp, quantize)
        default_variant = "int8" if quantize == "int8" else "fp32"
        write_json(tmp / ONNX_CONFIG_NAME, embedding_config(encoder, fmt="embedkit-onnx/1", graphs=graphs,
                                                            default_variant=default_variant))

        # --- parity: the whole path (saved tokenizer + graph) against torch, batches with and without padding
        parity: dict[str, Any] = {"texts": len(source.items), **parity_record(source.check)}
        fp32 = OnnxEncoder(tmp, variant="fp32")
        fp32_vectors = check_fp32_parity(fp32, source, parity, max_abs_diff=max_abs_diff, output=output)
        default = fp32
        if quantize == "int8":
            default = OnnxEncoder(tmp, variant="int8")
            check_int8_quality(fp32, default, source, fp32_vectors, parity,
                               method="per-token activation scales, 7-bit per-channel weights",
                               min_mean_cosine=min_mean_cosine, min_cosine=min_cosine, max_ndcg_drop=max_ndcg_drop,
                               output=output)
        check_batch_independence(default, source, parity, max_batch_diff=max_batch_diff, output=output)
        parity["passed"] = True
        # Probes of the graph this folder serves by default; `embedkit serve` re-checks them at start-up.
        write_probes(default, tmp, created_by="export", atol=DEFAULT_ATOL if quantize is None else 1e-3,
                     vectors_fn=lambda t, k: default.encode(list(t), k))
        manifest = write_export_manifest(tmp, model, encoder, graphs, exporter=exporter, opset=opset, quantize=quantize,
                                         default_variant=default_variant, started=started, parity=parity,
                                         source_probes=source.source_probes)
    log.info(f"wrote {output} ({', '.join(graphs.values())}) in {time.time() - started:.1f}s")
    return manifest
