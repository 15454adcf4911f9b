"""Benchmark: embedkit's trainer against sentence-transformers' SentenceTransformerTrainer + MNRL.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    .venv/bin/python bench/bench_train.py --datasets scifact,medquad --json /tmp/bench_train.json

Same model (all-MiniLM-L6-v2), data, batch size (32), lr (2e-5), epochs (1), max length (256), seed (42), warmup
(0.1), weight decay (0.01), gradient clipping (1.0) and threads (2) on both sides; embedkit runs its default recipe
(recipes/minilm-<dataset>.yaml), whose notable difference is attention dropout 0 (see embedkit/train/trainer.py).
- scifact: the 919 SciFact train pairs (qrels/train.tsv) -> nDCG@10 on SciFact test;
- medquad: a seeded 1,000-pair sample of medquad/train_pairs.jsonl (the recipe's sample; both sides train on the
  same pairs) -> nDCG@10 on medquad/test.
Each trainer runs in its own subprocess (ST first, then embedkit; side by side with --parallel), so peak RSS
is per trainer: ru_maxrss of the child read at its last training step (each child then evaluates its model;
the whole child's ru_maxrss from wait4 is printed too). Train samples/s = samples / wall time of the training call (ST:
`trainer.train()`; embedkit: `train()` up to its last step, i.e. including its data loading and tokenization).
Because wall time depends on whatever else the machine runs, samples per CPU-second of the child is printed too.
Both trained models are evaluated by the same code (embedkit.eval) in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASETS = {
    "scifact": {"recipe": "recipes/minilm-scifact.yaml", "test": "beir:{data}/scifact:test"},
    "medquad": {"recipe": "recipes/minilm-medquad.yaml", "test": "beir:{data}/medquad/test:test"},
}
SHARED = {"batch_size": 32, "lr": 2e-5, "epochs": 1, "max_length": 256, "seed": 42, "warmup_ratio": 0.1,
          "weight_decay": 0.01, "max_grad_norm": 1.0, "threads": 2}


def _recipe(dataset: str, data_root: str, output: Path):
    from embedkit.train.config import load_recipe

    raw_train = {"scifact": f"beir:{data_root}/scifact:train",
                 "medquad": f"{data_root}/medquad/train_pairs.jsonl"}[dataset]
    s = SHARED
    overrides = [f"data.train={raw_train}", "data.dev=null", f"training.output_dir={output}",
                 "training.progress=false", f"training.batch_size={s['batch_size']}", f"training.lr={s['lr']}",
                 f"training.epochs={s['epochs']}", f"model.max_length={s['max_length']}",
                 f"training.seed={s['seed']}", f"training.warmup_ratio={s['warmup_ratio']}",
                 f"training.weight_decay={s['weight_decay']}", f"training.max_grad_norm={s['max_grad_norm']}",
                 f"training.threads={s['threads']}"]
    if os.environ.get("BENCH_MAX_STEPS"):  # smoke test of the benchmark itself
        overrides.append(f"training.max_steps={os.environ['BENCH_MAX_STEPS']}")
    return load_recipe(REPO / DATASETS[dataset]["recipe"], overrides)


# ---------------------------------------------------------------------------------------------------- children
def child_embedkit(dataset: str, data_root: str, output: Path) -> dict:
    from embedkit.train.contrastive import train

    recipe = _recipe(dataset, data_root, output)
    marks = {}
    started, cpu0 = time.perf_counter(), time.process_time()

    def on_step(step, record):
        marks["end"], marks["cpu"] = time.perf_counter(), time.process_time()

    def on_step_rss(step, record):
        on_step(step, record)
        marks["rss"] = _self_peak_rss_gb()

    result = train(recipe, on_step=on_step_rss)
    return {"samples": result.samples, "steps": result.steps, "train_s": marks["end"] - started,
            "cpu_s": marks["cpu"] - cpu0, "steps_only_s": result.train_seconds, "final_loss": result.final_loss,
            "train_peak_rss_gb": marks["rss"]}


def child_st(dataset: str, data_root: str, output: Path) -> dict:
    import torch

    torch.set_num_threads(SHARED["threads"])
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)

    from embedkit.models.registry import minilm_path
    from embedkit.train.contrastive import load_examples

    examples, _ = load_examples(_recipe(dataset, data_root, output))  # the very same pairs as embedkit
    model = SentenceTransformer(str(minilm_path()), device="cpu")
    model.max_seq_length = SHARED["max_length"]
    data = Dataset.from_dict({"anchor": [e.query for e in examples], "positive": [e.positive for e in examples]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output) + ".st-work", num_train_epochs=SHARED["epochs"],
        per_device_train_batch_size=SHARED["batch_size"], learning_rate=SHARED["lr"], seed=SHARED["seed"],
        warmup_ratio=SHARED["warmup_ratio"], weight_decay=SHARED["weight_decay"],
        max_grad_norm=SHARED["max_grad_norm"], use_cpu=True, report_to=[], save_strategy="no", logging_steps=10,
        disable_tqdm=True, max_steps=int(os.environ.get("BENCH_MAX_STEPS", -1)))
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                         loss=losses.MultipleNegativesRankingLoss(model))
    started, cpu0 = time.perf_counter(), time.process_time()
    out = trainer.train()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    rss = _self_peak_rss_gb()
    model.save(str(output))
    samples = min(len(examples), out.global_step * SHARED["batch_size"])
    return {"samples": samples, "steps": out.global_step, "train_s": wall, "cpu_s": cpu,
            "final_loss": out.training_loss, "train_peak_rss_gb": rss}


def _self_peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


# ---------------------------------------------------------------------------------------------------- parent
def start_child(kind: str, dataset: str, data_root: str, output: Path, task: str, cache: Path) -> subprocess.Popen:
    result_file = output.with_suffix(".result.json")
    cmd = [sys.executable, __file__, "--child", kind, "--datasets", dataset, "--data", data_root,
           "--output", str(output), "--result", str(result_file), "--task", task, "--out", str(cache)]
    return subprocess.Popen(cmd, cwd=REPO)


def wait_child(proc: subprocess.Popen, kind: str, dataset: str, output: Path) -> dict:
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} on {dataset} failed with exit code {proc.returncode}")
    result = json.loads(output.with_suffix(".result.json").read_text())
    result["peak_rss_gb"] = result["train_peak_rss_gb"]  # peak up to the end of training (eval follows in the child)
    result["child_peak_rss_gb"] = usage.ru_maxrss / 1e6  # the whole child, from wait4 (KiB on Linux)
    result["child_cpu_s"] = usage.ru_utime + usage.ru_stime
    result["samples_per_s"] = result["samples"] / result["train_s"]
    result["samples_per_cpu_s"] = result["samples"] / result["cpu_s"]
    return result


def evaluate_ndcg(model: str | Path, task: str, cache: Path) -> float:
    from embedkit.eval.runner import evaluate
    from embedkit.models.encoder import load_model

    encoder = load_model(model, max_length=SHARED["max_length"])
    report = evaluate(encoder, [task], batch_size=64, cache_dir=cache)
    (name,) = report["results"]
    return report["results"][name]["metrics"]["ndcg_at_10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="scifact,medquad")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default="/tmp/embedkit-bench-train", help="work folder (models, caches)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--no-base", action="store_true", help="skip evaluating the base model")
    parser.add_argument("--parallel", action="store_true",
                        help="run the two trainers side by side (on a busy machine both then see the same load; "
                             "compare samples per CPU-second)")
    parser.add_argument("--child", choices=["st", "embedkit"], help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        fn = child_st if args.child == "st" else child_embedkit
        result = fn(args.datasets, args.data, Path(args.output))
        Path(args.result).write_text(json.dumps(result))  # training numbers first, in case evaluation fails
        t0 = time.perf_counter()
        result["ndcg_at_10"] = evaluate_ndcg(Path(args.output), args.task, Path(args.out))
        result["eval_s"] = time.perf_counter() - t0
        Path(args.result).write_text(json.dumps(result))
        return

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"settings": SHARED, "datasets": {}}
    for dataset in args.datasets.split(","):
        task = DATASETS[dataset]["test"].format(data=args.data)
        row: dict = {"task": task, "parallel": args.parallel}
        if not args.no_base:
            row["base_ndcg_at_10"] = evaluate_ndcg("minilm", task, work / "cache")
            print(f"[{dataset}] base nDCG@10 {row['base_ndcg_at_10']:.4f}", flush=True)
        t0 = time.perf_counter()
        procs = {}
        for kind in ("st", "embedkit"):
            output = work / f"{dataset}-{kind}"
            procs[kind] = (start_child(kind, dataset, args.data, output, task, work / "cache"), output)
            if not args.parallel:
                row[kind] = wait_child(procs[kind][0], kind, dataset, output)
        for kind in ("st", "embedkit"):
            if args.parallel:
                row[kind] = wait_child(procs[kind][0], kind, dataset, procs[kind][1])
            r = row[kind]
            print(f"[{dataset}] {kind:8s} nDCG@10 {r['ndcg_at_10']:.4f}  {r['samples_per_s']:.3f} samples/s  "
                  f"{r['samples_per_cpu_s']:.3f} samples/CPU-s  peak RSS {r['peak_rss_gb']:.2f} GB "
                  f"(whole child {r['child_peak_rss_gb']:.2f})  train {r['train_s']:.0f} s, eval {r['eval_s']:.0f} s",
                  flush=True)
        print(f"[{dataset}] {time.perf_counter() - t0:.0f} s for both", flush=True)
        st, ek = row["st"], row["embedkit"]
        row["ratios"] = {"ndcg_delta": ek["ndcg_at_10"] - st["ndcg_at_10"],
                         "samples_per_s": ek["samples_per_s"] / st["samples_per_s"],
                         "samples_per_cpu_s": ek["samples_per_cpu_s"] / st["samples_per_cpu_s"],
                         "peak_rss": ek["peak_rss_gb"] / st["peak_rss_gb"]}
        q = row["ratios"]
        print(f"[{dataset}] embedkit vs ST: nDCG@10 {q['ndcg_delta']:+.4f}, speed x{q['samples_per_s']:.2f} "
              f"(per CPU-s x{q['samples_per_cpu_s']:.2f}), peak RSS x{q['peak_rss']:.2f}  "
              f"(targets: >= +0, >= 1.2, <= 0.7)", flush=True)
        results["datasets"][dataset] = row
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
