"""CPU backends side by side in one run (issue #34 item 3): sentence-transformers' fastest backends against embedkit.

    .venv/bin/python bench/bench_cpu_backends.py [--texts short,abstracts] [--n 512] [--batch-size 32]
        [--threads 2] [--repeats 5] [--backends st-torch,embedkit-openvino-int8,...] [--quality [--quality-docs N]]
        [--st-venv bench/.venv-st-backends] [--json out.json] [--record bench/records/cpu/NAME.json]

The record (needs bench/.venv-st-backends; run on a quiet machine, nothing else busy):

    .venv/bin/python bench/bench_cpu_backends.py --repeats 5 --quality --record bench/records/cpu/backends-minilm.json

Expected duration on 2 cores (AMD EPYC, AVX-512 VNNI): about 45 minutes, roughly 4 of start-up (the ST exports,
OpenVINO's calibration and embedkit's three exports with their parity checks, in parallel), 13 of timing (5 rounds of
8 backends x 512 questions + 512 abstracts) and 27 of --quality (every backend encodes SciFact's 5,183 abstracts; the
two fp32 torch backends take half of it). Estimated (the eighth backend, embedkit-openvino-int8-bf16, added by
scaling) from smoke runs on the same CPU at load average 6-8, which took
about 2.5 times as long as this estimate; a busy machine takes that long and skews the ratios.

A smoke run (every backend once, a cut SciFact corpus whose nDCG@10 is not comparable; 11 minutes at load 6-8):

    .venv/bin/python bench/bench_cpu_backends.py --n 64 --repeats 1 --quality --quality-docs 100

Backends (MiniLM, the same model folder for all; each skipped with its reason when it cannot run here):

  st-torch                SentenceTransformer(model, device="cpu"), PyTorch fp32: the ratio column's reference
  st-onnx-qint8           SentenceTransformer(backend="onnx") + export_dynamic_quantized_onnx_model, the CPU's
                          config (avx512_vnni / avx512 / avx2)
  st-openvino-qint8       SentenceTransformer(backend="openvino") + export_static_quantized_openvino_model (NNCF
                          static int8, ST's default OVQuantizationConfig), calibrated on 300 SICK train sentences
                          (ST's default, GLUE SST-2, is on the hub); its float ops run at OpenVINO's default
                          precision as a user gets it (bf16 on CPUs with AVX-512 BF16 / AMX; printed), embedkit's f32
  embedkit-torch          embedkit's Encoder, PyTorch fp32
  embedkit-onnx           `embedkit export --format onnx`, fp32 graph, onnxruntime
  embedkit-onnx-int8      the same folder's per-token int8 graph
  embedkit-openvino-int8  `embedkit export --format openvino --quantize int8` (NNCF static int8, f32 float ops)
  embedkit-openvino-int8-bf16
                          the same export with `--precision bf16` (its own folder and parity checks: the int8 IR's
                          float ops in bf16); skipped with the export's one-line refusal on a CPU without
                          avx512_bf16 / amx_bf16
  st-torch-peer           (not in the default list) st-torch under the peer venv's older sentence-transformers /
                          transformers: separates a version effect from a backend effect

The ST backends run in worker processes (bench/st_backend_worker.py, which imports nothing from embedkit), each
loading and exporting its model once and then answering the driver's requests (one timed pass; encode texts to an
.npy) over stdin/stdout. ST's ONNX and OpenVINO backends need optimum-onnx / optimum-intel; the newest optimum-onnx
(0.1.0) pins transformers < 4.58 and sentence-transformers 6.x needs transformers >= 5, so they run from a peer venv
with sentence-transformers 5.7.0 / transformers 4.57.6 (bench/st-backends-venv.sh builds it; --st-venv points at
it). st-torch runs the worker under embedkit's own interpreter: sentence-transformers 6.x with the same
transformers and torch as embedkit-torch, i.e. ST's PyTorch path as a user installing it today gets it, so the
ratio column's reference is current ST, not the older release the peer venv is pinned to (st-torch-peer measures
that one when asked). The embedkit backends run in the driver's process, as a user's code would call them.

Texts: short = MedQuAD test questions; abstracts = SciFact documents (title + abstract as embedkit's evaluator joins
them, cut at the model's max length, 256 tokens), --n of each. Every backend encodes the same texts in batches of
--batch-size on --threads threads (torch.set_num_threads; onnxruntime intra_op_num_threads; OpenVINO
INFERENCE_NUM_THREADS; each read back from the runtime and printed). Timing is round-robin: each round runs one pass
of every backend over every text set, the starting backend rotating per round, with a short pause before each pass
so the previous backend's spinning threads are idle; the median of --repeats rounds is printed as texts/s with the
ratio to st-torch. One untimed pass over 2 batches per backend and set warms it up first.

--quality adds, beside each backend: nDCG@10 on SciFact test (300 claims over 5,183 abstracts; vectors from each
backend, search and metric by embedkit's own code, identical for all) with its difference to st-torch (the fp32
reference), and the batch-vs-alone max abs difference: 32 mixed texts (16 questions, 16 abstracts) encoded in one
batch and one at a time. --quality-docs N keeps the judged abstracts plus N others (smoke runs only).

Printed: the CPU model, its int8 / bf16 instructions, the load average before and after, each backend's runtime
(threads read back, int8 configuration, OpenVINO precision), the table, and the verdict per text set: embedkit's
fastest backend against ST's fastest that ran (target x1.10), and for that embedkit backend nDCG@10 within 0.005 of
fp32 and batch-independent vectors. A backend that cannot run prints "skipped: <reason>" (no fallback).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DATA = REPO.parent / "shared" / "data"
WORKER = BENCH / "st_backend_worker.py"
ST_VENV = BENCH / ".venv-st-backends"
ST_VENV_HINT = "create it with bench/st-backends-venv.sh"

BACKENDS = ("st-torch", "st-onnx-qint8", "st-openvino-qint8", "embedkit-torch", "embedkit-onnx", "embedkit-onnx-int8",
            "embedkit-openvino-int8", "embedkit-openvino-int8-bf16")
# embedkit's OpenVINO backends: the export's --precision of each
OPENVINO_PRECISIONS = {"embedkit-openvino-int8": "f32", "embedkit-openvino-int8-bf16": "bf16"}
OPTIONAL_BACKENDS = ("st-torch-peer",)
REFERENCE = "st-torch"
# backend -> (the worker's --backend, the interpreter: "own" = this one, "peer" = the peer venv's)
ST_WORKERS = {"st-torch": ("st-torch", "own"), "st-torch-peer": ("st-torch", "peer"),
              "st-onnx-qint8": ("st-onnx-qint8", "peer"), "st-openvino-qint8": ("st-openvino-qint8", "peer")}
TEXT_SETS = ("short", "abstracts")
TARGET_SPEEDUP = 1.10  # embedkit's fastest / ST's fastest, per text set (issue #34)
MAX_NDCG_DROP = 0.005  # embedkit's fastest path vs fp32 (st-torch)
SETTLE_S = 0.3  # pause before each timed pass: OpenMP / onnxruntime threads of the previous backend stop spinning
CALIBRATION_TEXTS = 300
BATCH_PROBE_TEXTS = 16  # of each set: 32 texts in all


class Unavailable(Exception):
    """A backend that cannot run here; str() is the reason printed after "skipped:"."""


# ------------------------------------------------------------------------------------------------ data
def load_texts(which: str, n: int) -> list[str]:
    """n texts (cycled when the source has fewer): MedQuAD test questions or SciFact documents."""
    if which == "short":
        path = DATA / "medquad" / "test" / "queries.jsonl"
        texts = [json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip()]
    elif which == "abstracts":
        from embedkit.data.beir import load_beir

        texts = load_beir(DATA / "scifact", "test").document_texts()
    else:
        raise ValueError(f"unknown text set {which!r}; choose from {', '.join(TEXT_SETS)}")
    return [texts[i % len(texts)] for i in range(n)]


def calibration_folder(workdir: Path, limit: int = CALIBRATION_TEXTS) -> Path:
    """A `datasets` folder (train.jsonl, column "sentence") of `limit` distinct SICK train sentences: short general
    English sentences, like ST's default calibration set (GLUE SST-2, on the hub), and neither of the measured sets."""
    source = DATA / "sts" / "sick" / "train.jsonl"
    sentences: list[str] = []
    for line in source.open(encoding="utf-8"):
        if line.strip():
            sentence = json.loads(line)["sentence1"]
            if sentence not in sentences:
                sentences.append(sentence)
        if len(sentences) >= limit:
            break
    folder = workdir / "st-calibration"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps({"sentence": s}) + "\n" for s in sentences),
                                        encoding="utf-8")
    return folder


