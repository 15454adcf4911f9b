"""OpenVINO export: the graph embedkit exports (transformer + pooling + normalisation: `features_module`, the same
module the ONNX export writes), converted from PyTorch by `openvino.convert_model` (OpenVINO's PyTorch frontend) and
written with `openvino.save_model`; `--quantize int8` adds an NNCF int8 IR.

Why straight from PyTorch rather than through the ONNX file (what this export did first): the PyTorch frontend keeps
the encoder's `scaled_dot_product_attention` as one ScaledDotProductAttention op, which OpenVINO's CPU plugin runs
as one fused attention kernel; torch.onnx (opset 17) spells it out as MatMul, Softmax, IsNaN/Select and Transposes,
which OpenVINO runs op by op (12 MatMul, 6 Softmax, 24 Transpose, 69 Eltwise layers in MiniLM's compiled int8 IR
against 6 fused attention Subgraphs), and NNCF then quantises the attention's two matrix products too (48 FakeQuantize
instead of 36). That is how sentence-transformers' OpenVINO backend gets its IR (optimum-intel converts from
PyTorch), and it was most of embedkit's gap to it on 256-token abstracts (measured in one process, interleaved, on a
busy 2-core AMD EPYC: see the note at CONVERTER). fp32 parity with torch is unchanged (max |diff| ~1e-7 on MiniLM).

Folder layout written by `export_openvino(model, out)`:

    model.xml, model.bin            fp32 IR (weights kept fp32: save_model would store them as fp16 by default)
    model_int8.xml, model_int8.bin  with --quantize int8: NNCF static int8 (below), the folder's default
    tokenizer files                 the model's tokenizer, as in the ONNX folder
    embedkit_openvino.json          embedkit_onnx.json's keys + the inference precision each variant runs at
                                    ("inference_precision") and the batch width's multiple ("pad_to_multiple_of")
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
while developing it (not a bench record; the IR then converted through ONNX, see above) on MiniLM (embedkit's demo
model, AMD EPYC with AVX-512 VNNI), STS-B paraphrase check set: mean cosine to fp32 0.9945, lowest text 0.9723,
nDCG@10 equal to fp32's; onnxruntime's static int8 lost far more on the same model (mean 0.93, embedkit.export.onnx),
which is why the ONNX path uses per-token scales instead. The IR converted from PyTorch (fused attention, whose two
matrix products NNCF leaves float) scored alike: builtin-40 mean cosine 0.9943 (0.9941 through ONNX), SciFact
check set below.

Inference precision (`precision`, `embedkit export --precision f32|bf16`): OpenVINO runs float ops in bf16 by default
on CPUs with bf16 (AVX-512 BF16, AMX). That moves fp32 vectors by up to ~2e-3 (MiniLM), past the fp32 parity bound
(1e-5), and makes a folder's vectors depend on the CPU it is served on. So the default is "f32" for every variant;
"bf16" is a choice: the served variant (int8, else fp32) is compiled with INFERENCE_PRECISION_HINT bf16 (the int8
products stay int8; the float ops around them, softmax, norms, GELU, the unquantised matrix products, run in bf16),
the fp32 IR stays the f32 reference of the checks. It is refused in one line on a CPU without avx512_bf16 or
amx_bf16 (`check_precision`): there OpenVINO would silently run f32 and the export would check something other than
what it records. Its checks: the fp32 IR at f32 against torch as always, then the served variant at bf16 against
the fp32 IR at f32 with the int8 bounds (mean / lowest cosine, nDCG@10 drop on the check set), batch-vs-alone at
bf16; the manifest's parity says what was measured ("served_precision", "quality_reference"). The folder's
embedkit_openvino.json records the precision per variant and every loader (`OpenVinoEncoder`: eval, the server, the
bench) compiles with it; a CPU without bf16 then runs f32 with a warning (the probe tolerance covers the difference).

Why f32 stays the default although bf16 keeps quality: measured while developing it (not a bench record) on MiniLM
int8, check set SciFact test sampled to 300 queries / 1,000 abstracts (`--check-set beir:.../scifact`), AMD EPYC
with AVX-512 BF16 and no AMX: nDCG@10 fp32 IR 0.7969, int8 at f32 0.7996, int8 at bf16 0.8003; mean / lowest cosine
to fp32 0.9937 / 0.9821 (f32) and 0.9937 / 0.9815 (bf16); batch-vs-alone 0.0 for both. But the speed it bought there
was small: abstracts x1.02-1.08, questions none (x0.93-1.04, within the noise), interleaved A/B on a busy 2-core
machine; bf16 on this CPU speeds up only the float matrix products, and in an int8 IR those are the attention's.
That does not pay for vectors that depend on the CPU a folder is served on. On a CPU with AMX, where bf16 matrix
units change the picture, measure it (bench/bench_cpu_backends.py runs embedkit-openvino-int8-bf16 beside the f32
one). The export prints and records the CPU's int8/bf16 instructions and OpenVINO's own default, so a user sees what
was (not) used.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.atomic import atomic_dir, write_json
from embedkit.errors import DataError, ModelError
from embedkit.export.checkset import BUILTIN_NAME, load_check_set
from embedkit.export.onnx import (DEFAULT_ATOL, FP32_MAX_ABS_DIFF, INPUT_NAMES, INT8_MAX_NDCG_DROP, INT8_MIN_COSINE,
                                  INT8_MIN_MEAN_COSINE, KIND_EMBEDDING, OUTPUT_NAME, ExportError, OnnxEncoder,
                                  check_batch_independence, check_fp32_parity, check_int8_quality, embedding_config,
                                  features_module, load_export_source, parity_record, write_export_manifest)
from embedkit.export.formats import OPENVINO_CONFIG_NAME
from embedkit.manifest import sha256_file
from embedkit.models.probes import BATCH_INVARIANCE_ATOL, write_probes
from embedkit.models.tokenization import collate

log = logging.getLogger(__name__)

FP32_IR = "model.xml"
INT8_IR = "model_int8.xml"
# The float precisions `precision` accepts; the default keeps vectors the same on every CPU (module docstring).
PRECISIONS = ("f32", "bf16")
DEFAULT_PRECISION = "f32"
# /proc/cpuinfo flags of which one lets OpenVINO run bf16 (AVX-512 BF16 or AMX BF16); without one it runs f32.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Probe vectors' tolerance at serve time for a bf16 folder: served on a CPU without bf16 it runs f32, and MiniLM's
# int8 IR at bf16 differs from itself at f32 by up to 8.7e-3 per component (lowest cosine 0.9986; 64 questions and
# 64 abstracts). int8 folders at f32 keep 1e-3; a different model moves vectors by far more than either.
BF16_PROBE_ATOL = 2e-2
# How the IR is made (the manifest's export.exporter; export.opset is None: no ONNX in between). Measured while
# developing it (not a bench record): MiniLM int8, OpenVinoEncoder.encode, batch 32, 2 threads, 256 texts per set,
# 3 interleaved rounds in one process on a busy 2-core AMD EPYC (load 7-9), texts/s relative to the IR converted
# through ONNX at f32: 256-token SciFact abstracts x1.21 (f32) / x1.23 (bf16) with the fused attention and batches
# padded to multiples of 16 (x1.26 / x1.33 padded to the longest text only, which is not batch-independent);
# MedQuAD questions x0.92 / x0.87: the padding to 16 costs short texts more than the fused attention saves them.
# The graphs alone (same length-sorted batches fed to both IRs by one loop, 3 rounds): embedkit's int8 IR x1.03-1.07
# of sentence-transformers' (optimum-intel) int8 IR on abstracts, so the graph gap is closed; on questions (15 tokens
# on average) padding to 16 instead of the longest costs 23-30% (either IR) - the open cost of batch independence.
# Disabling OpenVINO's fused attention (SNIPPETS_MODE DISABLE) does not make unpadded batches independent either.
# Padding only the attention's keys to 16 inside the graph (a wrapped scaled_dot_product_attention while tracing) did
# (0.0 at f32 and bf16, batches padded to the longest) but lost the fused attention's speed: abstracts x0.97, questions
# x0.90 of the IR converted through ONNX, against x1.21 / x0.91 for this IR padded to 16 in the same run.
CONVERTER = "openvino.convert_model (PyTorch frontend)"
# Batches are padded to a multiple of this many tokens (recorded in embedkit_openvino.json, applied by the one
# collate). The fused attention kernel reduces a row in vector-width chunks with a separate tail: with the width a
# multiple of 16 a text's chunks are the same alone and in any batch (the extra ones add exact zeros), so the vectors
# are bitwise batch-independent; padded to the longest text only, MiniLM's int8 IR moved a text by up to 2.6e-3
# (f32) / 2.3e-3 (bf16) between alone and a batch of 32 (float noise of ~1e-7 flipping int8 roundings downstream).
# Multiples of 1 and 8 failed, 16, 32 and 64 gave 0.0 (AMD EPYC, AVX-512: 16 f32 lanes); the export's
# batch-vs-alone check verifies it on the machine that exports.
PAD_TO_MULTIPLE_OF = 16
# Tried in turn when a CPU's kernel blocks differ (measured only on AVX-512 so far): the first multiple whose vectors
# pass the batch-vs-alone check is recorded; none passing is the usual ExportError.
PAD_MULTIPLES = (PAD_TO_MULTIPLE_OF, 32, 64)
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


def check_precision(precision: str, cpu: dict[str, Any] | None = None) -> None:
    """Refuse (one line) a precision embedkit does not know, and bf16 on a CPU without avx512_bf16 / amx_bf16
    (`cpu`: cpu_instructions()' record, read from /proc/cpuinfo when None)."""
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}; choose {' or '.join(PRECISIONS)}")
    if precision == "bf16":
        cpu = cpu if cpu is not None else cpu_instructions()
        if not any(flag in cpu["instructions"] for flag in BF16_FLAGS):
            raise ModelError(f"--precision bf16 needs a CPU with {' or '.join(BF16_FLAGS)}; this one "
                             f"({cpu['model']}) has neither, so OpenVINO would run f32: export with --precision f32")


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
    """One line for the export's output: the CPU, the instructions found, OpenVINO's default, the chosen precision."""
    missing = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16")
               if f not in record["instructions"]]
    line = (f"CPU {record['model']}: {' '.join(record['instructions']) or 'none of ' + ' '.join(CPU_FLAGS)}"
            f"{' (no ' + ', '.join(missing) + ')' if missing else ''}; OpenVINO {record['openvino']} defaults to "
            f"{record['openvino_default_precision']} here")
    if record.get("compiled_precision"):
        line += "; compiled: " + ", ".join(f"{v} {p}" for v, p in record["compiled_precision"].items())
    return line


