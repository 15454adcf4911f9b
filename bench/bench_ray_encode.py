"""Issue #33 item 1: corpus encoding on Ray Data vs one process, on the SciFact corpus with MiniLM.

    .venv/bin/python bench/bench_ray_encode.py [--docs N] [--workers 2] [--shard-size 1024] [--record]

One process encodes the corpus (`Encoder.encode`, batch 32, all threads); then embedkit.models.ray_encode encodes
it on a local Ray with --workers model actors (the cores shared between them), and the actor that gets shard 3 is
killed once (its process exits; Ray restarts it and retries the shard). Then two shards are deleted, as an
interrupted run leaves them, and the same call encodes only those. Printed and recorded: max |diff| against the
one-process vectors after each run, rows bit-equal, ids in order, the shards each run encoded, the wall times.
--record writes bench/records/ray/scifact-encode.json. Timings count only on a quiet machine (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_record  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCIFACT = REPO.parent / "shared" / "data" / "scifact"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SCIFACT)
    parser.add_argument("--docs", type=int, default=0, help="First N documents (0: all).")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)

    import ray
    import torch

    from embedkit.data.beir import mteb_document_text, read_corpus
    from embedkit.models import load_model
    from embedkit.models import ray_encode

    corpus = read_corpus(args.data / "corpus.jsonl")
    ids = list(corpus)[: args.docs or None]
    texts = [mteb_document_text(corpus[i].get("title", ""), corpus[i]["text"]) for i in ids]
    encoder = load_model("minilm", device="cpu")
    started = time.perf_counter()
    reference = encoder.encode(texts, kind="document", batch_size=32, normalize=True)
    single_s = time.perf_counter() - started
    print(f"one process ({torch.get_num_threads()} threads): {len(texts)} texts in {single_s:.1f} s", flush=True)

    settings = ray_encode.RaySettings(workers=args.workers, shard_size=args.shard_size)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    folder, marker = work / "shards", work / "killed"
    values: dict = {"documents": len(texts), "workers": args.workers, "shard_size": args.shard_size,
                    "single_process_s": round(single_s, 1)}
    try:
        started = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        values["ray_init_s"] = round(time.perf_counter() - started, 1)
        os.environ[ray_encode.CRASH_ENV] = f"3:{marker}"
        started = time.perf_counter()
        first = ray_encode.encode_to_shards(encoder, ids, texts, folder, kind="document", batch_size=32,
                                            settings=settings)
        values["ray_s"] = round(time.perf_counter() - started, 1)
        del os.environ[ray_encode.CRASH_ENV]
        shards = ray_encode.VectorShards(folder)
        vectors = shards.to_array()
        values.update(worker_killed=marker.exists(), shards=first.shards, encoded_first=first.encoded,
                      ids_in_order=shards.ids == ids,
                      max_abs_diff=float(np.abs(vectors - reference).max()),
                      rows_bit_equal=int((vectors == reference).all(axis=1).sum()))
        for k in (1, 4):
            ray_encode.shard_paths(folder, k)[0].unlink()
        started = time.perf_counter()
        again = ray_encode.encode_to_shards(encoder, ids, texts, folder, kind="document", batch_size=32,
                                            settings=settings)
        values["resume_s"] = round(time.perf_counter() - started, 1)
        values.update(encoded_on_resume=again.encoded, max_abs_diff_after_resume=float(
            np.abs(ray_encode.VectorShards(folder).to_array() - reference).max()))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(values, indent=2))
    if args.record:
        write_record(REPO / "bench" / "records" / "ray" / "scifact-encode.json", values,
                     command=" ".join(["bench/bench_ray_encode.py", *(argv if argv is not None else sys.argv[1:])]))
    ok = values["max_abs_diff"] <= 1e-6 and values["max_abs_diff_after_resume"] <= 1e-6 and values["ids_in_order"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