def quality_task(docs: int = 0):
    """(SciFact test as embedkit loads it, doc ids, query ids); docs > 0 keeps the judged documents plus `docs`
    others (a smoke run's cut corpus)."""
    from embedkit.data.beir import load_beir

    data = load_beir(DATA / "scifact", "test")
    query_ids = data.judged_query_ids()
    doc_ids = list(data.corpus)
    if docs > 0:
        judged = {d for q in query_ids for d in data.qrels[q]}
        others = [d for d in doc_ids if d not in judged][:docs]
        keep = judged | set(others)
        doc_ids = [d for d in doc_ids if d in keep]
    return data, doc_ids, query_ids


def ndcg_at_10(data, doc_ids: list[str], query_ids: list[str], doc_vectors, query_vectors) -> float:
    """nDCG@10 from a backend's vectors, by embedkit's exact search and metric code (the same for every backend)."""
    import numpy as np

    from embedkit.eval.metrics import retrieval_metrics
    from embedkit.eval.runner import DEFAULT_TOP_K, exact_search

    run = exact_search(np.ascontiguousarray(query_vectors, dtype=np.float32),
                       np.ascontiguousarray(doc_vectors, dtype=np.float32), query_ids, doc_ids, DEFAULT_TOP_K)
    return retrieval_metrics({q: data.qrels[q] for q in query_ids}, run).metrics["ndcg_at_10"]