# ---------------------------------------------------------------------------------------------------- runtime
def compile_ir(path: Path, *, threads: int | None = None, precision: str = "f32", streams: int | None = 1):
    """An OpenVINO CPU compiled model of the IR at `path`.

    streams=1: PERFORMANCE_HINT LATENCY, one inference stream that puts every thread on each call: a call of one
    text (a server's single query) is fastest this way. streams=None (or > 1): PERFORMANCE_HINT THROUGHPUT, the
    threads split into independent streams (OpenVINO picks how many unless `streams` says), which
    `OpenVinoEncoder.run_graph` feeds with parts of each call at once: bulk encoding (eval, rag index) runs faster.
    INFERENCE_NUM_THREADS: `threads` (`--threads`), else OpenVINO's default (every core)."""
    ov = _openvino()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
                              "INFERENCE_PRECISION_HINT": precision}
    if streams is not None and streams > 1:
        config["NUM_STREAMS"] = int(streams)
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

    The float precision is the one the folder recorded for the variant (embedkit_openvino.json
    "inference_precision"; "f32" when absent); `precision` overrides it (the export's f32 reference of a bf16
    folder). A recorded bf16 on a CPU without bf16 runs f32, with a warning.

    `streams`: None (the default, bulk encoding) compiles for throughput (`compile_ir`) and runs each call's rows in
    as many parts as OpenVINO made streams, at once, one infer request each (a text's vector does not depend on its
    batch, `pad_to_multiple_of`, so the parts give the same vectors as one call: checked by the export's
    batch-vs-alone check, which runs through this encoder). 1: one stream with every thread on each call, what the
    server uses, because a one-text call on one of two streams runs on half the threads. Measured (development, not
    a record; MiniLM int8, 512 texts in batches of 32, 2 threads, AMD EPYC with AVX-512 VNNI, median of 5,
    interleaved): SciFact abstracts 80.1 -> 84.9 texts/s, MedQuAD questions 1066 -> 1202 with 2 streams, vectors
    equal (max |diff| 0.0); one text alone 13.4 -> 23.6 ms (abstract), 1.8 -> 2.8 ms (question).

    `device` is accepted for symmetry and ignored: the IR runs on the CPU plugin. The infer requests sit behind a
    lock: an OpenVINO request must not run twice at once."""

    def read_config(self, folder: Path) -> dict[str, Any]:
        return read_openvino_config(folder)

    def __init__(self, folder: str | Path, *, variant: str | None = None, threads: int | None = None,
                 device: Any = "cpu", precision: str | None = None, streams: int | None = None) -> None:
        self._precision_override = precision
        self._streams = streams
        super().__init__(folder, variant=variant, threads=threads, device=device)

    def open_runtime(self, *, threads: int | None, device: Any):
        self.fingerprint = f"{self.config.get('fingerprint', '')}:openvino-{self.variant}"
        recorded = (self.config.get("inference_precision") or {}).get(self.variant, DEFAULT_PRECISION)
        self.precision = self._precision_override or recorded
        if self.precision not in PRECISIONS:
            raise ModelError(f"unknown inference precision {self.precision!r} for the {self.variant} IR",
                             path=self.folder)
        compile_as = self.precision
        if self.precision == "bf16":
            try:
                check_precision("bf16")
            except ModelError:
                log.warning(f"{self.folder}: exported for bf16, but this CPU has no {' / '.join(BF16_FLAGS)}: "
                            "running f32 (vectors differ from the export's by bf16 rounding)")
                compile_as = "f32"
        self.threads = threads
        if compile_as != DEFAULT_PRECISION:  # its vectors differ from the f32 ones: eval's cache must not mix them
            self.fingerprint += f"-{compile_as}"
        compiled = compile_ir(self.graph_path, threads=threads, precision=compile_as, streams=self._streams)
        self.streams = int(compiled.get_property("NUM_STREAMS")) if self._streams != 1 else 1
        self._requests = [compiled.create_infer_request() for _ in range(max(1, self.streams))]
        self._output = compiled.output(OUTPUT_NAME)
        self._lock = threading.Lock()
        return compiled

    def run_graph(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The call's rows in up to one part per stream, run at once; vectors in row order."""
        parts = np.array_split(np.arange(len(input_ids)), min(len(self._requests), len(input_ids)))
        with self._lock:
            if len(parts) == 1:
                result = self._requests[0].infer({"input_ids": input_ids, "attention_mask": attention_mask})
                return np.array(result[self._output], dtype=np.float32, copy=True)
            for request, rows in zip(self._requests, parts):
                request.start_async({"input_ids": input_ids[rows], "attention_mask": attention_mask[rows]})
            out = []
            for request in self._requests[: len(parts)]:
                request.wait()
                out.append(np.array(request.get_tensor(self._output).data, dtype=np.float32, copy=True))
            return np.concatenate(out)

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
                "inference_precision": self.compiled_precision(), "threads": threads, "streams": self.streams,
                "device": f"CPU (OpenVINO, {threads} threads, {self.streams} streams, {self.compiled_precision()})"}


