"""Serving throughput against matched peers: `embedkit serve` vs infinity-emb, torch vs torch, ONNX vs ONNX.

    .venv/bin/python bench/bench_serve.py [--texts 2000] [--repeats 3] [--json out.json]

One run with MiniLM (the same model folder for every server) and N short texts (MedQuAD questions when
../shared/data is there, else generated sentences), sent in requests of --batch (32) at concurrency 1 and 8:

- in-process `encode`: torch fp32, ONNX fp32, ONNX int8, OpenVINO int8 (the limit each server is measured
  against; OpenVINO both as bulk encoding runs it, on the throughput streams, and on one stream as the server
  compiles it: the server's ratio is to the one-stream figure);
- `embedkit serve`, each backend in its own process, as in production: torch fp32, ONNX fp32, ONNX int8, OpenVINO
  int8 (`embedkit export --format openvino --quantize int8`);
- infinity-emb (the peer), from its own venv, on the same MiniLM folder: `--engine torch` (fp32) and
  `--engine optimum` (onnxruntime fp32, on an ONNX graph exported by optimum's own exporter), each started once per
  `--batch-size` in --infinity-batch-sizes (8, 32, 128); all values are printed and kept in the JSON, and the best
  per concurrency is the one compared.

Ratios are printed only for like-for-like pairs: each server against its own in-process backend, embedkit torch
server / infinity torch (best batch size), embedkit ONNX fp32 server / infinity optimum (best batch size). embedkit's
int8 figures are printed on their own line, labelled int8, and never divided by an fp32 peer. Before timing, every
server embeds 8 of the texts and its vectors are compared with embedkit's in-process torch vectors (max abs diff,
printed and in the JSON): a peer that pools or normalises differently shows up there.

infinity-emb pins sentence-transformers<4 and numpy<2, so it cannot share embedkit's venv: create one with

    python3 -m venv bench/.venv-infinity && bench/.venv-infinity/bin/pip install torch==2.13.0 \
        "infinity-emb[server,torch,optimum]==0.0.78"

(torch 2.13.0 comes as a CPU build from local disk here; elsewhere add `--index-url
https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple`). The `optimum` extra brings
optimum 2.x + optimum-onnx + onnxruntime; without it the optimum engine is reported as "not run: <reason>" and its
ratio is absent; without the venv (--infinity-venv, default bench/.venv-infinity) the whole peer is "not run".
With optimum 2.x: infinity's torch engine runs plain sentence-transformers (optimum 2 has no BetterTransformer, the
same as without optimum), and infinity's start-up call to onnxruntime's transformer optimizer fails (an argument
optimum 2 dropped), so it serves the graph as exported ("onnx_optimizer" in the JSON; onnxruntime still applies its
own graph optimisations when the session starts, as it does for embedkit's graph). Each infinity server runs in its
model folder with `--model-id .` (see `infinity_command`).

`--peer-env NAME=VALUE` sets variables for infinity only (e.g. OMP_WAIT_POLICY=PASSIVE, which `embedkit serve` sets
for itself); they are recorded in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
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

from cpuinfo import describe, int8_instructions  # noqa: E402  (int8 speed depends on AVX2 / AVX-512 / VNNI)
from record import write_record  # noqa: E402

CONCURRENCIES = (1, 8)
CHECK_TEXTS = 8  # texts each server embeds before timing, compared with in-process torch
PEER_PACKAGES = ("infinity-emb", "torch", "sentence-transformers", "transformers", "optimum", "optimum-onnx",
                 "onnxruntime", "numpy")


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


def served_vectors(url: str, texts: list[str], *, route: str = "/v1/embeddings", model: str | None = None):
    """The server's vectors for `texts` (one request), as float32 [n, dim]."""
    import httpx
    import numpy as np

    body = {"input": texts, **({"model": model} if model else {})}
    response = httpx.post(url + route, json=body, timeout=300)
    response.raise_for_status()
    data = sorted(response.json()["data"], key=lambda item: item["index"])
    return np.asarray([item["embedding"] for item in data], dtype=np.float32)


