"""int8 ONNX methods for MiniLM: speed, batch-vs-alone difference, cosine to fp32, nDCG@10 (issues #15, #16).

    .venv/bin/python bench/bench_export.py [--threads 1,2] [--repeats 3] [--texts 2000] [--methods a,b,...]
        [--check-set beir:../shared/data/scifact:test --check-set stsb-paraphrase ...] [--json out.json]

Exports MiniLM to fp32 ONNX once (`embedkit export`), derives one graph per method from it, and measures each:
  texts/s        2,000 MedQuAD test questions in batches of 32 (as bench_serve), per thread count; all methods are
                 timed round-robin (one pass each per round) and the median of --repeats rounds is printed, with the
                 load average, next to torch fp32 in-process (the x ratio is to torch at the same thread count)
  batch vs alone max |vector(text alone) - vector(text inside a batch of 8 / 32 of other texts)|, 48 texts of
                 1 to 256 tokens (embedkit.models.probes.batch_invariance)
  cosine         to the fp32 graph over every check-set text (mean, min)
  nDCG@10        on each check set (sampled as `embedkit export` samples: <=300 queries, <=1,000 documents)

Methods: fp32 | fp32-opt (onnxruntime.transformers optimizer, model_type bert) | dynamic (quantize_dynamic, per-channel
weights: the previous default) | dynamic-opt | dynamic-b1 (the dynamic graph run one text per call: per-row by
construction) | static-{minmax,percentile,entropy} (quantize_static QDQ, MatMul weights per-channel, uint8
activations, calibrated on 300 MedQuAD train texts) | static-minmax-ffn2-fp32 (the FFN down-projections left fp32) |
per-token (embedkit's int8: per-token activation scales, 7-bit weights) | per-token-w8 (8-bit weights) |
per-token-opt (optimizer first). Prints the CPU's int8 instruction sets first: speed ratios depend on them.
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

from cpuinfo import describe, int8_instructions  # noqa: E402  (bench/ is on sys.path: a script)

METHODS = ("fp32", "fp32-opt", "dynamic", "dynamic-opt", "dynamic-b1", "static-minmax", "static-percentile",
           "static-entropy", "static-minmax-ffn2-fp32", "per-token", "per-token-w8", "per-token-opt")


def load_texts(n: int) -> list[str]:
    path = DATA / "medquad" / "test" / "queries.jsonl"
    texts = [json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip()]
    return [texts[i % len(texts)] for i in range(n)]


def calibration_texts(n: int = 300) -> list[str]:
    import random

    rows = [json.loads(line) for line in (DATA / "medquad" / "train_pairs.jsonl").open(encoding="utf-8")]
    random.Random(1).shuffle(rows)
    return [r["query"] for r in rows[: n // 2]] + [r["positive"] for r in rows[n // 2: n]]


# ------------------------------------------------------------------------------------------------------ graphs
def optimized(src: Path, dst: Path) -> dict:
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(src), model_type="bert")
    model.save_model_to_file(str(dst))
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


def dynamic(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def static(src: Path, dst: Path, encoder, method: str, exclude_ffn2: bool = False) -> None:
    import numpy as np
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    ids = encoder.token_ids(calibration_texts(), "document")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    width = 128  # histogram calibrators need equal shapes in every batch

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            batches = []
            for start in range(0, len(order), 20):
                rows = [ids[i][:width] for i in order[start:start + 20]]
                input_ids = np.full((len(rows), width), encoder.pad_id, np.int64)
                mask = np.zeros((len(rows), width), np.int64)
                for r, row in enumerate(rows):
                    input_ids[r, :len(row)], mask[r, :len(row)] = row, 1
                batches.append({"input_ids": input_ids, "attention_mask": mask})
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    graph = onnx.load(str(src)).graph
    weights = {i.name for i in graph.initializer}
    activation_products = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
    ffn2 = [n.name for n in graph.node if n.op_type == "MatMul" and "/output/dense/" in n.name
            and "attention" not in n.name] if exclude_ffn2 else []
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, {"minmax": "MinMax", "percentile": "Percentile",
                                                                 "entropy": "Entropy"}[method]),
                    nodes_to_exclude=activation_products + ffn2)


def build(method: str, folder: Path, encoder) -> Path:
    from embedkit.export.onnx import quantize_int8

    fp32 = folder / "model.onnx"
    out = folder / f"bench_{method}.onnx"
    if method == "fp32" or method == "dynamic-b1":
        return fp32 if method == "fp32" else build("dynamic", folder, encoder)
    if out.is_file():
        return out
    if method.endswith("-opt"):
        base = folder / "bench_fp32-opt.onnx"
        if not base.is_file():
            print(f"  optimizer fusions: {optimized(fp32, base)}", flush=True)
        if method == "fp32-opt":
            return base
        src = base
    else:
        src = fp32
    kind = method.removesuffix("-opt")
    if kind == "dynamic":
        dynamic(src, out)
    elif kind.startswith("static-"):
        static(src, out, encoder, kind.split("-")[1], exclude_ffn2=kind.endswith("ffn2-fp32"))
    elif kind == "per-token":
        quantize_int8(src, out)
    elif kind == "per-token-w8":
        quantize_int8(src, out, weight_qmax=127)
    else:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return out


class GraphEncoder:
    """OnnxEncoder of the export folder with another graph file; `one_by_one` runs one text per call."""

    def __init__(self, folder: Path, graph: Path, threads: int, one_by_one: bool = False) -> None:
        import onnxruntime as ort

        from embedkit.export.onnx import OnnxEncoder

        self.inner = OnnxEncoder(folder, variant="fp32", threads=threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.inner.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.one_by_one = one_by_one

    def encode(self, texts, kind="document", batch_size=32):
        return self.inner.encode(list(texts), kind, 1 if self.one_by_one else batch_size)


# ------------------------------------------------------------------------------------------------------ measures
def speeds(encoders: dict, texts: list[str], repeats: int) -> dict[str, tuple[float, list[float], list[float]]]:
    for encoder in encoders.values():
        encoder.encode(texts[:64], batch_size=32)
    rates: dict[str, list[float]] = {name: [] for name in encoders}
    loads: list[float] = []
    for _ in range(repeats):
        for name, encoder in encoders.items():
            began = time.perf_counter()
            encoder.encode(texts, batch_size=32)
            rates[name].append(len(texts) / (time.perf_counter() - began))
        loads.append(os.getloadavg()[0])
    return {name: (statistics.median(r), r, loads) for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts to time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--check-set", action="append", dest="check_sets",
                        help="check set spec (repeatable); default: SciFact test, MedQuAD test, stsb-paraphrase")
    parser.add_argument("--workdir", type=Path, help="keep the export and the graphs here (default: a temp dir)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import numpy as np
    import torch

    from embedkit.export.checkset import load_check_set, ndcg_from_vectors
    from embedkit.export.onnx import export_onnx
    from embedkit.models.probes import BATCH_TEXTS, batch_invariance
    from embedkit.models import load_model

    info = int8_instructions()
    print(describe(info), flush=True)
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}", flush=True)
    methods = [m for m in args.methods.split(",") if m]
    threads = [int(t) for t in args.threads.split(",")]
    check_specs = args.check_sets or [f"beir:{DATA / 'scifact'}:test", f"beir:{DATA / 'medquad' / 'test'}:test",
                                      "stsb-paraphrase"]
    tmp = tempfile.TemporaryDirectory(prefix="bench_export_")
    workdir = args.workdir or Path(tmp.name)
    folder = workdir / "minilm_onnx"
    if not (folder / "model.onnx").is_file():
        from embedkit.logs import configure_logging

        configure_logging("  export")
        export_onnx("minilm", folder)
    from embedkit.export.onnx import OnnxEncoder

    tokenizer_encoder = OnnxEncoder(folder, variant="fp32")
    graphs = {}
    for method in methods:
        began = time.time()
        graphs[method] = build(method, folder, tokenizer_encoder)
        print(f"built {method}: {graphs[method].name} ({graphs[method].stat().st_size / 1e6:.1f} MB, "
              f"{time.time() - began:.0f} s)", flush=True)

    report: dict = {"cpu": info, "onnxruntime": onnxruntime.__version__, "methods": {m: {} for m in methods}}
    # --- accuracy: every method against fp32, on each check set; batch vs alone
    checks = [] if args.skip_accuracy else [load_check_set(spec) for spec in check_specs]
    encoders = {m: GraphEncoder(folder, graphs[m], threads[-1], one_by_one=m == "dynamic-b1") for m in methods}
    reference = GraphEncoder(folder, folder / "model.onnx", threads[-1])
    batch_texts = list(BATCH_TEXTS) + [t for c in checks[:1] for t in list(c.queries.values())[:16]
                                       + list(c.corpus.values())[:16]]
    fp32_vectors = {c.name: (reference.encode(list(c.queries.values()), "query"),
                             reference.encode(list(c.corpus.values()), "document")) for c in checks}
    for method in ([] if args.skip_accuracy else methods):
        encoder, row = encoders[method], report["methods"][method]
        one = 1 if method == "dynamic-b1" else None
        row["batch_vs_alone"] = batch_invariance(
            lambda t, e=encoder, o=one: e.encode(t, "document", o or len(t)), batch_texts)
        cosines = []
        for check in checks:
            q = encoder.encode(list(check.queries.values()), "query")
            d = encoder.encode(list(check.corpus.values()), "document")
            ref_q, ref_d = fp32_vectors[check.name]
            row[f"ndcg@10 {check.name}"] = ndcg_from_vectors(check, q, d)
            row[f"ndcg@10 fp32 {check.name}"] = ndcg_from_vectors(check, ref_q, ref_d)
            a, b = np.concatenate([q, d]), np.concatenate([ref_q, ref_d])
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            row[f"min cosine {check.name}"] = float(cos.min())
            cosines.append(cos)
        cos = np.concatenate(cosines)
        row.update({"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                    "p001_cosine": float(np.quantile(cos, 0.001)),
                    "mb": round(graphs[method].stat().st_size / 1e6, 1)})
        print(f"{method}: batch vs alone {row['batch_vs_alone']:.1e}, cosine mean {row['mean_cosine']:.4f} min "
              f"{row['min_cosine']:.4f}, " + ", ".join(f"nDCG@10 {c.name} {row[f'ndcg@10 {c.name}']:.4f}"
                                                         for c in checks), flush=True)
    del encoders
    # --- speed, per thread count, round-robin with torch
    texts = load_texts(args.texts)
    for n in ([] if args.skip_speed else threads):
        torch.set_num_threads(n)
        timed = {"torch": load_model("minilm")}
        timed.update({m: GraphEncoder(folder, graphs[m], n, one_by_one=m == "dynamic-b1") for m in methods})
        result = speeds(timed, texts, args.repeats)
        base = result["torch"][0]
        report.setdefault("torch", {})[f"texts_per_s_{n}t"] = base
        print(f"\n{n} thread(s), {len(texts)} texts in batches of 32, medians of {args.repeats} "
              f"(load {', '.join(f'{x:.1f}' for x in result['torch'][2])}):", flush=True)
        for name, (median, rates, _) in result.items():
            print(f"  {name:<26} {median:7.0f} texts/s  x{median / base:.2f} torch  "
                  f"({', '.join(f'{r:.0f}' for r in rates)})", flush=True)
            if name != "torch":
                report["methods"][name][f"texts_per_s_{n}t"] = median
                report["methods"][name][f"x_torch_{n}t"] = median / base
        report[f"load_avg_{n}t"] = result["torch"][2]
        del timed
    # --- table
    names = [c.name for c in checks]
    accuracy = [] if args.skip_accuracy else ["batch vs alone", "cos mean", "cos min"] + [f"nDCG {n}" for n in names]
    header = (["method", "MB"] + accuracy + [f"texts/s {n}t (x torch)" for n in ([] if args.skip_speed else threads)])
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    fp32_row = report["methods"].get("fp32") or {}
    for method, row in report["methods"].items():
        cells = [method, f"{graphs[method].stat().st_size / 1e6:.0f}"]
        if accuracy:
            cells += [f"{row['batch_vs_alone']:.1e}", f"{row['mean_cosine']:.4f}", f"{row['min_cosine']:.4f}"]
            cells += [f"{row[f'ndcg@10 {n}']:.4f}" for n in names]
        cells += [f"{row[f'texts_per_s_{t}t']:.0f} (x{row[f'x_torch_{t}t']:.2f})"
                  for t in ([] if args.skip_speed else threads)]
        print("| " + " | ".join(cells) + " |")
    if "torch" in report:
        print("| torch fp32 | " + " | ".join("" for _ in accuracy) + " | "
              + " | ".join(f"{report['torch'][f'texts_per_s_{t}t']:.0f}" for t in threads) + " |")
    if fp32_row and names:
        print("fp32 nDCG@10: " + ", ".join(f"{n} {fp32_row[f'ndcg@10 fp32 {n}']:.4f}" for n in names))
    report["load_avg_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