# ------------------------------------------------------------------------------------------------ backends
class TextSet:
    """Texts written once to a JSON file, so a worker reads them from disk rather than from every request."""

    def __init__(self, name: str, texts: list[str], workdir: Path):
        self.name, self.texts = name, texts
        self.path = workdir / f"texts-{name}.json"
        self.path.write_text(json.dumps(texts), encoding="utf-8")


class InProcess:
    """An embedkit backend in the driver's process: encode(texts, kind, batch_size) -> vectors."""

    def __init__(self, name: str, encode: Callable, info: dict[str, Any]):
        self.name, self._encode, self.info = name, encode, info

    def time_pass(self, texts: TextSet, batch_size: int) -> float:
        started = time.perf_counter()
        self._encode(texts.texts, "document", batch_size)
        return time.perf_counter() - started

    def encode(self, texts: list[str], kind: str, batch_size: int):
        return self._encode(texts, kind, batch_size)

    def close(self) -> None:
        pass


class Worker:
    """An ST backend in its own process (bench/st_backend_worker.py), spoken to in JSON lines."""

    def __init__(self, name: str, python: str, worker_backend: str, model_dir: str, workdir: Path, threads: int,
                 calibration: Path | None = None, worker: Path = WORKER):
        self.name, self.workdir, self.info = name, workdir, {}
        self.log = workdir / f"{name}.log"
        self._n = 0
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the worker never sees embedkit
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   HF_DATASETS_CACHE=str(workdir / "hf-datasets"), TOKENIZERS_PARALLELISM="false")
        cmd = [python, str(worker), "--backend", worker_backend, "--model", model_dir, "--workdir", str(workdir),
               "--threads", str(threads)]
        if calibration is not None:
            cmd += ["--calibration", str(calibration)]
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env=env, cwd=workdir)

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise Unavailable(f"worker exited with code {self.proc.returncode}: {self.log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise Unavailable(f"worker: {reply['error']}")
        return reply

    def log_tail(self, lines: int = 3) -> str:
        try:
            tail = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()][-lines:]
        except OSError:
            tail = []
        return " | ".join(x.strip()[:200] for x in tail) or "no output"

    def wait_ready(self) -> dict[str, Any]:
        self.info = self._read()["info"]
        return self.info

    def request(self, **req) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise Unavailable(f"worker gone ({exc}): {self.log_tail()}") from None
        return self._read()

    def time_pass(self, texts: TextSet, batch_size: int) -> float:
        return float(self.request(cmd="time", texts_file=str(texts.path), batch_size=batch_size)["seconds"])

    def encode(self, texts: list[str], kind: str, batch_size: int):
        import numpy as np

        self._n += 1
        path, out = self.workdir / f"{self.name}-in-{self._n}.json", self.workdir / f"{self.name}-out-{self._n}.npy"
        path.write_text(json.dumps(texts), encoding="utf-8")
        self.request(cmd="encode", texts_file=str(path), batch_size=batch_size, out=str(out))
        vectors = np.load(out)
        path.unlink()
        out.unlink()
        return vectors

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request(cmd="quit")
            except (Unavailable, ValueError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def embedkit_backend(name: str, model_dir: str, workdir: Path, threads: int) -> InProcess:
    if name == "embedkit-torch":
        import torch

        from embedkit.models import load_model

        encoder = load_model(model_dir).eval()
        got = torch.get_num_threads()
        info = {"threads_check": f"torch.get_num_threads() = {got}", "threads_ok": got == threads}
        return InProcess(name, lambda texts, kind, bs: encoder.encode(texts, kind=kind, batch_size=bs), info)
    if name in ("embedkit-onnx", "embedkit-onnx-int8"):
        from embedkit.export.onnx import OnnxEncoder, export_onnx

        folder = workdir / "embedkit-onnx"
        if not folder.is_dir():
            export_onnx(model_dir, folder, quantize="int8")
        variant = "int8" if name.endswith("int8") else "fp32"
        encoder = OnnxEncoder(folder, variant=variant, threads=threads)
        got = encoder.session.get_session_options().intra_op_num_threads
        info = {"threads_check": f"onnxruntime intra_op_num_threads = {got}", "threads_ok": got == threads,
                "variant": variant}
        return InProcess(name, lambda texts, kind, bs: encoder.encode(texts, kind, bs), info)
    if name in OPENVINO_PRECISIONS:
        from embedkit.export.openvino import OpenVinoEncoder, describe_runtime, export_openvino

        precision = OPENVINO_PRECISIONS[name]
        folder = workdir / name
        manifest = export_openvino(model_dir, folder, quantize="int8", threads=threads, precision=precision)
        print(describe_runtime(manifest["cpu"]), flush=True)
        encoder = OpenVinoEncoder(folder, threads=threads)  # the precision the folder recorded
        described = encoder.describe()
        info = {"threads_check": f"OpenVINO INFERENCE_NUM_THREADS = {described['threads']}",
                "threads_ok": described["threads"] == threads,
                "inference_precision": described["inference_precision"]}
        return InProcess(name, lambda texts, kind, bs: encoder.encode(texts, kind, bs), info)
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS + OPTIONAL_BACKENDS)}")


