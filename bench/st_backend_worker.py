"""One sentence-transformers backend in its own process, serving bench/bench_cpu_backends.py over stdin/stdout.

    PYTHON bench/st_backend_worker.py --backend st-onnx-qint8 --model MINILM_DIR --workdir DIR --threads 2 \
        [--calibration DIR]

PYTHON is the peer venv's interpreter (bench/.venv-st-backends, see bench/st-backends-venv.sh) for the ONNX and
OpenVINO backends, or embedkit's own for st-torch (the driver chooses; see its docstring). This file imports nothing
from embedkit (the peer venv does not have it): standard library, numpy and sentence-transformers only.

Backends, each loaded (and exported) once at start, as the sentence-transformers docs describe them
(https://sbert.net/docs/sentence_transformer/usage/efficiency.html):

  st-torch           SentenceTransformer(model, device="cpu"); torch.set_num_threads(threads)
  st-onnx-qint8      backend="onnx" (ST exports the fp32 ONNX graph with optimum), then
                     export_dynamic_quantized_onnx_model(model, CONFIG, dir) with CONFIG chosen from the CPU's flags
                     (avx512_vnni > avx512 > avx2 > arm64), loaded back with file_name onnx/model_qint8_CONFIG.onnx
                     and an onnxruntime SessionOptions of intra_op_num_threads=threads, inter_op_num_threads=1
  st-openvino-qint8  backend="openvino" with ov_config {"INFERENCE_NUM_THREADS": threads}, then
                     export_static_quantized_openvino_model(model, OVQuantizationConfig(), dir, ...) (NNCF static
                     int8, ST's default config) calibrated on --calibration (a datasets folder holding train.jsonl
                     with a "sentence" column: ST's default calibration set, GLUE SST-2, is on the hub, and this
                     runs offline), loaded back with file_name openvino/openvino_model_qint8_quantized.xml.
                     OpenVINO's other settings are left as optimum-intel sets them (PERFORMANCE_HINT LATENCY, and the
                     CPU's default inference precision: bf16 on CPUs with AVX-512 BF16 / AMX); the precision it
                     compiled with is reported in `info`
  fake               deterministic vectors from a hash of each text, no model: for tests of the protocol

Each model folder is a copy of --model under --workdir (the exports are written next to it, never into --model).

Protocol: one JSON object per line. The worker first writes {"ready": true, "info": {...}} (versions, the thread
setting read back from the runtime, the quantization config, load / export seconds) or {"error": "..."} and exits.
Then, per request line:

  {"cmd": "time", "texts_file": F, "batch_size": B}           -> {"seconds": s}   one timed pass over F's texts
  {"cmd": "encode", "texts_file": F, "batch_size": B, "out": P} -> {"n": n, "dim": d}  vectors saved to P (.npy)
  {"cmd": "quit"}                                              -> {"bye": true}, then exit

F is a JSON file holding a list of strings (read once, then cached by path). A request that fails answers
{"error": "..."} and the worker keeps serving. Library output goes to stderr: fd 1 is pointed at stderr at start
and the protocol has its own copy of the original stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BACKENDS = ("st-torch", "st-onnx-qint8", "st-openvino-qint8", "fake")
# export_dynamic_quantized_onnx_model's configurations, best first, with the /proc/cpuinfo flag each needs.
ONNX_QUANT_CONFIGS = (("avx512_vnni", "avx512_vnni"), ("avx512", "avx512f"), ("avx2", "avx2"))
OPENVINO_QINT8_FILE = "openvino/openvino_model_qint8_quantized.xml"


def cpu_flags() -> set[str]:
    """The CPU's int8 flags, as the driver reports them (bench/cpuinfo.py: stdlib only, so the peer venv runs it)."""
    from cpuinfo import int8_instructions  # bench/ is this script's folder, first on sys.path

    return set(int8_instructions()["int8_flags"])


def onnx_quant_config(flags: set[str], machine: str | None = None) -> str:
    """The export_dynamic_quantized_onnx_model configuration for this CPU (ST names: avx512_vnni, avx512, avx2,
    arm64)."""
    for name, flag in ONNX_QUANT_CONFIGS:
        if flag in flags:
            return name
    machine = machine or os.uname().machine
    if machine in ("aarch64", "arm64"):
        return "arm64"
    raise RuntimeError("no ONNX qint8 configuration for this CPU (needs AVX2, AVX-512 or arm64)")


def versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def type_name(value) -> str:
    """An OpenVINO element type as its short name ("bf16", "f32"), anything else as str()."""
    get = getattr(value, "get_type_name", None)
    return get() if callable(get) else str(value)


def copy_model(model: str, workdir: Path, name: str) -> Path:
    target = workdir / name / "model"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(model, target)
    return target


