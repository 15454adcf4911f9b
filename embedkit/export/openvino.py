"""OpenVINO export: the ONNX graph embedkit exports (transformer + pooling + normalisation), converted to OpenVINO IR
with `openvino.convert_model` and written with `openvino.save_model`; `--quantize int8` adds an NNCF int8 IR.

Folder layout written by `export_openvino(model, out)`:

    model.xml, model.bin            fp32 IR (weights kept fp32: save_model would store them as fp16 by default)
    model_int8.xml, model_int8.bin  with --quantize int8: NNCF static int8 (below), the folder's default
    tokenizer files                 the model's tokenizer, as in the ONNX folder
    embedkit_openvino.json          embedkit_onnx.json's keys + the inference precision each variant runs at
    probe_vectors.json              vectors the default IR gave the probe texts (checked again by `embedkit serve`)
    embedkit_manifest.json          provenance, the parity results, and "cpu": the instructions this CPU has and the
                                    precision OpenVINO chose

`OpenVinoEncoder(folder)` loads it (an `OnnxEncoder` whose graph runs in OpenVINO: same config, tokenizer and
batching, so the same token ids as torch, ONNX and the server).

int8 = NNCF static post-training quantization (`nncf.quantize`, model_type TRANSFORMER: SmoothQuant, fast bias
correction, attention's softmax and the norms kept float), calibrated on texts of the model's own check set, one at
a time so padding never enters the statistics. Why static rather than `nncf.compress_weights` (int8 weights, float
activations) or onnxruntime's dynamic int8: its activation scales are fixed at export, so a text's vector is the same
alone and in any batch (measured 0.0 on MiniLM), and the matrix products run on the CPU's int8 kernels (VNNI / AMX
where present); 7-bit weights keep the integer sums exact on CPUs without VNNI (`quantize_static_int8`). Measured
while developing it (not a bench record) on MiniLM (embedkit's demo model, AMD EPYC with AVX-512 VNNI), STS-B
paraphrase check set: mean cosine to fp32 0.9945, lowest text 0.9723, nDCG@10 equal to fp32's; onnxruntime's static
int8 lost far more on the same model (mean 0.93, embedkit.export.onnx), which is why the ONNX path uses per-token
scales instead.

Inference precision: OpenVINO runs float ops in bf16 by default on CPUs with bf16 (AVX-512 BF16, AMX). That moves
fp32 vectors by up to ~2e-3 (MiniLM), past the fp32 parity bound (1e-5) and the probe tolerance, and would make a
folder's vectors depend on the CPU it is served on. So every variant records and runs "f32" for its float ops
(`VARIANT_PRECISION`); the int8 products are int8 either way. The export prints and records the CPU's int8/bf16
instructions and OpenVINO's own default, so a user sees what was (not) used.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.atomic import atomic_dir, write_json
from embedkit.errors import ModelError
from embedkit.export.onnx import (DEFAULT_ATOL, FP32_MAX_ABS_DIFF, INT8_MAX_NDCG_DROP, INT8_MIN_COSINE,
                                  INT8_MIN_MEAN_COSINE, KIND_EMBEDDING, OUTPUT_NAME, ExportError, OnnxEncoder,
                                  check_batch_independence, check_fp32_parity, check_int8_quality, embedding_config,
                                  load_export_source, parity_record, torch_to_onnx, write_export_manifest)
from embedkit.export.formats import OPENVINO_CONFIG_NAME
from embedkit.manifest import sha256_file
from embedkit.models.probes import BATCH_INVARIANCE_ATOL, write_probes

log = logging.getLogger(__name__)

FP32_IR = "model.xml"
INT8_IR = "model_int8.xml"
# The float precision each variant runs at (see the module docstring: f32 keeps vectors the same on every CPU).
VARIANT_PRECISION = {"fp32": "f32", "int8": "f32"}
INT8_METHOD = ("NNCF static post-training quantization (model_type transformer, 7-bit weights: overflow fix in every "
               "layer), calibrated on the check set")
# Calibration texts (half queries, half documents of the check set). NNCF's default subset is 300 samples.
CALIBRATION_TEXTS = 300
# /proc/cpuinfo flags that decide which int8 / bf16 kernels OpenVINO can use: AVX2 (u8s8 via vpmaddubsw), AVX-512,
# VNNI (vpdpbusd: int8 dot products in one instruction), AVX-512 BF16, AMX (tile int8 / bf16 matrix units).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def _openvino():
    try:
        import openvino
    except ImportError:
        raise ModelError("OpenVINO is not installed: pip install 'embedkit[export]' (or openvino)") from None
    return openvino


# ---------------------------------------------------------------------------------------------------- the CPU
def cpu_instructions(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU's model name and which of CPU_FLAGS it has (empty when /proc/cpuinfo is not there)."""
    model, flags = "unknown", set()
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"model": model, "instructions": [f for f in CPU_FLAGS if f in flags]}