def start_server(model: str, backend: str, port: int, log: Path | None = None) -> subprocess.Popen:
    stderr = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-c", "from embedkit.serve.cli import serve_command; import typer; "
                             "app = typer.Typer(); app.command()(serve_command); app()",
                             "--model", model, "--backend", backend, "--port", str(port), "--log-level", "warning"],
                            stderr=stderr, start_new_session=True)


SERVED_NAME = "minilm"


def infinity_command(venv: Path, port: int, engine: str, batch: int) -> list[str]:
    """infinity's v2 command, to run in the model folder: infinity 0.0.78 hands optimum 2.x the ONNX file's path as
    it globbed it, which optimum accepts only relative to the model id (an absolute folder fails with "Could not find
    any ONNX files with target file name /abs/model.onnx, only found: [model.onnx]"), so the model id is "."."""
    command = [str(venv / "bin" / "infinity_emb"), "v2", "--model-id", ".", "--served-model-name", SERVED_NAME,
               "--port", str(port), "--engine", engine, "--device", "cpu", "--dtype", "float32",
               "--batch-size", str(batch), "--log-level", "warning"]
    if engine == "optimum":
        # the optimum embedder pools CLS unless told (its "auto" means CLS); MiniLM is mean-pooled. The graph is
        # fp32 (no *quantize*.onnx in the folder).
        command += ["--pooling-method", "mean", "--onnx-do-not-prefer-quantized"]
    return command