# ---------------------------------------------------------------------------------------------------- export
def torch_to_openvino(encoder):
    """`encoder` (transformer + pooling + normalisation, `features_module`) as an OpenVINO model converted from
    PyTorch, with inputs input_ids / attention_mask (int64 [batch, sequence], both axes dynamic) and the output
    named OUTPUT_NAME, as the ONNX graph has them. Traced on a padded batch, so the graph takes the masked path."""
    import torch

    ov = _openvino()
    feats = encoder.tokenize(["a short one", "a somewhat longer example sentence with more tokens in it"], "document")
    if bool(feats["attention_mask"].all()):
        raise ExportError("could not build a padded example batch for tracing")
    example = {name: feats[name] for name in INPUT_NAMES}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ov_model = ov.convert_model(features_module(encoder), example_input=example,
                                    input=[(name, ov.PartialShape([-1, -1]), ov.Type.i64) for name in INPUT_NAMES])
    for port, name in zip(ov_model.inputs, INPUT_NAMES):
        port.get_tensor().set_names({name})
    ov_model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    return ov_model


def check_openvino_quantize(quantize: str | None) -> None:
    if quantize not in (None, "int8"):
        raise ModelError(f"unknown quantization {quantize!r}; only 'int8' is supported for OpenVINO")


def calibration_set(check, limit: int = CALIBRATION_TEXTS):
    """What int8 is calibrated on: the check set, except builtin-40 (a model that names no data), whose 80 one-line
    texts are fewer than the `limit` NNCF's statistics are meant to see (its own default subset is 300); then
    STS-B paraphrase texts (general English on PyPI, like the SST-2 sentences sentence-transformers calibrates its
    OpenVINO int8 on), when installed. The checks still run on the check set. Measured on MiniLM (nDCG@10 of the
    int8 IR minus fp32's, bench/records/cpu/calibration-minilm.json): builtin-40 -0.0068 on SciFact and +0.0036 on
    MedQuAD, STS-B +0.0019 and +0.0005."""
    if check.name != BUILTIN_NAME or len(check.queries) + len(check.corpus) >= limit:
        return check
    try:
        return load_check_set("stsb-paraphrase")
    except DataError as exc:
        log.warning(f"int8 calibration on builtin-40's {len(check.queries) + len(check.corpus)} texts: STS-B is not "
                    f"here ({exc}); `embedkit models fetch stsb` gives {limit}")
        return check