def runtime_record(compiled: dict[str, Any] | None = None) -> dict[str, Any]:
    """What this machine offers OpenVINO: the CPU's instructions, OpenVINO's version, its default inference precision
    here and its optimisation capabilities; `compiled`: the precision each variant was compiled with."""
    core = _openvino().Core()
    record = {**cpu_instructions(), "openvino": importlib.metadata.version("openvino"),
              "openvino_default_precision": core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string(),
              "openvino_capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))}
    if compiled:
        record["compiled_precision"] = compiled
    return record


def describe_runtime(record: dict[str, Any]) -> str:
    """One line for the export's output: the CPU, the instructions found, OpenVINO's default and the chosen precision."""
    missing = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16")
               if f not in record["instructions"]]
    line = (f"CPU {record['model']}: {' '.join(record['instructions']) or 'none of ' + ' '.join(CPU_FLAGS)}"
            f"{' (no ' + ', '.join(missing) + ')' if missing else ''}; OpenVINO {record['openvino']} defaults to "
            f"{record['openvino_default_precision']} here")
    if record.get("compiled_precision"):
        line += "; compiled: " + ", ".join(f"{v} {p}" for v, p in record["compiled_precision"].items())
    return line


# ---------------------------------------------------------------------------------------------------- runtime
def compile_ir(path: Path, *, threads: int | None = None, precision: str = "f32"):
    """An OpenVINO CPU compiled model of the IR at `path`.

    PERFORMANCE_HINT LATENCY: the server (and encode) run one batch at a time from one thread, so one inference
    stream that uses every thread on that batch is fastest; THROUGHPUT would split the threads into several streams
    that only pay off with several requests in flight at once. INFERENCE_NUM_THREADS: `threads` (`--threads`), else
    OpenVINO's default (every core)."""
    ov = _openvino()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        return ov.Core().compile_model(str(path), "CPU", config)
    except RuntimeError as exc:
        raise ModelError(f"OpenVINO cannot load the IR: {exc}".splitlines()[0], path=path) from None


def read_openvino_config(folder: Path) -> dict[str, Any]:
    """The folder's embedkit_openvino.json, refused in one line when the folder is not an OpenVINO export."""
    path = Path(folder) / OPENVINO_CONFIG_NAME
    if not path.is_file():
        raise ModelError("not an OpenVINO export folder (no embedkit_openvino.json); create one with "
                         "`embedkit export --format openvino`", path=folder)
    config = json.loads(path.read_text())
    if config.get("kind", KIND_EMBEDDING) != KIND_EMBEDDING:
        raise ModelError(f"this OpenVINO export holds a {config.get('kind')!r}, not an embedding model", path=folder)
    return config


def ir_bytes(xml_path: Path) -> int:
    """An IR's size on disk: graph and weights."""
    return xml_path.stat().st_size + xml_path.with_suffix(".bin").stat().st_size


def ir_sha256(xml_path: Path) -> str:
    """One hash of an IR: its graph (.xml) and its weights (.bin) together."""
    parts = [sha256_file(xml_path), sha256_file(xml_path.with_suffix(".bin"))]
    return hashlib.sha256(":".join(parts).encode()).hexdigest()