def load(backend: str, model: str, workdir: Path, threads: int, calibration: str | None):
    """(encode(texts, batch_size) -> float32 [n, dim], info dict)."""
    if backend == "fake":
        import numpy as np

        def fake(texts, batch_size):
            rows = [np.frombuffer(hashlib.sha256(t.encode()).digest(), dtype=np.uint8)[:8] for t in texts]
            vectors = np.asarray(rows, dtype=np.float32).reshape(len(texts), 8) + 1.0
            return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

        return fake, {"backend": "fake", "threads": threads, "threads_check": "n/a (fake)"}

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    info = {"backend": backend, "python": sys.executable,
            "versions": versions("sentence-transformers", "transformers", "torch", "optimum", "optimum-onnx",
                                 "optimum-intel", "onnxruntime", "openvino", "nncf", "numpy"),
            "threads": threads, "torch_threads": torch.get_num_threads()}
    started = time.perf_counter()
    if backend == "st-torch":
        st = SentenceTransformer(model, device="cpu")
        info["threads_check"] = f"torch.get_num_threads() = {torch.get_num_threads()}"
        info["threads_ok"] = torch.get_num_threads() == threads
    elif backend == "st-onnx-qint8":
        import onnxruntime as ort
        from sentence_transformers import export_dynamic_quantized_onnx_model

        config = onnx_quant_config(cpu_flags())
        folder = copy_model(model, workdir, backend)

        def options():
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            return so

        fp32 = SentenceTransformer(str(folder), device="cpu", backend="onnx",
                                   model_kwargs={"provider": "CPUExecutionProvider", "session_options": options()})
        export_dynamic_quantized_onnx_model(fp32, config, str(folder))
        info["export_s"] = round(time.perf_counter() - started, 1)
        del fp32
        file_name = f"onnx/model_qint8_{config}.onnx"
        st = SentenceTransformer(str(folder), device="cpu", backend="onnx",
                                 model_kwargs={"file_name": file_name, "provider": "CPUExecutionProvider",
                                               "session_options": options()})
        session = st[0].auto_model.session
        intra = session.get_session_options().intra_op_num_threads
        info.update(quantization=f"export_dynamic_quantized_onnx_model({config!r})", file_name=file_name,
                    providers=session.get_providers(),
                    threads_check=f"onnxruntime intra_op_num_threads = {intra}", threads_ok=intra == threads)
    elif backend == "st-openvino-qint8":
        from optimum.intel import OVQuantizationConfig
        from sentence_transformers import export_static_quantized_openvino_model

        if not calibration:
            raise RuntimeError("st-openvino-qint8 needs --calibration (a datasets folder with train.jsonl)")
        folder = copy_model(model, workdir, backend)
        kwargs = {"ov_config": {"INFERENCE_NUM_THREADS": threads}}
        fp32 = SentenceTransformer(str(folder), device="cpu", backend="openvino", model_kwargs=kwargs)
        quant_config = OVQuantizationConfig()
        export_static_quantized_openvino_model(fp32, quant_config, str(folder), dataset_name=calibration,
                                               dataset_config_name="default", dataset_split="train",
                                               column_name="sentence")
        info["export_s"] = round(time.perf_counter() - started, 1)
        del fp32
        st = SentenceTransformer(str(folder), device="cpu", backend="openvino",
                                 model_kwargs={"file_name": OPENVINO_QINT8_FILE, **kwargs})
        compiled = st[0].auto_model.request
        got = int(compiled.get_property("INFERENCE_NUM_THREADS"))
        info.update(quantization="export_static_quantized_openvino_model(OVQuantizationConfig())",
                    calibration=f"{calibration} (train.jsonl, column sentence)",
                    quantization_num_samples=getattr(quant_config, "num_samples", None),
                    file_name=OPENVINO_QINT8_FILE, ov_config=dict(st[0].auto_model.ov_config),
                    inference_precision=type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
                    threads_check=f"OpenVINO INFERENCE_NUM_THREADS = {got}", threads_ok=got == threads)
    else:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    info["load_s"] = round(time.perf_counter() - started, 1)
    info["max_seq_length"] = st.max_seq_length

    def encode(texts, batch_size):
        return st.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                         show_progress_bar=False).astype("float32", copy=False)

    return encode, info


def serve(encode, requests, replies) -> None:
    """Answer `requests` (lines of JSON) on `replies` until {"cmd": "quit"} or end of input."""
    import numpy as np

    cache: dict[str, list[str]] = {}

    def texts_of(path: str) -> list[str]:
        if path not in cache:
            cache[path] = json.loads(Path(path).read_text(encoding="utf-8"))
        return cache[path]

    for line in requests:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            cmd = req.get("cmd")
            if cmd == "quit":
                reply = {"bye": True}
            elif cmd == "time":
                texts = texts_of(req["texts_file"])
                started = time.perf_counter()
                encode(texts, int(req["batch_size"]))
                reply = {"seconds": time.perf_counter() - started}
            elif cmd == "encode":
                vectors = encode(texts_of(req["texts_file"]), int(req["batch_size"]))
                np.save(req["out"], vectors)
                reply = {"n": int(vectors.shape[0]), "dim": int(vectors.shape[1])}
            else:
                reply = {"error": f"unknown cmd {cmd!r}"}
        except Exception as exc:  # answered, not fatal: the driver reports it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
        if reply.get("bye"):
            return


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", required=True, choices=BACKENDS)
    ap.add_argument("--model", required=True)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibration")
    args = ap.parse_args(argv)
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, not into the protocol
    sys.stdout = sys.stderr
    try:
        encode, info = load(args.backend, args.model, args.workdir, args.threads, args.calibration)
    except Exception as exc:
        replies.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        replies.flush()
        return 1
    replies.write(json.dumps({"ready": True, "info": info}) + "\n")
    replies.flush()
    serve(encode, sys.stdin, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