def start_infinity(command: list[str], model_dir: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as handle:
        return subprocess.Popen(command, cwd=model_dir, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group; SIGKILL it after 60 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def last_line(log: Path | None) -> str:
    if not log or not log.is_file():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def wait_up(url: str, process: subprocess.Popen, timeout: float = 300, log: Path | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}" + (f": {last_line(log)}" if log else ""))
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server did not start within {timeout:.0f} s" + (f": {last_line(log)}" if log else ""))


def peer_versions(venv: Path) -> dict[str, str | None]:
    script = ("import importlib.metadata as m, json\nout = {}\nfor name in %r:\n    try: out[name] = m.version(name)\n"
              "    except m.PackageNotFoundError: out[name] = None\nprint(json.dumps(out))" % (PEER_PACKAGES,))
    result = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, timeout=120)
    return json.loads(result.stdout) if result.returncode == 0 else {}


def optimum_export(venv: Path, model_dir: Path, output: Path, env: dict[str, str], log: Path) -> str | None:
    """MiniLM as optimum exports it for ORTModelForFeatureExtraction (last_hidden_state; infinity pools and
    normalises). Returns None, or why the optimum engine cannot run."""
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "from optimum.onnxruntime import "
                            "ORTModelForFeatureExtraction, ORTOptimizer"], capture_output=True, text=True, env=env)
    if check.returncode != 0:
        lines = [line for line in check.stderr.splitlines() if line.strip()]
        return f"optimum.onnxruntime does not import in {venv}: {lines[-1] if lines else check.returncode}"
    cli = venv / "bin" / "optimum-cli"
    if not cli.is_file():
        return f"no optimum-cli in {venv}"
    with open(log, "ab") as handle:
        done = subprocess.run([str(cli), "export", "onnx", "--model", str(model_dir), "--task", "feature-extraction",
                               "--library-name", "transformers", str(output)], env=env, stdout=handle,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0 or not (output / "model.onnx").is_file():
        return f"optimum-cli export onnx failed ({done.returncode}): {last_line(log)}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32, help="texts per request (every server)")
    parser.add_argument("--port", type=int, default=8431)
    parser.add_argument("--onnx-dir", type=Path, help="An existing minilm int8 export (else exported to a temp dir).")
    parser.add_argument("--onnx-fp32-dir", type=Path,
                        help="An existing minilm fp32 export, no --quantize (else exported to a temp dir).")
    parser.add_argument("--openvino-dir", type=Path,
                        help="An existing minilm OpenVINO int8 export (else exported to a temp dir).")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--record", type=Path, help="write a record (bench/record.py) here")
    parser.add_argument("--repeats", type=int, default=3, help="passes per measurement; the median is reported")
    parser.add_argument("--infinity-venv", type=Path, default=REPO / "bench" / ".venv-infinity",
                        help="venv with infinity-emb installed (see the docstring)")
    parser.add_argument("--infinity-batch-sizes", default="8,32,128",
                        help="infinity's --batch-size values, one server start each (comma-separated)")
    parser.add_argument("--infinity-engines", default="torch,optimum", help="comma-separated: torch, optimum")
    parser.add_argument("--peer-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the infinity processes only (repeatable)")
    args = parser.parse_args()
    sweep = [int(value) for value in args.infinity_batch_sizes.split(",") if value.strip()]
    engines = [value.strip() for value in args.infinity_engines.split(",") if value.strip()]
    peer_env = dict(item.split("=", 1) for item in args.peer_env)

    import numpy as np

    from embedkit.export.onnx import OnnxEncoder, export_onnx
    from embedkit.export.openvino import OpenVinoEncoder, export_openvino
    from embedkit.models import load_model
    from embedkit.models.registry import resolve_model_path

    cpu = int8_instructions()
    print(describe(cpu), flush=True)
    texts = load_texts(args.texts)
    check_texts = list(dict.fromkeys(texts))[:CHECK_TEXTS]
    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
    work = Path(tmp.name)
    model_dir = resolve_model_path("minilm")
    onnx_dirs = {"fp32": args.onnx_fp32_dir or work / "minilm_fp32", "int8": args.onnx_dir or work / "minilm_int8"}
    for variant, folder in onnx_dirs.items():
        if not (folder / "embedkit_onnx.json").is_file():
            print(f"exporting minilm to {folder} ({variant}) ...", file=sys.stderr)
            from embedkit.logs import configure_logging

            configure_logging("export")
            export_onnx("minilm", folder, quantize="int8" if variant == "int8" else None)
        served = json.loads((folder / "embedkit_onnx.json").read_text())["default_variant"]
        if served != variant:
            raise SystemExit(f"{folder} serves its {served} graph, not {variant}: pass an export made "
                             f"{'with' if variant == 'int8' else 'without'} --quantize int8")

    openvino_dir = args.openvino_dir or work / "minilm_openvino_int8"
    if not (openvino_dir / "embedkit_openvino.json").is_file():
        print(f"exporting minilm to {openvino_dir} (OpenVINO int8) ...", file=sys.stderr)
        export_openvino("minilm", openvino_dir, quantize="int8")

    results: dict[str, float] = {}
    errors: dict[str, int] = {}
    vector_diff: dict[str, float] = {}
    ratios: dict[str, float] = {}
    torch_encoder = load_model("minilm")
    reference = np.asarray(torch_encoder.encode(check_texts), dtype=np.float32)
    inprocess = {"torch": torch_encoder, "onnx_fp32": OnnxEncoder(onnx_dirs["fp32"]),
                 "onnx_int8": OnnxEncoder(onnx_dirs["int8"]), "openvino_int8_streams": OpenVinoEncoder(openvino_dir),
                 "openvino_int8": OpenVinoEncoder(openvino_dir, streams=1)}  # the server's one stream
    for name, encoder in inprocess.items():
        results[f"inprocess_{name}"] = in_process(encoder, texts, args.batch, args.repeats)
    names = list(inprocess)
    del inprocess, torch_encoder
    print("in-process: " + ", ".join(f"{name.replace('_', ' ')} {results[f'inprocess_{name}']:.0f}"
                                     for name in names) + " texts/s", flush=True)

    url = f"http://127.0.0.1:{args.port}"
    for name, backend, model in (("torch", "torch", "minilm"), ("onnx_fp32", "onnx", str(onnx_dirs["fp32"])),
                                 ("onnx_int8", "onnx", str(onnx_dirs["int8"])),
                                 ("openvino_int8", "openvino", str(openvino_dir))):
        log = work / f"serve_{name}.log"
        process = start_server(model, backend, args.port, log)
        try:
            wait_up(url, process, log=log)
            vector_diff[f"serve_{name}"] = float(np.abs(served_vectors(url, check_texts) - reference).max())
            for concurrency in CONCURRENCIES:
                key = f"serve_{name}_c{concurrency}"
                results[key], errors[key] = drive_median(url, texts, args.batch, concurrency, args.repeats)
                ratios[f"{key}_vs_inprocess"] = results[key] / results[f"inprocess_{name}"]
                print(f"embedkit serve {name.replace('_', ' '):<9} concurrency {concurrency}: {results[key]:.0f} "
                      f"texts/s ({ratios[f'{key}_vs_inprocess']:.2f}x in-process {name.replace('_', ' ')}), "
                      f"errors {errors[key]}", flush=True)
        finally:
            stop(process)

    infinity: dict = {"venv": str(args.infinity_venv), "batch_sizes": sweep, "peer_env": peer_env, "engines": {}}
    if not (args.infinity_venv / "bin" / "infinity_emb").is_file():
        infinity["status"] = f"not run: no infinity-emb venv at {args.infinity_venv} (see the docstring)"
        print(f"infinity-emb: {infinity['status']}", flush=True)
    else:
        infinity["status"] = "run"
        infinity["versions"] = peer_versions(args.infinity_venv)
        infinity["version"] = infinity["versions"].get("infinity-emb")
        print("infinity-emb " + ", ".join(f"{k} {v}" for k, v in infinity["versions"].items() if v), flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
               "DO_NOT_TRACK": "1", "HF_HOME": str(work / "hf_home"), **peer_env}
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        for engine in engines:
            entry: dict = {"runs": {}}
            infinity["engines"][engine] = entry
            engine_model = str(model_dir)
            if engine == "optimum":
                onnx_out = work / "minilm_optimum"
                why = optimum_export(args.infinity_venv, model_dir, onnx_out, env, work / "optimum_export.log")
                if why:
                    entry["status"] = f"not run: {why}"
                    print(f"infinity-emb optimum: {entry['status']}", flush=True)
                    continue
                engine_model = str(onnx_out)
            entry["model"] = engine_model
            for batch_size in sweep:
                command = infinity_command(args.infinity_venv, args.port, engine, batch_size)
                log = work / f"infinity_{engine}_bs{batch_size}.log"
                run: dict = {"command": f"cd {engine_model} && " + " ".join(command)}
                entry["runs"][str(batch_size)] = run
                process = start_infinity(command, engine_model, env, log)
                try:
                    wait_up(url, process, timeout=600, log=log)
                    if engine == "optimum" and "Optimization failed" in log.read_text(errors="replace"):
                        # infinity 0.0.78's optimizer call (OptimizationConfig(optimize_with_onnxruntime_only=...))
                        # does not fit optimum 2.x; it then serves the graph as exported (onnxruntime still applies
                        # its own graph optimisations when the session starts, as for embedkit's graph)
                        run["onnx_optimizer"] = "failed at start-up (logged 'Optimization failed'): unoptimized graph"
                    run["max_abs_diff_vs_embedkit_torch"] = float(np.abs(
                        served_vectors(url, check_texts, route="/embeddings", model=SERVED_NAME) - reference).max())
                    for concurrency in CONCURRENCIES:
                        rate, errs = drive_median(url, texts, args.batch, concurrency, args.repeats,
                                                  route="/embeddings", model=SERVED_NAME)
                        run[f"c{concurrency}"], run[f"errors_c{concurrency}"] = rate, errs
                        print(f"infinity-emb {engine:<7} batch-size {batch_size:>3} concurrency {concurrency}: "
                              f"{rate:.0f} texts/s, errors {errs}", flush=True)
                except (SystemExit, Exception) as exc:  # one failed start is reported, the sweep goes on
                    run["status"] = f"not run: {exc}"
                    print(f"infinity-emb {engine} batch-size {batch_size}: {run['status']}", flush=True)
                finally:
                    stop(process)
            if any("onnx_optimizer" in run for run in entry["runs"].values()):
                print(f"infinity-emb {engine}: its onnxruntime optimizer step failed at start-up; it served the "
                      "graph as exported", flush=True)
            done = {bs: run for bs, run in entry["runs"].items() if "status" not in run}
            if not done:
                entry["status"] = "not run: " + "; ".join(f"batch-size {bs}: {run['status'].removeprefix('not run: ')}"
                                                          for bs, run in entry["runs"].items())
                continue
            entry["status"] = "run"
            entry["max_abs_diff_vs_embedkit_torch"] = max(run["max_abs_diff_vs_embedkit_torch"]
                                                          for run in done.values())
            entry["best"] = {}
            for concurrency in CONCURRENCIES:
                best = max(done, key=lambda bs: done[bs][f"c{concurrency}"])
                entry["best"][f"c{concurrency}"] = {"batch_size": int(best),
                                                    "texts_per_second": done[best][f"c{concurrency}"]}
                results[f"infinity_{engine}_c{concurrency}"] = done[best][f"c{concurrency}"]

    # like-for-like ratios only: embedkit torch fp32 vs infinity torch, embedkit ONNX fp32 vs infinity optimum
    print(f"vectors, max abs diff to in-process torch on {len(check_texts)} texts: "
          + ", ".join(f"{k.replace('serve_', 'embedkit ')} {v:.1e}" for k, v in vector_diff.items())
          + "".join(f", infinity {e} {entry['max_abs_diff_vs_embedkit_torch']:.1e}"
                    for e, entry in infinity["engines"].items() if entry.get("status") == "run"), flush=True)
    for ours, peer, label in (("torch", "torch", "embedkit torch fp32 / infinity torch fp32"),
                              ("onnx_fp32", "optimum", "embedkit ONNX fp32 / infinity optimum (ONNX fp32)")):
        entry = infinity["engines"].get(peer)
        if not entry or entry.get("status") != "run":
            why = (entry or {}).get("status") or infinity["status"]
            if why == "run":
                why = "not run: engine not selected (--infinity-engines)"
            print(f"{label}: {why}", flush=True)
            continue
        parts = []
        for concurrency in CONCURRENCIES:
            key = f"serve_{ours}_c{concurrency}_vs_infinity_{peer}_c{concurrency}"
            ratios[key] = results[f"serve_{ours}_c{concurrency}"] / results[f"infinity_{peer}_c{concurrency}"]
            best = entry["best"][f"c{concurrency}"]["batch_size"]
            parts.append(f"concurrency {concurrency}: x{ratios[key]:.2f} ({results[f'serve_{ours}_c{concurrency}']:.0f}"
                         f" / {results[f'infinity_{peer}_c{concurrency}']:.0f}, infinity batch-size {best})")
        print(f"{label}: " + "; ".join(parts), flush=True)
    print("embedkit ONNX int8 (no int8 peer, not compared): in-process "
          f"{results['inprocess_onnx_int8']:.0f} texts/s, server "
          + " / ".join(f"{results[f'serve_onnx_int8_c{c}']:.0f}" for c in CONCURRENCIES)
          + " texts/s at concurrency " + " / ".join(str(c) for c in CONCURRENCIES), flush=True)
    print("embedkit OpenVINO int8 (no int8 peer, not compared): in-process "
          f"{results['inprocess_openvino_int8']:.0f} texts/s on one stream "
          f"({results['inprocess_openvino_int8_streams']:.0f} on the throughput streams), server "
          + " / ".join(f"{results[f'serve_openvino_int8_c{c}']:.0f}" for c in CONCURRENCIES)
          + " texts/s at concurrency " + " / ".join(str(c) for c in CONCURRENCIES), flush=True)

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    report = {"texts": len(texts), "batch": args.batch, "repeats": args.repeats, "concurrencies": list(CONCURRENCIES),
              "model": str(model_dir), "cpus": os.cpu_count(), "load_avg_1m": load, "cpu": cpu,
              "texts_per_second": results, "errors": errors, "ratios": ratios,
              "vectors_max_abs_diff_vs_inprocess_torch": vector_diff, "infinity_emb": infinity}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.record:
        write_record(args.record, report, command=" ".join(["bench/bench_serve.py", *sys.argv[1:]]))
    tmp.cleanup()


if __name__ == "__main__":
    main()
