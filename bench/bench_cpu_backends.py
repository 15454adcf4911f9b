"""CPU backends side by side in one run (issue #34 item 3, skeleton): sentence-transformers against embedkit.

    .venv/bin/python bench/bench_cpu_backends.py [--texts short|abstracts] [--n 512] [--batch-size 32]
        [--threads 2] [--repeats 3] [--backends st-torch,embedkit-openvino-int8,...] [--json out.json]

Backends (each skipped with the reason when it cannot run here):
  st-torch               SentenceTransformer(MiniLM) on PyTorch fp32: the ratio column's reference
  st-onnx-qint8          SentenceTransformer(backend="onnx") with `export_dynamic_quantized_onnx_model` qint8
                         (needs optimum, which pins transformers < 5: usually skipped beside embedkit)
  st-openvino            SentenceTransformer(backend="openvino") (needs optimum-intel: the same pin)
  embedkit-torch         embedkit's Encoder, PyTorch fp32
  embedkit-onnx          `embedkit export --format onnx`, fp32 graph, onnxruntime
  embedkit-onnx-int8     the same folder's per-token int8 graph
  embedkit-openvino-int8 `embedkit export --format openvino --quantize int8` (NNCF static int8, f32 float ops)

Texts: short = MedQuAD test questions; abstracts = SciFact documents (title + abstract, cut at the model's
max length). Every backend encodes the same texts in batches of --batch-size on --threads threads; backends are timed
round-robin (one pass each per round) and the median of --repeats rounds is printed with texts/s and the ratio to
st-torch, under the CPU model, its int8 / bf16 instructions and the load average (speed ratios depend on them).

A skeleton: it measures speed only (nDCG@10 beside each backend, the server at concurrency 1 and 8, and a record
under bench/records/ are the next steps). Do not run it at length on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

BACKENDS = ("st-torch", "st-onnx-qint8", "st-openvino", "embedkit-torch", "embedkit-onnx", "embedkit-onnx-int8",
            "embedkit-openvino-int8")


def load_texts(which: str, n: int) -> list[str]:
    if which == "short":
        path = DATA / "medquad" / "test" / "queries.jsonl"
        texts = [json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip()]
    else:
        path = DATA / "scifact" / "corpus.jsonl"
        rows = [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]
        texts = [f"{r.get('title', '')} {r['text']}".strip() for r in rows]
    return [texts[i % len(texts)] for i in range(n)]


def make_encoders(names: list[str], workdir: Path, threads: int) -> dict[str, object]:
    """{backend: encode(texts) -> vectors, or the reason it is skipped (a string)}."""
    import torch

    from embedkit.models.registry import minilm_path

    torch.set_num_threads(threads)
    model_dir = str(minilm_path())
    found: dict[str, object] = {}
    for name in names:
        try:
            found[name] = _encoder(name, model_dir, workdir, threads)
        except Exception as exc:  # a backend that cannot run here is reported, not fatal
            found[name] = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return found


def _encoder(name: str, model_dir: str, workdir: Path, threads: int):
    if name.startswith("st-"):
        from sentence_transformers import SentenceTransformer

        if name == "st-torch":
            model = SentenceTransformer(model_dir, device="cpu")
        elif name == "st-onnx-qint8":
            from sentence_transformers import export_dynamic_quantized_onnx_model

            model = SentenceTransformer(model_dir, device="cpu", backend="onnx")
            export_dynamic_quantized_onnx_model(model, "avx512_vnni", str(workdir / "st-onnx"))
            model = SentenceTransformer(model_dir, device="cpu", backend="onnx",
                                        model_kwargs={"file_name": "onnx/model_qint8_avx512_vnni.onnx"})
        else:
            model = SentenceTransformer(model_dir, device="cpu", backend="openvino")
        return lambda texts, bs: model.encode(texts, batch_size=bs, normalize_embeddings=True)
    if name == "embedkit-torch":
        from embedkit.models import load_model

        encoder = load_model(model_dir).eval()
        return lambda texts, bs: encoder.encode(texts, kind="document", batch_size=bs)
    if name.startswith("embedkit-onnx"):
        from embedkit.export.onnx import OnnxEncoder, export_onnx

        folder = workdir / "onnx"
        if not folder.is_dir():
            export_onnx(model_dir, folder, quantize="int8")
        encoder = OnnxEncoder(folder, variant="int8" if name.endswith("int8") else "fp32", threads=threads)
        return lambda texts, bs: encoder.encode(texts, "document", bs)
    if name == "embedkit-openvino-int8":
        from embedkit.export.openvino import OpenVinoEncoder, describe_runtime, export_openvino

        folder = workdir / "openvino"
        manifest = export_openvino(model_dir, folder, quantize="int8", threads=threads)
        print(describe_runtime(manifest["cpu"]), flush=True)
        encoder = OpenVinoEncoder(folder, threads=threads)
        return lambda texts, bs: encoder.encode(texts, "document", bs)
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", choices=("short", "abstracts"), default="short")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cpuinfo import describe, int8_instructions

    from embedkit.export.openvino import cpu_instructions

    texts = load_texts(args.texts, args.n)
    print(describe(), flush=True)
    print(f"instructions (int8 / bf16): {' '.join(cpu_instructions()['instructions'])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-cpu-backends-") as work:
        encoders = make_encoders([b.strip() for b in args.backends.split(",") if b.strip()], Path(work),
                                 args.threads)
        runnable = {name: fn for name, fn in encoders.items() if callable(fn)}
        for fn in runnable.values():  # warm-up: first-call compilation and allocation are not timed
            fn(texts[: args.batch_size], args.batch_size)
        times: dict[str, list[float]] = {name: [] for name in runnable}
        for _ in range(args.repeats):
            for name, fn in runnable.items():
                started = time.perf_counter()
                fn(texts, args.batch_size)
                times[name].append(time.perf_counter() - started)
    speeds = {name: len(texts) / statistics.median(t) for name, t in times.items()}
    reference = speeds.get("st-torch")
    print(f"\n{args.texts} texts: {len(texts)}, batch {args.batch_size}, {args.threads} threads, median of "
          f"{args.repeats}")
    rows = []
    for name, fn in encoders.items():
        if name in speeds:
            ratio = f"x{speeds[name] / reference:.2f}" if reference else "-"
            print(f"  {name:<24} {speeds[name]:>9.1f} texts/s  {ratio}")
            rows.append({"backend": name, "texts_per_s": speeds[name],
                         "ratio_to_st_torch": speeds[name] / reference if reference else None})
        else:
            print(f"  {name:<24} {fn}")
            rows.append({"backend": name, "skipped": fn})
    if args.json:
        args.json.write_text(json.dumps({"cpu": int8_instructions(), "instructions": cpu_instructions(),
                                         "texts": args.texts, "n": len(texts), "batch_size": args.batch_size,
                                         "threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
