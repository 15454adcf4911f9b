"""Serving throughput: in-process batched encode vs `embedkit serve` over HTTP, torch and ONNX int8.

    .venv/bin/python bench/bench_serve.py [--texts 2000] [--json out.json]

One run with MiniLM and N short texts (MedQuAD questions when ../shared/data is there, else generated sentences)
in requests of 32: in-process `encode` (torch, onnx int8), then the server (each backend in its own process, as in
production) at concurrency 1 and 8, and infinity-emb (the peer) serving the same MiniLM folder from its own venv
(it pins sentence-transformers<4 and numpy<2, so it cannot share embedkit's): create it once with

    python3 -m venv bench/.venv-infinity && bench/.venv-infinity/bin/pip install torch==2.13.0 \
        "infinity-emb[server,torch]==0.0.78"

and pass `--infinity-venv bench/.venv-infinity` (the default; without it the peer is reported as not run).
Prints texts/s (median of --repeats passes) and the ratios: server / in-process, embedkit / infinity, int8 / torch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "medquad" / "test" / "queries.jsonl"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpuinfo import describe, int8_instructions  # noqa: E402  (int8 speed depends on AVX2 / AVX-512 / VNNI)


def load_texts(n: int) -> list[str]:
    texts: list[str] = []
    if SHARED.is_file():
        with open(SHARED, encoding="utf-8") as handle:
            texts = [json.loads(line)["text"] for line in handle if line.strip()]
    if not texts:
        texts = [f"what are the symptoms of condition number {i} in adults" for i in range(n)]
    return [texts[i % len(texts)] for i in range(n)]


def in_process(encoder, texts: list[str], batch: int, repeats: int) -> float:
    """Median texts/s of `repeats` full passes (length-sorted batches, as `encode` does)."""
    encoder.encode(texts[:64], batch_size=batch)  # warm-up
    rates = []
    for _ in range(repeats):
        began = time.perf_counter()
        encoder.encode(texts, batch_size=batch)
        rates.append(len(texts) / (time.perf_counter() - began))
    return statistics.median(rates)


def drive_median(url: str, texts: list[str], batch: int, concurrency: int, repeats: int, **kwargs) -> tuple[float, int]:
    runs = [asyncio.run(drive(url, texts, batch, concurrency, **kwargs)) for _ in range(repeats)]
    return statistics.median(rate for rate, _ in runs), sum(errors for _, errors in runs)


async def drive(url: str, texts: list[str], batch: int, concurrency: int, *, route: str = "/v1/embeddings",
                model: str | None = None) -> tuple[float, int]:
    import httpx

    requests = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
        extra = {"model": model} if model else {}
        await client.post(route, json={"input": texts[:batch], **extra})  # warm-up
        queue: asyncio.Queue = asyncio.Queue()
        for r in requests:
            queue.put_nowait(r)

        async def worker():
            nonlocal errors
            while not queue.empty():
                chunk = queue.get_nowait()
                response = await client.post(route, json={"input": chunk, **extra})
                errors += response.status_code != 200

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(texts) / (time.perf_counter() - began), errors


def start_server(model: str, backend: str, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from embedkit.serve.cli import serve_command; import typer; "
                             "app = typer.Typer(); app.command()(serve_command); app()",
                             "--model", model, "--backend", backend, "--port", str(port), "--log-level", "warning"],
                            stderr=subprocess.DEVNULL, start_new_session=True)


def start_infinity(venv: Path, model_dir: str, port: int, batch: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    return subprocess.Popen([str(venv / "bin" / "infinity_emb"), "v2", "--model-id", model_dir, "--port", str(port),
                             "--engine", "torch", "--device", "cpu", "--batch-size", str(batch),
                             "--log-level", "warning"], env=env, stderr=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, start_new_session=True)


def wait_up(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--port", type=int, default=8431)
    parser.add_argument("--onnx-dir", type=Path, help="An existing minilm int8 export (else exported to a temp dir).")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repeats", type=int, default=3, help="passes per measurement; the median is reported")
    parser.add_argument("--infinity-venv", type=Path, default=REPO / "bench" / ".venv-infinity",
                        help="venv with infinity-emb installed (see the docstring)")
    args = parser.parse_args()

    from embedkit.export.onnx import OnnxEncoder, export_onnx
    from embedkit.models import load_model

    cpu = int8_instructions()
    print(describe(cpu), flush=True)
    texts = load_texts(args.texts)
    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
    onnx_dir = args.onnx_dir or Path(tmp.name) / "minilm_int8"
    if not (onnx_dir / "embedkit_onnx.json").is_file():
        print(f"exporting minilm to {onnx_dir} (int8) ...", file=sys.stderr)
        export_onnx("minilm", onnx_dir, quantize="int8", log=lambda m: print(m, file=sys.stderr))
    results: dict[str, float] = {}
    results["inprocess_torch"] = in_process(load_model("minilm"), texts, args.batch, args.repeats)
    results["inprocess_onnx_int8"] = in_process(OnnxEncoder(onnx_dir), texts, args.batch, args.repeats)
    print(f"in-process: torch {results['inprocess_torch']:.0f} texts/s, onnx int8 "
          f"{results['inprocess_onnx_int8']:.0f} texts/s", flush=True)
    for backend, model in (("onnx", str(onnx_dir)), ("torch", "minilm")):
        process = start_server(model, backend, args.port)
        url = f"http://127.0.0.1:{args.port}"
        try:
            wait_up(url, process)
            for concurrency in (1, 8):
                rate, errors = drive_median(url, texts, args.batch, concurrency, args.repeats)
                key = f"serve_{backend}_c{concurrency}"
                results[key] = rate
                base = results["inprocess_onnx_int8" if backend == "onnx" else "inprocess_torch"]
                print(f"serve {backend:<5} concurrency {concurrency}: {rate:.0f} texts/s "
                      f"({rate / base:.2f}x in-process), errors {errors}", flush=True)
        finally:
            process.terminate()
            process.wait(60)
    infinity_note = None
    if (args.infinity_venv / "bin" / "infinity_emb").is_file():
        from embedkit.models.registry import resolve_model_path

        process = start_infinity(args.infinity_venv, str(resolve_model_path("minilm")), args.port, args.batch)
        url = f"http://127.0.0.1:{args.port}"
        try:
            wait_up(url, process, timeout=600)
            for concurrency in (1, 8):
                rate, errors = drive_median(url, texts, args.batch, concurrency, args.repeats, route="/embeddings",
                                            model=str(resolve_model_path("minilm")))
                results[f"infinity_c{concurrency}"] = rate
                print(f"infinity-emb concurrency {concurrency}: {rate:.0f} texts/s, errors {errors}", flush=True)
        finally:
            os.killpg(process.pid, 15)
            process.wait(60)
    else:
        infinity_note = f"not run: no infinity-emb venv at {args.infinity_venv} (see the docstring)"
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    report = {"texts": len(texts), "batch": args.batch, "cpus": os.cpu_count(), "load_avg_1m": load, "cpu": cpu,
              "texts_per_second": results,
              "ratios": {"onnx_int8_vs_torch_inprocess": results["inprocess_onnx_int8"] / results["inprocess_torch"],
                         "serve_onnx_c8_vs_inprocess": results["serve_onnx_c8"] / results["inprocess_onnx_int8"],
                         "serve_torch_c8_vs_inprocess": results["serve_torch_c8"] / results["inprocess_torch"]},
              "infinity_emb": infinity_note or "run"}
    for c in (1, 8):
        if f"infinity_c{c}" in results:
            for backend in ("onnx", "torch"):
                report["ratios"][f"serve_{backend}_c{c}_vs_infinity"] = (results[f"serve_{backend}_c{c}"]
                                                                         / results[f"infinity_c{c}"])
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
