"""Does a cross-encoder started from an embedding model learn, and with which learning rates? A short, cheap check
of the start (not the two-stage benchmark: bench/bench_rerank.py is that), on training data only.

    .venv/bin/python bench/bench_rerank_start.py --seeds 42,43 --record bench/records/rerank/scifact-start.json

The rows are bench/bench_rerank.py's (SciFact's training queries, 7 negatives each mined from MiniLM's top 100;
reused from its --out folder when there). They are split by query, seeded: 85% train the reranker, the other 15%
(held-out training queries, never the test split) measure it: for each held-out row the reranker orders its positive
and its 7 negatives, and the bench reports how often the positive comes first (chance: 1 in 8) and the mean
reciprocal rank. This measures whether the reranker learns, not whether it beats the first stage: MiniLM ranks the
positive first in every row by construction (the margin removed candidates scoring within 5% of the positive), and
the two-stage test is bench_rerank.py's. Each arm is `embedkit train` with `task: rerank` from all-MiniLM-L6-v2 (a
new one-logit head), the listwise loss, batches of 16 rows (128 pairs) at `--max-length` 128 tokens (half of
bench_rerank's, to keep a run to minutes on 2 cores), `--steps` optimizer steps with bench_rerank's warm-up (0.1),
linear decay, weight decay 0.01 and clipping 1.0:
  encoder-lr  every weight at 2e-5 (bench_rerank's setting until 2026-12-07: it did not learn);
  head-lr     2e-5, and the weights the start never trained at training.head_lr 1e-3: the classifier and, for an
              embedding-model start, BERT's pooler (the embedding model's training never ran it);
  lr-1e-4     every weight at 1e-4.
The listwise loss starts at ln 8 = 2.079; the first and last five steps' mean losses are reported per run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench_rerank sets the offline environment and puts the repository on sys.path when imported
from bench_rerank import REPO, SETTINGS, THREADS, mine_rows  # noqa: E402

ARMS = {"encoder-lr": {"lr": 2e-5}, "head-lr": {"lr": 2e-5, "head_lr": 1e-3}, "lr-1e-4": {"lr": 1e-4}}
HELD_OUT = 0.15


def split_rows(rows: Path, out: Path) -> tuple[Path, list[dict]]:
    """The rows split by query (seed 0): the training file and the held-out rows."""
    table = [json.loads(line) for line in rows.read_text().splitlines() if line.strip()]
    queries = sorted({r["query"] for r in table})
    held = set(random.Random(0).sample(queries, round(HELD_OUT * len(queries))))
    train = out / "start-train-rows.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in table if r["query"] not in held))
    return train, [r for r in table if r["query"] in held]


def child(arm: str, rows: Path, output: Path, seed: int, steps: int, max_length: int) -> dict:
    from embedkit.train.config import parse_recipe
    from embedkit.train.rerank import train_reranker

    s = SETTINGS
    recipe = parse_recipe({
        "task": "rerank",
        "model": {"name": "minilm", "max_length": max_length, "attention_dropout": s["attention_dropout"]},
        "data": {"train": str(rows)}, "loss": {"type": "listwise", "hard_negatives": s["negatives"]},
        "training": {"output_dir": str(output), "max_steps": steps, "batch_size": s["batch_size"],
                     "warmup_ratio": s["warmup_ratio"], "weight_decay": s["weight_decay"],
                     "max_grad_norm": s["max_grad_norm"], "seed": seed, "threads": THREADS, "progress": False,
                     "log_every": 1, "report_to": [], **ARMS[arm]}})
    result = train_reranker(recipe)
    losses = [e["loss"] for e in map(json.loads, (output / "train_log.jsonl").read_text().splitlines())
              if e.get("event") == "train"]
    return {"steps": result.steps, "train_s": round(result.train_seconds, 1), "losses": [round(x, 4) for x in losses]}


def held_out_ranks(model: Path, held: list[dict]) -> list[int]:
    """Per held-out row, the positive's rank (0 = first) among it and its negatives (ties count against it)."""
    import torch

    from embedkit.models.reranker import load_reranker

    torch.set_num_threads(THREADS)
    reranker = load_reranker(model)
    ranks = []
    for row in held:
        docs = [row["positive"]] + row["negatives"]
        scores = reranker.score([row["query"]] * len(docs), docs, logits=True)
        ranks.append(int(sum(s >= scores[0] for s in scores[1:])))
    return ranks


def summarize(ranks: list[int]) -> dict:
    return {"first": sum(r == 0 for r in ranks) / len(ranks), "mrr": statistics.fmean(1 / (r + 1) for r in ranks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default="runs/bench-rerank", help="bench_rerank's folder: its rows are reused")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--resume", action="store_true", help="reuse finished runs in --out")
    parser.add_argument("--record")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child, Path(args.rows), Path(args.output), args.seed, args.steps, args.max_length)
        Path(args.output).with_suffix(".result.json").write_text(json.dumps(result))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, info = mine_rows("scifact", args.data, "minilm", out, SETTINGS["negatives"], None)
    train, held = split_rows(rows, out)
    print(f"{info['rows_kept']} rows: {len(held)} held out, the rest train", flush=True)
    runs: dict[str, dict[str, dict]] = {}
    for arm in args.arms.split(","):
        for seed in map(int, args.seeds.split(",")):
            output = out / f"start-{arm}-len{args.max_length}-steps{args.steps}-s{seed}"
            result_path = output.with_suffix(".result.json")
            if not (args.resume and result_path.is_file() and "ranks" in json.loads(result_path.read_text())):
                subprocess.run([sys.executable, __file__, "--child", arm, "--rows", str(train), "--output",
                                str(output), "--seed", str(seed), "--steps", str(args.steps), "--max-length",
                                str(args.max_length)], check=True)
                result = json.loads(result_path.read_text())
                result["ranks"] = held_out_ranks(output, held)
                result_path.write_text(json.dumps(result))
            result = json.loads(result_path.read_text())
            ranks, losses = result["ranks"], result["losses"]
            result.update(**summarize(ranks), loss_first5=statistics.fmean(losses[:5]),
                          loss_last5=statistics.fmean(losses[-5:]))
            runs.setdefault(arm, {})[str(seed)] = result
            print(f"{arm:>10} seed {seed}: loss {result['loss_first5']:.4f} -> {result['loss_last5']:.4f}; held-out "
                  f"positive first {result['first']:.3f}, MRR {result['mrr']:.3f} ({result['train_s']:.0f} s)",
                  flush=True)
    if args.record:
        from record import write_record

        summary = {arm: {key: statistics.fmean(r[key] for r in per_seed.values())
                         for key in ("first", "mrr", "loss_first5", "loss_last5")} for arm, per_seed in runs.items()}
        write_record(args.record, {"rows": info["rows_kept"], "held_out_rows": len(held), "steps": args.steps,
                                   "max_length": args.max_length, "arms": {a: ARMS[a] for a in runs},
                                   "settings": SETTINGS, "runs": runs, "mean_over_seeds": summary},
                     command=" ".join(sys.argv))


if __name__ == "__main__":
    main()