def calibration_items(encoder: OnnxEncoder, check, limit: int = CALIBRATION_TEXTS) -> list[dict[str, np.ndarray]]:
    """NNCF calibration samples: up to `limit` check-set texts (queries with the query prompt, documents with the
    document one, half each when there are enough), tokenised by the one path, one text per sample so that padding
    never enters the activation statistics."""
    queries, documents = list(check.queries.values()), list(check.corpus.values())
    n_queries = min(len(queries), max(limit // 2, limit - len(documents)))
    ids = encoder.token_ids(queries[:n_queries], "query") + encoder.token_ids(documents[:limit - n_queries], "document")
    items = []
    for row in ids:  # unpadded: a pad token's hidden states must not widen the activation ranges
        batch = collate([row], encoder.pad_id, encoder.padding_side, to="numpy")
        items.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
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
    precision: str = DEFAULT_PRECISION,
) -> dict[str, Any]:
    """Export `model` to an OpenVINO folder at `output` and verify it, as `export_onnx` does. Returns the manifest.

    The same checks and bounds as the ONNX export: the fp32 IR against torch (max abs diff), the int8 IR against the
    fp32 one on the check set (mean and lowest cosine, nDCG@10 drop), the default IR's batch-vs-alone difference.
    A missed bound raises ExportError and writes nothing. `threads`: OpenVINO threads for the checks. `precision`:
    the float precision the served variant runs at, "f32" or "bf16" (module docstring; bf16 is refused on a CPU
    without it, and checked like int8 against the fp32 IR at f32)."""
    check_openvino_quantize(quantize)
    check_precision(precision)
    if (exporter, opset) != ("torchscript", 17):
        raise ModelError("--exporter and --opset apply to --format onnx: the OpenVINO IR is converted from PyTorch "
                         "directly (openvino.convert_model)")
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
        log.info(f"exporting {encoder.name} to OpenVINO IR ({CONVERTER}) ...")
        ov.save_model(torch_to_openvino(encoder), tmp / FP32_IR, compress_to_fp16=False)
        encoder.tokenizer.padding_side = encoder.padding_side
        encoder.tokenizer.save_pretrained(tmp)
        config = embedding_config(encoder, fmt="embedkit-openvino/1", graphs=graphs, default_variant=default_variant)
        # the served variant at `precision`; the fp32 IR of an int8 folder stays the f32 reference
        config["inference_precision"] = {v: precision if v == default_variant else DEFAULT_PRECISION for v in graphs}
        config["pad_to_multiple_of"] = PAD_TO_MULTIPLE_OF
        write_json(tmp / OPENVINO_CONFIG_NAME, config)

        parity: dict[str, Any] = {"texts": len(source.items), **parity_record(source.check),
                                  "served_precision": precision}
        fp32 = OpenVinoEncoder(tmp, variant="fp32", threads=threads, precision=DEFAULT_PRECISION)
        fp32_vectors = check_fp32_parity(fp32, source, parity, max_abs_diff=max_abs_diff, output=output,
                                         what="OpenVINO fp32")
        default = fp32
        if quantize is None and precision != DEFAULT_PRECISION:
            # the fp32 IR served at bf16: judged like int8 against itself at f32 (keys "bf16_*")
            default = OpenVinoEncoder(tmp, variant="fp32", threads=threads)
            parity["quality_reference"] = "the fp32 IR at f32 (itself checked against torch)"
            check_int8_quality(fp32, default, source, fp32_vectors, parity, method=f"fp32 IR, {precision} float ops",
                               min_mean_cosine=min_mean_cosine, min_cosine=min_cosine, max_ndcg_drop=max_ndcg_drop,
                               output=output, label=precision)
        if quantize == "int8":
            calibration = calibration_set(source.check)
            items = calibration_items(fp32, calibration)
            log.info(f"quantising to int8 (NNCF static, calibrated on {len(items)} texts of {calibration.name}) ...")
            # quantise the fp32 IR as saved and checked (not the converter's in-memory model of a deleted file)
            fp32_ir = ov.Core().read_model(tmp / FP32_IR)
            ov.save_model(quantize_static_int8(fp32_ir, items), tmp / INT8_IR, compress_to_fp16=False)
            default = OpenVinoEncoder(tmp, variant="int8", threads=threads)
            parity["int8_calibration"] = {"texts": len(items), "check_set": calibration.name,
                                          "note": "calibrated on texts of the same check set the cosines and "
                                                  "nDCG@10 are measured on (only the fixed activation ranges "
                                                  "are fitted to them)" if calibration is source.check else
                                                  f"builtin-40 has too few texts to calibrate on; "
                                                  f"{calibration.name} instead (calibration_set)"}
            parity["quality_reference"] = "the fp32 IR at f32 (itself checked against torch)"
            parity["int8_precision"] = precision
            check_int8_quality(fp32, default, source, fp32_vectors, parity,
                               method=INT8_METHOD + (f"; float ops in {precision}" if precision != "f32" else ""),
                               min_mean_cosine=min_mean_cosine, min_cosine=min_cosine, max_ndcg_drop=max_ndcg_drop,
                               output=output)
        for multiple in PAD_MULTIPLES:
            default.pad_to_multiple_of = multiple
            try:
                check_batch_independence(default, source, parity, max_batch_diff=max_batch_diff, output=output)
                break
            except ExportError:
                if multiple == PAD_MULTIPLES[-1]:
                    raise
                log.info(f"batches padded to a multiple of {multiple} tokens are not batch-independent on this CPU: "
                         "trying a larger multiple")
        if multiple != config["pad_to_multiple_of"]:
            config["pad_to_multiple_of"] = multiple
            write_json(tmp / OPENVINO_CONFIG_NAME, config)
        parity["passed"] = True
        atol = BF16_PROBE_ATOL if precision == "bf16" else DEFAULT_ATOL if quantize is None else 1e-3
        write_probes(default, tmp, created_by="export", atol=atol,
                     vectors_fn=lambda t, k: default.encode(list(t), k))
        runtime = runtime_record({v: e.compiled_precision() for v, e in (('fp32', fp32), (default.variant, default))})
        log.info(describe_runtime(runtime))
        manifest = write_export_manifest(tmp, model, encoder, graphs, exporter=CONVERTER, opset=None, quantize=quantize,
                                         default_variant=default_variant, started=started, parity=parity,
                                         source_probes=source.source_probes, fmt="openvino",
                                         graph_sha256=ir_sha256, graph_bytes=ir_bytes, extra={"cpu": runtime})
    log.info(f"wrote {output} ({', '.join(graphs.values())}) in {time.time() - started:.1f}s")
    return manifest