def start_backends(names: list[str], model_dir: str, workdir: Path, threads: int, st_venv: Path
                   ) -> dict[str, object]:
    """{backend: InProcess | Worker, or the reason it is skipped (a string)}. The workers are started first and
    export while the driver builds embedkit's backends."""
    import torch

    torch.set_num_threads(threads)
    found: dict[str, object] = {}
    workers: dict[str, Worker] = {}
    peer_python = st_venv / "bin" / "python"
    calibration = None
    for name in names:
        if name not in ST_WORKERS:
            continue
        worker_backend, interpreter = ST_WORKERS[name]
        python = sys.executable if interpreter == "own" else str(peer_python)
        if interpreter == "peer" and not peer_python.exists():
            found[name] = f"skipped: no peer venv at {st_venv} ({ST_VENV_HINT})"
            continue
        try:
            if name == "st-openvino-qint8" and calibration is None:
                calibration = calibration_folder(workdir)
            folder = workdir / name
            folder.mkdir(exist_ok=True)
            workers[name] = Worker(name, python, worker_backend, model_dir, folder, threads,
                                   calibration if name == "st-openvino-qint8" else None)
        except Exception as exc:
            found[name] = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    for name in names:
        if name in ST_WORKERS:
            continue
        try:
            found[name] = embedkit_backend(name, model_dir, workdir, threads)
        except Exception as exc:  # a backend that cannot run here is reported, not fatal
            found[name] = f"skipped: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    for name, worker in workers.items():
        try:
            worker.wait_ready()
            found[name] = worker
        except Unavailable as exc:
            worker.close()
            found[name] = f"skipped: {exc}"
    return {name: found[name] for name in names}