class OpenVinoEncoder(OnnxEncoder):
    """Encode with an exported OpenVINO IR: the ONNX folder's encoder (config keys, saved tokenizer, the one
    tokenization path, length-sorted batches) with the graph compiled and run by OpenVINO on the CPU.

    `device` is accepted for symmetry and ignored: the IR runs on the CPU plugin. One infer request, behind a lock:
    an OpenVINO request must not run twice at once, and the server calls the model from one thread anyway."""

    def read_config(self, folder: Path) -> dict[str, Any]:
        return read_openvino_config(folder)

    def open_runtime(self, *, threads: int | None, device: Any):
        self.fingerprint = f"{self.config.get('fingerprint', '')}:openvino-{self.variant}"
        self.precision = (self.config.get("inference_precision") or {}).get(self.variant, "f32")
        self.threads = threads
        compiled = compile_ir(self.graph_path, threads=threads, precision=self.precision)
        self._request = compiled.create_infer_request()
        self._output = compiled.output(OUTPUT_NAME)
        self._lock = threading.Lock()
        return compiled

    def run_graph(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with self._lock:
            result = self._request.infer({"input_ids": input_ids, "attention_mask": attention_mask})
            return np.array(result[self._output], dtype=np.float32, copy=True)

    def compiled_precision(self) -> str:
        """The float precision OpenVINO compiled this IR with ("f32", "bf16", ...)."""
        return self.session.get_property("INFERENCE_PRECISION_HINT").to_string()

    def graph_sha256(self) -> str:
        return ir_sha256(self.graph_path)

    def describe(self) -> dict[str, Any]:
        threads = int(self.session.get_property("INFERENCE_NUM_THREADS"))
        return {"name": self.name, "path": str(self.folder), "backend": "openvino", "variant": self.variant,
                "pooling": self.pooling, "prompts": self.prompts, "max_length": self.max_length,
                "normalize": self.normalize, "dim": self.dim, "fingerprint": self.fingerprint,
                "inference_precision": self.compiled_precision(), "threads": threads,
                "device": f"CPU (OpenVINO, {threads} threads, {self.compiled_precision()})"}


# ---------------------------------------------------------------------------------------------------- export
def check_openvino_quantize(quantize: str | None) -> None:
    if quantize not in (None, "int8"):
        raise ModelError(f"unknown quantization {quantize!r}; only 'int8' is supported for OpenVINO")


def calibration_items(encoder: OnnxEncoder, check, limit: int = CALIBRATION_TEXTS) -> list[dict[str, np.ndarray]]:
    """NNCF calibration samples: up to `limit` check-set texts (queries with the query prompt, documents with the
    document one, half each when there are enough), tokenised by the one path, one text per sample so that padding
    never enters the activation statistics."""
    queries, documents = list(check.queries.values()), list(check.corpus.values())
    n_queries = min(len(queries), max(limit // 2, limit - len(documents)))
    ids = encoder.token_ids(queries[:n_queries], "query") + encoder.token_ids(documents[:limit - n_queries], "document")
    items = []
    for row in ids:
        input_ids, mask = encoder.collate([row])
        items.append({"input_ids": input_ids, "attention_mask": mask})
    return items


def quantize_static_int8(ov_model, items: list[dict[str, np.ndarray]]):
    """NNCF static int8 of `ov_model`, calibrated on `items` (see the module docstring)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    # OverflowFix.ENABLE: 7-bit weights in every layer (NNCF's default does it in the first layer only). CPUs without
    # VNNI sum u8 x s8 byte products in saturating int16 pairs (AVX2 vpmaddubsw); with 7-bit weights those sums stay
    # exact, so an IR exported on a VNNI / AMX machine gives the same vectors on an AVX2-only one (the reason the
    # ONNX int8 graph uses 7-bit weights too). On MiniLM it cost nothing that matters: mean cosine to fp32 0.9945 vs
    # 0.9971, lowest text 0.9723 vs 0.9625, nDCG@10 equal (STS-B paraphrase check set, development measurement).
    return nncf.quantize(ov_model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=len(items),
                         advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE))


def export_openvino(
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
    threads: int | None = None,
) -> dict[str, Any]:
    """Export `model` to an OpenVINO folder at `output` and verify it, as `export_onnx` does. Returns the manifest.

    The same checks and bounds as the ONNX export: the fp32 IR against torch (max abs diff), the int8 IR against the
    fp32 one on the check set (mean and lowest cosine, nDCG@10 drop), the default IR's batch-vs-alone difference.
    A missed bound raises ExportError and writes nothing. `threads`: OpenVINO threads for the checks."""
    check_openvino_quantize(quantize)
    ov = _openvino()
    started = time.time()
    source = load_export_source(model, adapter=adapter, check_set=check_set,
                                allow_probe_mismatch=allow_probe_mismatch)
    encoder = source.encoder
    max_batch_diff = BATCH_INVARIANCE_ATOL if max_batch_diff is None else max_batch_diff
    graphs = {"fp32": FP32_IR, **({"int8": INT8_IR} if quantize == "int8" else {})}
    default_variant = "int8" if quantize == "int8" else "fp32"

    output = Path(output)
    with atomic_dir(output) as tmp:
        log.info(f"exporting {encoder.name} to OpenVINO IR (via ONNX: {exporter}, opset {opset}) ...")
        with tempfile.TemporaryDirectory(prefix="embedkit-openvino-") as work:
            onnx_path = Path(work) / "model.onnx"
            torch_to_onnx(encoder, onnx_path, exporter=exporter, opset=opset)
            ov.save_model(ov.convert_model(onnx_path), tmp / FP32_IR, compress_to_fp16=False)
        encoder.tokenizer.padding_side = encoder.padding_side
        encoder.tokenizer.save_pretrained(tmp)
        config = embedding_config(encoder, fmt="embedkit-openvino/1", graphs=graphs, default_variant=default_variant)
        config["inference_precision"] = {v: VARIANT_PRECISION[v] for v in graphs}
        write_json(tmp / OPENVINO_CONFIG_NAME, config)

        parity: dict[str, Any] = {"texts": len(source.items), **parity_record(source.check)}
        fp32 = OpenVinoEncoder(tmp, variant="fp32", threads=threads)
        fp32_vectors = check_fp32_parity(fp32, source, parity, max_abs_diff=max_abs_diff, output=output,
                                         what="OpenVINO fp32")
        default = fp32
        if quantize == "int8":
            items = calibration_items(fp32, source.check)
            log.info(f"quantising to int8 (NNCF static, calibrated on {len(items)} texts of {source.check.name}) ...")
            # quantise the fp32 IR as saved and checked (not the converter's in-memory model of a deleted file)
            fp32_ir = ov.Core().read_model(tmp / FP32_IR)
            ov.save_model(quantize_static_int8(fp32_ir, items), tmp / INT8_IR, compress_to_fp16=False)
            default = OpenVinoEncoder(tmp, variant="int8", threads=threads)
            parity["int8_calibration"] = {"texts": len(items), "check_set": source.check.name,
                                          "note": "calibrated on texts of the same check set the cosines and "
                                                  "nDCG@10 are measured on (only the fixed activation ranges "
                                                  "are fitted to them)"}
            check_int8_quality(fp32, default, source, fp32_vectors, parity, method=INT8_METHOD,
                               min_mean_cosine=min_mean_cosine, min_cosine=min_cosine, max_ndcg_drop=max_ndcg_drop,
                               output=output)
        check_batch_independence(default, source, parity, max_batch_diff=max_batch_diff, output=output)
        parity["passed"] = True
        write_probes(default, tmp, created_by="export", atol=DEFAULT_ATOL if quantize is None else 1e-3,
                     vectors_fn=lambda t, k: default.encode(list(t), k))
        runtime = runtime_record({v: e.compiled_precision() for v, e in (('fp32', fp32), (default.variant, default))})
        log.info(describe_runtime(runtime))
        manifest = write_export_manifest(tmp, model, encoder, graphs, exporter=exporter, opset=opset, quantize=quantize,
                                         default_variant=default_variant, started=started, parity=parity,
                                         source_probes=source.source_probes, fmt="openvino",
                                         graph_sha256=ir_sha256, graph_bytes=ir_bytes, extra={"cpu": runtime})
    log.info(f"wrote {output} ({', '.join(graphs.values())}) in {time.time() - started:.1f}s")
    return manifest

