"""Latency of a one-text request while `embedkit serve` is loaded by a 2,048-text request and a 7 MB body.

    .venv/bin/python bench/bench_serve_fairness.py [--model minilm] [--backend torch|onnx] [--threads N]
        [--rounds 3] [--seconds 12] [--embedkit-path DIR] [--json out.json]

Each round starts the server in its own process (as in production) and sends it, at once:
  - a 2,048-text request: MedQuAD answers cut to 300 characters (~65 tokens each, ~130,000 tokens; generated
    sentences when ../shared/data is not there), which takes the model tens of seconds on 2 cores;
  - a 7 MB body: 2,048 texts of 3,450 characters, under the character limit but over the token limit, so it is
    tokenised (all of it) and then refused 400;
and, while the 2,048-text request is in flight, one-text requests one after another (and GET /health), for
--seconds. Prints the one-text and /health latency distributions (median, p90, max over all rounds) and the
machine's load average. `--embedkit-path DIR` serves another copy of the package (before/after comparisons:
`mkdir -p /tmp/ek_head && git archive HEAD embedkit | tar -x -C /tmp/ek_head`, then `--embedkit-path /tmp/ek_head`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "medquad" / "test" / "corpus.jsonl"


def big_texts(n: int = 2048, chars: int = 300) -> list[str]:
    texts: list[str] = []
    if CORPUS.is_file():
        with open(CORPUS, encoding="utf-8") as handle:
            texts = [json.loads(line)["text"][:chars] for line in handle if line.strip()]
    if not texts:
        texts = [f"what are the symptoms and treatments of condition number {i} in adults and children " * 3
                 for i in range(n)]
    return [texts[i % len(texts)] for i in range(n)]


def seven_mb_body() -> bytes:
    base = " ".join(big_texts(64, 2000))
    return json.dumps({"input": [(base[i * 13:] + base)[:3450] for i in range(2048)]}).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, log_path: Path):
    import httpx

    port = free_port()
    env = dict(os.environ)
    if args.embedkit_path:
        env["PYTHONPATH"] = os.pathsep.join([args.embedkit_path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, "-m", "embedkit.cli", "serve", "--model", args.model, "--backend", args.backend,
               "--port", str(port)] + (["--threads", str(args.threads)] if args.threads else [])
    log = open(log_path, "wb")
    # `python -m` puts the working folder first on sys.path: run where the package to serve is
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                               cwd=args.embedkit_path or REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit("the server did not start")


def one_round(args, log_path: Path) -> dict:
    import httpx

    process, url = start_server(args, log_path)
    outcome: dict = {"big": None, "body": None}

    def send(key: str, **kwargs) -> None:
        began = time.perf_counter()
        try:
            response = httpx.post(f"{url}/v1/embeddings", timeout=600, **kwargs)
            outcome[key] = (response.status_code, time.perf_counter() - began)
        except httpx.HTTPError as exc:
            outcome[key] = (type(exc).__name__, time.perf_counter() - began)

    body = seven_mb_body()
    threads = [threading.Thread(target=send, args=("big",), kwargs={"json": {"input": big_texts()}}, daemon=True),
               threading.Thread(target=send, args=("body",), daemon=True,
                                kwargs={"content": body, "headers": {"Content-Type": "application/json"}})]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # both bodies sent: the server is parsing, tokenising and embedding them
    latencies, health, both = [], [], 0
    began = time.monotonic()
    try:
        with httpx.Client(timeout=120) as client:
            while outcome["big"] is None and time.monotonic() - began < args.seconds:
                loaded = outcome["body"] is None
                started = time.perf_counter()
                response = client.post(f"{url}/v1/embeddings", json={"input": f"what causes fever {len(latencies)}"})
                latencies.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
                started = time.perf_counter()
                client.get(f"{url}/health")
                health.append(time.perf_counter() - started)
                both += loaded and outcome["body"] is None
                time.sleep(0.05)
    finally:
        process.kill()
        process.wait()
    return {"latencies": latencies, "health": health, "while_both_in_flight": both,
            "big_finished": outcome["big"], "body": outcome["body"], "body_bytes": len(body)}


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"n": len(ordered), "median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "max": ordered[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx", "auto"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=12.0, help="how long to probe in each round")
    parser.add_argument("--embedkit-path", default=None, help="serve the embedkit package found in this folder")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cpu = open("/proc/cpuinfo").read()
    flags = sorted({f for f in ("avx512_vnni", "avx_vnni", "avx512f") if f in cpu})
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            load = os.getloadavg()[0]
            result = one_round(args, Path(tmp) / f"serve-{i}.log")
            result["load_average"] = load
            rounds.append(result)
            print(f"round {i + 1}: one-text {summary(result['latencies'])}, /health max {max(result['health']):.3f}s, "
                  f"{result['while_both_in_flight']} while both loads were in flight, 7 MB body -> "
                  f"{result['body']}, load average {load:.1f}", flush=True)
    latencies = [x for r in rounds for x in r["latencies"]]
    health = [x for r in rounds for x in r["health"]]
    report = {"model": args.model, "backend": args.backend, "threads": args.threads, "cpu_flags": flags,
              "cores": os.cpu_count(), "embedkit_path": args.embedkit_path, "one_text": summary(latencies),
              "health": summary(health), "rounds": rounds}
    print(json.dumps({k: v for k, v in report.items() if k != "rounds"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