# ------------------------------------------------------------------------------------------------ measure
def round_robin(backends: dict[str, Any], sets: list[TextSet], batch_size: int, repeats: int,
                skipped: dict[str, str], settle_s: float = SETTLE_S) -> dict[str, dict[str, list[float]]]:
    """{set: {backend: [seconds per round]}}: every round runs one pass of each backend over each set, the starting
    backend rotating per round. A backend that fails is dropped from all sets and its reason put in `skipped`."""
    times: dict[str, dict[str, list[float]]] = {s.name: {name: [] for name in backends} for s in sets}
    order = list(backends)
    for r in range(repeats if order else 0):
        start = r % len(order)
        for name in order[start:] + order[:start]:
            if name in skipped:
                continue
            for texts in sets:
                time.sleep(settle_s)
                try:
                    times[texts.name][name].append(backends[name].time_pass(texts, batch_size))
                except Exception as exc:
                    skipped[name] = f"skipped: failed while timed: {type(exc).__name__}: {exc}"
                    break
    return {s: {name: t for name, t in per.items() if name not in skipped} for s, per in times.items()}


def speeds(times: dict[str, dict[str, list[float]]], n: int) -> dict[str, dict[str, float]]:
    """texts/s of the median pass, per set and backend."""
    return {s: {name: n / statistics.median(t) for name, t in per.items() if t} for s, per in times.items()}


def ratios(speed: dict[str, float], reference: str = REFERENCE) -> dict[str, float | None]:
    ref = speed.get(reference)
    return {name: (value / ref if ref else None) for name, value in speed.items()}


def batch_vs_alone(backend, texts: list[str], batch_size: int) -> float:
    """Max abs difference between each text's vector alone and inside batches of 8 and `batch_size`: the export's own
    check (embedkit.models.probes.batch_invariance), so the column means what an export folder's manifest records."""
    from embedkit.models.probes import batch_invariance

    return batch_invariance(lambda t: backend.encode(list(t), "document", len(t)), texts,
                            batch_sizes=sorted({8, batch_size}))


def verdict(speed_by_set: dict[str, dict[str, float]], quality: dict[str, dict[str, float]] | None = None, *,
            target: float = TARGET_SPEEDUP, max_drop: float = MAX_NDCG_DROP, atol: float = 1e-4
            ) -> dict[str, dict[str, Any]]:
    """Per text set: embedkit's fastest backend against ST's fastest that ran, x speedup and whether it meets
    `target`; with `quality` ({backend: {"ndcg_at_10", "batch_vs_alone"}}), whether that embedkit backend's nDCG@10
    is within `max_drop` of fp32 (st-torch's, else embedkit-torch's) and its vectors batch-independent (<= atol)."""
    out: dict[str, dict[str, Any]] = {}
    for name, speed in speed_by_set.items():
        ek = {b: v for b, v in speed.items() if b.startswith("embedkit-")}
        st = {b: v for b, v in speed.items() if b.startswith("st-")}
        if not ek or not st:
            out[name] = {"met": None, "reason": "no embedkit backend ran" if not ek else "no ST backend ran"}
            continue
        best_ek, best_st = max(ek, key=ek.get), max(st, key=st.get)
        row: dict[str, Any] = {"embedkit": best_ek, "embedkit_texts_per_s": ek[best_ek], "st": best_st,
                               "st_texts_per_s": st[best_st], "speedup": ek[best_ek] / st[best_st], "target": target}
        row["speed_met"] = row["speedup"] >= target
        met = row["speed_met"]
        if quality is not None:
            fp32 = next((b for b in ("st-torch", "embedkit-torch") if quality.get(b, {}).get("ndcg_at_10") is not None),
                        None)
            mine = quality.get(best_ek, {})
            if fp32 is None or mine.get("ndcg_at_10") is None:
                row["quality_met"] = None
            else:
                row["fp32"] = fp32
                row["ndcg_drop"] = quality[fp32]["ndcg_at_10"] - mine["ndcg_at_10"]
                row["batch_vs_alone"] = mine.get("batch_vs_alone")
                row["quality_met"] = (row["ndcg_drop"] <= max_drop and row["batch_vs_alone"] is not None
                                      and row["batch_vs_alone"] <= atol)
            met = met and bool(row["quality_met"])
        row["met"] = met
        out[name] = row
    return out


