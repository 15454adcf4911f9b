"""Many LoRA adapters on one served base against one merged model: memory (RSS) and mixed-adapter throughput.

    .venv/bin/python bench/bench_serve_adapters.py [--adapters 8] [--texts 2000] [--rank 16] [--json out.json] \
        [--record bench/records/serve/adapters-minilm.json]

Issue #34's acceptance: 8 adapters on one served base within 1.5x the memory of one model, and a load spread over
the adapters within 0.8x the throughput of one merged model.

- The adapters are LoRA (r=--rank, all linear layers) on MiniLM with random weights, laid out as `embedkit train`
  writes them (adapter/, a manifest recording the base's fingerprint, probe vectors): speed and memory do not depend
  on what an adapter learned.
- Memory: two child processes, each loading what it serves and embedding one batch: base + N adapters
  (`load_adapters`, as `embedkit serve --adapter`) and one merged model; their resident set sizes (VmRSS, VmHWM).
  Importing peft is part of the first arm's cost; the second arm imports it after measuring and reports what that
  import alone adds (`peft_import`, MiB), so the adapters' own share can be read apart from the library's.
- Throughput: the apps in-process (BackgroundServer, both running) at concurrency 1 and 8, requests of --batch
  texts: base + N adapters with requests round-robin over the adapters, and the merged model alone, measured in
  turn within every repeat; texts/s, medians of --repeats.

Prints one JSON object (and writes it with --json, and as a record with --record), with the verdict against the
issue's two targets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_serve import load_texts  # noqa: E402
from cpuinfo import describe  # noqa: E402
from record import write_record  # noqa: E402

CONCURRENCIES = (1, 8)


def make_adapters(root: Path, n: int, rank: int) -> list[Path]:
    import torch

    from embedkit.manifest import MANIFEST_NAME, base_manifest
    from embedkit.models import load_model
    from embedkit.models.adapters import attach_lora
    from embedkit.models.probes import write_probes

    folders = []
    for i in range(n):
        encoder = load_model("minilm")
        base = {"name": "minilm", "fingerprint": encoder.fingerprint}
        attach_lora(encoder, r=rank, alpha=2 * rank)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in encoder.backbone.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        folder = root / f"a{i}"
        encoder.save_adapter(folder / "adapter")
        (folder / MANIFEST_NAME).write_text(json.dumps(base_manifest("adapter", base_model=base,
                                                                     adapter={"path": "adapter", "base": base})))
        write_probes(encoder.eval(), folder, created_by="bench")
        folders.append(folder)
    return folders


def rss() -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}  # MiB


def child(kind: str, folders: list[Path], merged: Path) -> None:
    """One served set of models in this process: its RSS after loading and one batch, as JSON on stdout."""
    from embedkit.serve.server import load_adapters, load_backends

    texts = load_texts(32)
    if kind == "adapters":
        backends = load_backends(["base=minilm"])
        hosts = load_adapters([f"a{i}={folder}" for i, folder in enumerate(folders)], backends)
        for name in hosts["base"].adapters:
            hosts["base"].adapters[name].encode(texts)
    else:
        load_backends([f"merged={merged}"])["merged"].encode(texts)
        before = rss()
        import peft  # noqa: F401 - what serving adapters costs before any adapter: the library itself
        print(json.dumps({**before, "peft_import": rss()["VmRSS"] - before["VmRSS"]}))
        return
    print(json.dumps(rss()))


async def drive(url: str, texts: list[str], batch: int, concurrency: int, models: list[str]) -> float:
    import httpx

    requests = [(models[i % len(models)], texts[start : start + batch])
                for i, start in enumerate(range(0, len(texts), batch))]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
        for model in models:  # warm-up: every adapter once
            (await client.post("/v1/embeddings", json={"model": model, "input": texts[:batch]})).raise_for_status()
        queue: asyncio.Queue = asyncio.Queue()
        for request in requests:
            queue.put_nowait(request)

        async def worker():
            while not queue.empty():
                model, chunk = queue.get_nowait()
                (await client.post("/v1/embeddings", json={"model": model, "input": chunk})).raise_for_status()

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(texts) / (time.perf_counter() - began)


def throughput(apps: dict[str, tuple], texts: list[str], batch: int, repeats: int) -> dict[str, dict[str, float]]:
    """{arm: {"c1": texts/s, "c8": ...}}, medians of `repeats`; the arms' servers run side by side and every repeat
    measures each arm at each concurrency in turn, so that a change in the machine's speed during the run falls on
    both arms alike (measured one after the other, two runs of this bench gave ratios 0.83 / 0.74 and 0.75 / 0.78)."""
    from embedkit.serve.server import BackgroundServer

    runs: dict[str, dict[str, list[float]]] = {arm: {f"c{c}": [] for c in CONCURRENCIES} for arm in apps}
    with contextlib.ExitStack() as running:
        urls = {arm: running.enter_context(BackgroundServer(app)).url for arm, (app, _) in apps.items()}
        for _ in range(repeats):
            for c in CONCURRENCIES:
                for arm, (_, models) in apps.items():
                    runs[arm][f"c{c}"].append(asyncio.run(drive(urls[arm], texts, batch, c, models)))
    return {arm: {c: statistics.median(values) for c, values in by_c.items()} for arm, by_c in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--record", type=Path, help="write a record (bench/record.py) here")
    parser.add_argument("--child", choices=["adapters", "merged"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folders = sorted((p for p in args.root.iterdir() if p.name.startswith("a")), key=lambda p: int(p.name[1:]))
        return child(args.child, folders, args.root / "merged")

    from embedkit.models import load_model
    from embedkit.models.adapters import merge_adapter
    from embedkit.serve.app import create_app
    from embedkit.serve.server import load_adapters, load_backends

    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        root = Path(tmp)
        folders = make_adapters(root, args.adapters, args.rank)
        merge_adapter(load_model("minilm", adapter=folders[0] / "adapter")).save(root / "merged")
        memory = {}
        for kind in ("adapters", "merged"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--root", str(root)], check=True,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            memory[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        texts = load_texts(args.texts)
        backends = load_backends(["base=minilm"])
        hosts = load_adapters([f"a{i}={folder}" for i, folder in enumerate(folders)], backends)
        speeds = throughput({"mixed_adapters": (create_app(backends, adapter_hosts=hosts),
                                                [f"a{i}" for i in range(args.adapters)]),
                             "merged": (create_app(load_backends([f"merged={root / 'merged'}"])), ["merged"])},
                            texts, args.batch, args.repeats)
        mixed, merged = speeds["mixed_adapters"], speeds["merged"]
    result = {
        "cpu": describe(), "adapters": args.adapters, "rank": args.rank, "texts": args.texts, "batch": args.batch,
        "rss_mib": memory, "rss_ratio": memory["adapters"]["VmRSS"] / memory["merged"]["VmRSS"],
        "texts_per_s": {"mixed_adapters": mixed, "merged": merged},
        "throughput_ratio": {c: mixed[c] / merged[c] for c in mixed},
    }
    # Issue #34's targets: RSS of N adapters on one base <= 1.5x one merged model; mixed-adapter throughput >= 0.8x.
    result["verdict"] = {"memory_within_1.5x": result["rss_ratio"] <= 1.5,
                         "throughput_within_0.8x": all(r >= 0.8 for r in result["throughput_ratio"].values())}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.record:
        write_record(args.record, result, command=" ".join(["bench/bench_serve_adapters.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