def verdict_lines(verdicts: dict[str, dict[str, Any]], max_drop: float = MAX_NDCG_DROP) -> list[str]:
    lines = []
    for name, v in verdicts.items():
        if v.get("met") is None and "speedup" not in v:
            lines.append(f"verdict {name}: not decided ({v['reason']})")
            continue
        line = (f"verdict {name}: embedkit's fastest {v['embedkit']} {v['embedkit_texts_per_s']:.1f} texts/s vs ST's "
                f"fastest {v['st']} {v['st_texts_per_s']:.1f} texts/s: x{v['speedup']:.2f} (target x{v['target']:.2f}: "
                f"{'met' if v['speed_met'] else 'NOT met'})")
        if "ndcg_drop" in v:
            line += (f"; nDCG@10 {-v['ndcg_drop']:+.4f} vs {v['fp32']} (within {max_drop}: "
                     f"{'met' if v['ndcg_drop'] <= max_drop else 'NOT met'}), batch-vs-alone "
                     f"{v['batch_vs_alone']:.1e}")
        elif v.get("quality_met") is None and "quality_met" in v:
            line += "; quality not measured for it"
        lines.append(line)
    return lines


def table(names: list[str], skipped: dict[str, str], speed_by_set: dict[str, dict[str, float]],
          quality: dict[str, dict[str, float]] | None) -> list[str]:
    sets = list(speed_by_set)
    head = f"{'backend':<24}" + "".join(f"{s + ' texts/s':>18}{'x st-torch':>11}" for s in sets)
    fp32 = (quality or {}).get(REFERENCE, {}).get("ndcg_at_10")
    if quality is not None:
        head += f"{'nDCG@10':>9}{'vs fp32':>9}{'batch-vs-alone':>16}"
    lines = [head]
    for name in names:
        if name in skipped:
            lines.append(f"{name:<24}{skipped[name]}")
            continue
        row = f"{name:<24}"
        for s in sets:
            value = speed_by_set[s].get(name)
            ratio = ratios(speed_by_set[s]).get(name)
            row += f"{value:>18.1f}" if value else f"{'-':>18}"
            row += f"{'x%.2f' % ratio:>11}" if ratio else f"{'-':>11}"
        if quality is not None:
            q = quality.get(name, {})
            nd, diff = q.get("ndcg_at_10"), q.get("batch_vs_alone")
            row += f"{nd:>9.4f}" if nd is not None else f"{'-':>9}"
            row += f"{nd - fp32:>+9.4f}" if nd is not None and fp32 is not None else f"{'-':>9}"
            row += f"{diff:>16.1e}" if diff is not None else f"{'-':>16}"
        lines.append(row)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", default=",".join(TEXT_SETS), help="short, abstracts or both (comma-separated)")
    parser.add_argument("--n", type=int, default=512, help="texts per set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--quality", action="store_true", help="nDCG@10 on SciFact test and batch-vs-alone")
    parser.add_argument("--quality-docs", type=int, default=0,
                        help="keep the judged SciFact abstracts + N others (smoke runs; 0 = the whole corpus)")
    parser.add_argument("--st-venv", type=Path, default=ST_VENV)
    parser.add_argument("--json", type=Path, help="write the values here too")
    parser.add_argument("--record", type=Path, help="write a record (bench/record.py) here")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(BENCH))
    from cpuinfo import describe, int8_instructions

    from embedkit.export.openvino import cpu_instructions
    from embedkit.models.probes import BATCH_INVARIANCE_ATOL
    from embedkit.models.registry import minilm_path

    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    set_names = [s.strip() for s in args.texts.split(",") if s.strip()]
    cpu_before = int8_instructions()
    print(describe(cpu_before), flush=True)
    print(f"instructions (int8 / bf16): {' '.join(cpu_instructions()['instructions'])}", flush=True)
    started = time.perf_counter()
    quality: dict[str, dict[str, float]] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-cpu-backends-") as work:
        workdir = Path(work)
        sets = [TextSet(s, load_texts(s, args.n), workdir) for s in set_names]
        warm = [TextSet(f"warm-{s.name}", s.texts[: 2 * args.batch_size], workdir) for s in sets]
        found = start_backends(names, str(minilm_path()), workdir, args.threads, args.st_venv)
        skipped = {name: b for name, b in found.items() if isinstance(b, str)}
        backends = {name: b for name, b in found.items() if not isinstance(b, str)}
        try:
            print(f"\nbackends ready after {time.perf_counter() - started:.0f} s:")
            for name in names:
                b = found[name]
                if isinstance(b, str):
                    print(f"  {name:<24} {b}")
                else:
                    keys = ("threads_check", "quantization", "inference_precision", "variant", "export_s")
                    extra = ", ".join(f"{k} {b.info[k]}" for k in keys if b.info.get(k) is not None)
                    vers = b.info.get("versions", {})
                    if vers:
                        extra += f", ST {vers.get('sentence-transformers')} / transformers {vers.get('transformers')}"
                    flag = "" if b.info.get("threads_ok", True) else "  (THREADS NOT AS ASKED)"
                    print(f"  {name:<24} {extra}{flag}")
            for name in list(backends):  # warm-up: first-call compilation and allocation are not timed
                try:
                    for w in warm:
                        backends[name].time_pass(w, args.batch_size)
                except Exception as exc:
                    skipped[name] = f"skipped: failed in warm-up: {type(exc).__name__}: {exc}"
            times = round_robin(backends, sets, args.batch_size, args.repeats, skipped)
            speed = speeds(times, args.n)
            if args.quality:
                quality = {}
                data, doc_ids, query_ids = quality_task(args.quality_docs)
                doc_texts = data.document_texts(doc_ids)
                query_texts = [data.queries[q] for q in query_ids]
                probe = load_texts("short", BATCH_PROBE_TEXTS) + load_texts("abstracts", BATCH_PROBE_TEXTS)
                print(f"\nquality: SciFact test, {len(query_ids)} queries over {len(doc_ids)} documents"
                      f"{' (cut corpus: not comparable with published figures)' if args.quality_docs else ''}",
                      flush=True)
                for name, b in backends.items():
                    if name in skipped:
                        continue
                    t0 = time.perf_counter()
                    try:
                        docs = b.encode(doc_texts, "document", args.batch_size)
                        queries = b.encode(query_texts, "query", args.batch_size)
                        quality[name] = {"ndcg_at_10": ndcg_at_10(data, doc_ids, query_ids, docs, queries),
                                         "batch_vs_alone": batch_vs_alone(b, probe, args.batch_size)}
                    except Exception as exc:
                        quality[name] = {"error": f"{type(exc).__name__}: {exc}"}
                    q = quality[name]
                    shown = q["error"] if "error" in q else (f"nDCG@10 {q['ndcg_at_10']:.4f}, batch-vs-alone "
                                                             f"{q['batch_vs_alone']:.1e}")
                    print(f"  {name:<24} {shown} ({time.perf_counter() - t0:.0f} s)", flush=True)
        finally:
            for b in backends.values():
                b.close()
    cpu_after = int8_instructions()
    print(f"\nbatch {args.batch_size}, {args.threads} threads, {args.n} texts per set, median of {args.repeats} "
          f"round-robin rounds; load average {cpu_before['load_avg_1m']:.2f} before, {cpu_after['load_avg_1m']:.2f} "
          f"after; {time.perf_counter() - started:.0f} s in all")
    for line in table(names, skipped, speed, quality):
        print("  " + line)
    verdicts = verdict(speed, quality, atol=BATCH_INVARIANCE_ATOL)
    for line in verdict_lines(verdicts):
        print(line)
    values = {"settings": {"texts": set_names, "n": args.n, "batch_size": args.batch_size, "threads": args.threads,
                           "repeats": args.repeats, "quality_docs": args.quality_docs, "settle_s": SETTLE_S},
              "cpu": cpu_before, "instructions": cpu_instructions(),
              "load_avg_1m": {"before": cpu_before["load_avg_1m"], "after": cpu_after["load_avg_1m"]},
              "backends": {}, "verdict": verdicts}
    for name in names:
        if name in skipped:
            values["backends"][name] = {"skipped": skipped[name]}
            continue
        entry: dict[str, Any] = {"info": found[name].info}
        for s in set_names:
            ratio = ratios(speed[s]).get(name)
            entry[s] = {"texts_per_s": speed[s].get(name), "ratio_to_st_torch": ratio, "seconds": times[s].get(name)}
        if quality is not None:
            entry["quality"] = quality.get(name)
        values["backends"][name] = entry
    if args.json:
        args.json.write_text(json.dumps(values, indent=2))
    if args.record:
        from record import write_record

        write_record(args.record, values, command="bench/bench_cpu_backends.py " + " ".join(sys.argv[1:]))
        print(f"record: {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
