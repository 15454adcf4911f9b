"""Benchmark: the second stage. An embedkit-trained cross-encoder reranking a bi-encoder's top 100, against the
bi-encoder alone and against the same cross-encoder trained with sentence-transformers' CrossEncoderTrainer.

    .venv/bin/python bench/bench_rerank.py --datasets scifact --seeds 42,43,44 --out runs/bench-rerank \
        --record bench/records/rerank/scifact.json
    BENCH_SMOKE=1 .venv/bin/python bench/bench_rerank.py --datasets scifact --seeds 1   # a check of the script

Per data set (2 threads):
1. rows: the training queries of recipes/minilm-<dataset>.yaml's data (SciFact's train qrels, MedQuAD's seeded
   1,000-pair sample; `--train-queries N` keeps a seeded N of them: the few-label case), each with `--negatives`
   (default 7) hard negatives mined once by embedkit's miner from the first stage's (`--first-stage`, default
   minilm) ranking: window 0:100 (what the reranker will reorder), relative margin 0.05 to the positive, random
   sampling, the seed 42. Rows short of negatives are dropped, so both arms train on the very same n-tuples.
2. per seed, in a child process each (peak memory and state of one run only), the same start (MiniLM's encoder with
   a new one-logit head), the same rows, epochs (`--epochs`, 1), batch (16 rows = 128 pairs), lr 1e-4, warmup 0.1,
   weight decay 0.01, gradient clipping 1.0, fp32, max length 256, attention dropout 0 and hidden dropout 0.1:
   - embedkit: `embedkit train` with `task: rerank`, loss listwise (softmax cross-entropy over the positive and its
     negatives);
   - st: `CrossEncoder` + `CrossEncoderTrainer` with its MultipleNegativesRankingLoss set to the same loss (no
     in-batch negatives, no sigmoid, scale 1: softmax cross-entropy over the row's positive and hard negatives);
     its default random batch sampler (embedkit draws a seeded random order too);
   - embedkit-head (not in the default --arms): embedkit with the new head at its own lr (HEAD_LR, training.head_lr).
3. evaluation on the *test* split by embedkit's evaluation runner (what `embedkit eval --rerank` runs): the first
   stage alone, and its top 100 (`--rerank-top`) reranked by each model; nDCG@10 mean +- sd over the seeds; verdicts are
   `embedkit compare` on the per-query nDCG@10 averaged over the seeds (difference, 95% interval,
   p(improvement), the default gate at a 0.01 margin): embedkit vs first stage, embedkit vs st.
   Speed: rows per second of each trainer's training loop (embedkit: the engine's step time; ST: the trainer's
   train_runtime) and the ratio; reranking cost in ms per query (top 100, 2 threads) from the evaluation's timings.

Measured duration on 2 cores (AMD EPYC, AVX-512 VNNI) with nothing else running: SciFact (824 rows, 300 test
queries): per seed and arm ~20 min of training (52 steps of 128 pairs at 256 tokens) and ~21 min of reranking
30,000 pairs, so 3 seeds x 2 arms is ~4 hours; MedQuAD (1,498 test queries) about five times the reranking. At
2e-5 (the setting until 2026-12-07) the reranker did not learn (bench/records/rerank/scifact-1epoch-partial.json);
at 1e-4 it does on held-out training queries (bench/bench_rerank_start.py), so both arms now train at 1e-4. Models
are named with their lr (`<ds>-<arm>-lr<lr>-s<seed>`), so `--resume` never reuses a run of another lr; it reuses
every trained model and evaluation in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

DATASETS = {
    "scifact": {"recipe": "recipes/minilm-scifact.yaml", "train": "beir:{data}/scifact:train",
                "test": "beir:{data}/scifact:test"},
    "medquad": {"recipe": "recipes/minilm-medquad.yaml", "train": "{data}/medquad/train_pairs.jsonl",
                "test": "beir:{data}/medquad/test:test"},
}
SMOKE = os.environ.get("BENCH_SMOKE") == "1"
THREADS = 2
# lr 1e-4 for both arms: the start's head and the BERT pooler it reads through are untrained (see
# recipes/minilm-rerank-scifact.yaml); chosen on held-out *training* queries (bench/records/rerank/scifact-start.json).
SETTINGS = {"epochs": 1, "batch_size": 16, "lr": 1e-4, "warmup_ratio": 0.1, "weight_decay": 0.01,
            "max_grad_norm": 1.0, "max_length": 256, "attention_dropout": 0.0, "negatives": 7,
            "mining": {"range": "0:100", "relative_margin": 0.05, "sampling": "random", "seed": 42}}
# The embedkit-head arm: embedkit's trainer with the new one-logit head at its own lr (training.head_lr), all else as
# above. 1e-3 is the usual lr of a freshly initialised classification head over a pretrained encoder (50x an
# encoder's 2e-5), fixed before any run: not searched on this bench's test split.
HEAD_LR = 1e-3


def model_path(out: Path, name: str, arm: str, seed: int) -> Path:
    """A trained model's folder; its .result.json / .eval.json replace the suffix, so the lr is written 1e-04, never
    0.0001 (with_suffix would take ".0001-s42" for the suffix: every seed's files one name)."""
    return out / f"{name}-{arm}-lr{SETTINGS['lr']:.0e}-s{seed}"


# ---------------------------------------------------------------------------------------------------- rows
def mine_rows(dataset: str, data_root: str, first_stage: str, out: Path, negatives: int,
              train_queries: int | None) -> tuple[Path, dict]:
    """The n-tuples both arms train on: embedkit's miner over the first stage's ranking (the same function a
    `task: rerank` recipe mines with), rows with all their negatives only."""
    import torch

    from embedkit.models import load_model
    from embedkit.train.config import load_recipe
    from embedkit.train.rerank import mine_negatives
    from embedkit.train.trainset import load_examples

    path = out / f"{dataset}-rows.jsonl"
    info_path = path.with_suffix(".info.json")
    if path.is_file() and info_path.is_file():
        return path, json.loads(info_path.read_text())
    spec = DATASETS[dataset]
    m = SETTINGS["mining"]
    overrides = ["task=rerank", f"data.train={spec['train'].format(data=data_root)}", "data.dev=null",
                 f"rerank.first_stage={first_stage}", f"loss.hard_negatives={negatives}", "loss.type=listwise",
                 f"mining.range={m['range']}", f"mining.relative_margin={m['relative_margin']}",
                 f"mining.sampling={m['sampling']}", f"mining.seed={m['seed']}", "loss.temperature=0.05",
                 "loss.mask_false_negatives=true"]
    recipe = load_recipe(REPO / spec["recipe"], overrides)
    examples, source = load_examples(recipe)
    if train_queries:
        queries = sorted({e.query for e in examples})
        kept = set(random.Random(42).sample(queries, min(train_queries, len(queries))))
        examples = [e for e in examples if e.query in kept]
    if SMOKE:
        examples = examples[:40]
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    mined, record = mine_negatives(recipe, examples, load_model(first_stage))
    full = [e for e in mined if len(e.negatives) >= negatives]
    with open(path, "w", encoding="utf-8") as f:
        for e in full:
            f.write(json.dumps({"query": e.query, "positive": e.positive, "negatives": e.negatives[:negatives]}) + "\n")
    info = {"rows_in": len(examples), "rows_kept": len(full), "queries": len({e.query for e in full}),
            "mine_s": round(time.perf_counter() - started, 1), "first_stage": first_stage,
            "mining": {k: v for k, v in record.items() if k != "first_stage"}, "train_queries": train_queries}
    info_path.write_text(json.dumps(info, indent=1))
    print(f"[{dataset}] mined {len(full)} rows of {len(examples)} with {negatives} negatives ({info['mine_s']} s)",
          flush=True)
    return path, info


# ---------------------------------------------------------------------------------------------------- children
def child_embedkit(rows: Path, output: Path, seed: int, head_lr: float | None = None) -> dict:
    from embedkit.train.config import parse_recipe
    from embedkit.train.rerank import train_reranker

    s = SETTINGS
    recipe = parse_recipe({
        "task": "rerank",
        "model": {"name": "minilm", "max_length": s["max_length"], "attention_dropout": s["attention_dropout"]},
        "data": {"train": str(rows)}, "loss": {"type": "listwise", "hard_negatives": s["negatives"]},
        "training": {"output_dir": str(output), "epochs": s["epochs"], "batch_size": s["batch_size"], "lr": s["lr"],
                     "warmup_ratio": s["warmup_ratio"], "weight_decay": s["weight_decay"],
                     "max_grad_norm": s["max_grad_norm"], "seed": seed, "threads": THREADS, "progress": False,
                     "report_to": [], **({"max_steps": 2} if SMOKE else {}),
                     **({"head_lr": head_lr} if head_lr is not None else {})}})
    started = time.perf_counter()
    result = train_reranker(recipe)
    return {"steps": result.steps, "rows": result.samples, "train_s": result.train_seconds,
            "call_s": time.perf_counter() - started, "rows_per_s": result.samples / max(result.train_seconds, 1e-9)}


def child_st(rows: Path, output: Path, seed: int) -> dict:
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (CrossEncoder, CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments, losses)

    from embedkit.models.registry import minilm_path

    torch.set_num_threads(THREADS)
    s = SETTINGS
    table = [json.loads(line) for line in rows.read_text().splitlines()]
    columns = {"query": [r["query"] for r in table], "positive": [r["positive"] for r in table]}
    for j in range(s["negatives"]):
        columns[f"negative_{j + 1}"] = [r["negatives"][j] for r in table]
    torch.manual_seed(seed)  # the new head, as embedkit seeds it before loading
    model = CrossEncoder(str(minilm_path()), num_labels=1, max_length=s["max_length"], device="cpu",
                         config_kwargs={"attention_probs_dropout_prob": s["attention_dropout"]})

    class HardNegativesOnly(losses.MultipleNegativesRankingLoss):
        """ST's loss with its in-batch negatives off: softmax cross-entropy over the row's positive and hard
        negatives, embedkit's listwise loss (num_negatives=0 would ask torch.multinomial for 0 samples)."""

        def get_in_batch_negatives(self, anchors, candidates):
            return iter(())

    loss = HardNegativesOnly(model, num_negatives=None, scale=1.0, activation_fn=None)
    args = CrossEncoderTrainingArguments(
        output_dir=str(output) + ".st-work", per_device_train_batch_size=s["batch_size"], learning_rate=s["lr"],
        num_train_epochs=s["epochs"], warmup_ratio=s["warmup_ratio"], weight_decay=s["weight_decay"],
        max_grad_norm=s["max_grad_norm"], seed=seed, data_seed=seed, use_cpu=True, report_to=[], save_strategy="no",
        disable_tqdm=True, lr_scheduler_type="linear", max_steps=2 if SMOKE else -1)
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=Dataset.from_dict(columns), loss=loss)
    started = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - started
    model.save(str(output))
    import shutil

    shutil.rmtree(str(output) + ".st-work", ignore_errors=True)
    runtime = out.metrics.get("train_runtime", wall)
    rows_seen = min(len(table), out.global_step * s["batch_size"]) if SMOKE else len(table) * s["epochs"]
    return {"steps": out.global_step, "rows": rows_seen, "train_s": runtime, "call_s": wall,
            "rows_per_s": rows_seen / max(runtime, 1e-9)}


def run_child(arm: str, rows: Path, output: Path, seed: int) -> dict:
    result = output.with_suffix(".result.json")
    cmd = [sys.executable, __file__, "--child", arm, "--rows", str(rows), "--output", str(output), "--seed",
           str(seed), "--result", str(result)]
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    run = json.loads(result.read_text())
    run["child_wall_s"] = time.perf_counter() - started
    result.write_text(json.dumps(run))
    return run


# ---------------------------------------------------------------------------------------------------- evaluation
def evaluate_once(first_stage: str, test: str, cache: Path, saved: Path, resume: bool,
                  reranker: Path | None = None, rerank_top: int = 100) -> dict:
    import torch

    from embedkit.eval.runner import evaluate
    from embedkit.models import load_model
    from embedkit.models.reranker import load_reranker

    if resume and saved.is_file():
        return json.loads(saved.read_text())
    torch.set_num_threads(THREADS)
    spec = test
    if SMOKE:
        spec = smoke_test_split(test, cache.parent)
    report = evaluate(load_model(first_stage), [spec], batch_size=32, cache_dir=cache,
                      reranker=load_reranker(reranker) if reranker is not None else None, rerank_top=rerank_top)
    saved.write_text(json.dumps(report))
    return report


def smoke_test_split(test: str, out: Path) -> str:
    """BENCH_SMOKE: the first 30 judged queries and a 300-document corpus holding their positives."""
    from embedkit.data.beir import load_beir

    folder, split = test[len("beir:"):].rsplit(":", 1)
    target = out / "smoke-test"
    if not (target / "queries.jsonl").is_file():
        ds = load_beir(folder, split)
        qids = sorted(ds.qrels)[:30]
        docs = {d for q in qids for d in ds.qrels[q]}
        docs |= set(list(ds.corpus)[:300 - len(docs)])
        (target / "qrels").mkdir(parents=True, exist_ok=True)
        with open(target / "corpus.jsonl", "w") as f:
            for d in sorted(docs):
                f.write(json.dumps({"_id": d, **ds.corpus[d]}) + "\n")
        with open(target / "queries.jsonl", "w") as f:
            for q in qids:
                f.write(json.dumps({"_id": q, "text": ds.queries[q]}) + "\n")
        with open(target / "qrels" / "test.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for q in qids:
                for d, g in ds.qrels[q].items():
                    f.write(f"{q}\t{d}\t{g}\n")
    return f"beir:{target}:test"


def ndcg(report: dict) -> float:
    (task,) = report["results"].values()
    return task["metrics"]["ndcg_at_10"]


def rerank_ms_per_query(report: dict) -> float | None:
    (timings,) = report["timings"]["tasks"].values()
    return timings.get("rerank_ms_per_query")


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="scifact")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--first-stage", default="minilm", help="the bi-encoder whose top 100 is reranked")
    parser.add_argument("--arms", default="embedkit,st",
                        help="embedkit, st, embedkit-head (embedkit with the new head at HEAD_LR)")
    parser.add_argument("--rerank-top", type=int, default=100,
                        help="the first stage's top K that each reranker reorders (the cost grows with K)")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--negatives", type=int, default=SETTINGS["negatives"])
    parser.add_argument("--train-queries", type=int, default=None, help="a seeded sample of N training queries")
    parser.add_argument("--out", default="runs/bench-rerank")
    parser.add_argument("--resume", action="store_true", help="reuse trained models and evaluations in --out")
    parser.add_argument("--record", help="write a bench record (bench/record.py) here")
    parser.add_argument("--child")
    parser.add_argument("--rows")
    parser.add_argument("--output")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(THREADS)
        if args.child == "st":
            run = child_st(Path(args.rows), Path(args.output), args.seed)
        else:
            run = child_embedkit(Path(args.rows), Path(args.output), args.seed,
                                 HEAD_LR if args.child == "embedkit-head" else None)
        Path(args.result).write_text(json.dumps(run))
        return
    from bench_train import seed_mean_report, verdict_between

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    if any(a not in ("embedkit", "st", "embedkit-head") for a in arms):
        parser.error("--arms: choose from embedkit, st, embedkit-head")
    top = args.rerank_top
    values: dict = {"settings": SETTINGS, "first_stage": args.first_stage, "seeds": seeds, "smoke": SMOKE,
                    "rerank_top": top, **({"head_lr": HEAD_LR} if "embedkit-head" in arms else {})}
    for dataset in args.datasets.split(","):
        name = dataset + (f"-q{args.train_queries}" if args.train_queries else "")
        test = DATASETS[dataset]["test"].format(data=args.data)
        rows, info = mine_rows(dataset, args.data, args.first_stage, out, args.negatives, args.train_queries)
        row: dict = {"rows": info, "test": test}
        base = evaluate_once(args.first_stage, test, out / "cache", out / f"{dataset}-first-stage.eval.json",
                             args.resume)
        row["first_stage"] = {"ndcg_at_10": ndcg(base)}
        print(f"[{name}] first stage {args.first_stage}: nDCG@10 {ndcg(base):.4f}", flush=True)
        reports: dict[str, list[dict]] = {}
        for arm in arms:
            runs, reports[arm] = [], []
            for seed in seeds:
                model = model_path(out, name, arm, seed)
                done = model.with_suffix(".result.json")
                run = json.loads(done.read_text()) if args.resume and done.is_file() else run_child(arm, rows, model,
                                                                                                      seed)
                evaluated = model.with_suffix(".eval.json" if top == 100 else f".top{top}.eval.json")
                report = evaluate_once(args.first_stage, test, out / "cache", evaluated, args.resume, reranker=model,
                                       rerank_top=top)
                run.update(ndcg_at_10=ndcg(report), rerank_ms_per_query=rerank_ms_per_query(report))
                runs.append(run)
                reports[arm].append(report)
                print(f"[{name}] {arm:8s} seed {seed}: {run['steps']} steps, {run['rows_per_s']:.2f} rows/s, "
                      f"reranked nDCG@10 {run['ndcg_at_10']:.4f}", flush=True)
            scores = [r["ndcg_at_10"] for r in runs]
            row[arm] = {"runs": runs, "ndcg_at_10_mean": statistics.fmean(scores),
                        "ndcg_at_10_sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                        "rows_per_s_median": statistics.median(r["rows_per_s"] for r in runs),
                        "rerank_ms_per_query_median": statistics.median(r["rerank_ms_per_query"] for r in runs)}
        means = {arm: seed_mean_report(reports[arm]) for arm in arms}
        for arm in ("embedkit", "embedkit-head"):
            if arm in arms:
                row[f"{arm}_vs_first_stage"] = verdict_between(base, means[arm], "first stage", f"reranked by {arm}",
                                                               seed=0)
        if {"embedkit", "embedkit-head"} <= set(arms):
            row["embedkit-head_vs_embedkit"] = verdict_between(means["embedkit"], means["embedkit-head"], "embedkit",
                                                               "embedkit-head", seed=0)
        if {"embedkit", "st"} <= set(arms):
            row["embedkit_vs_st"] = verdict_between(means["st"], means["embedkit"], "st", "embedkit", seed=0)
            row["speed_ratio_embedkit_over_st"] = (row["embedkit"]["rows_per_s_median"]
                                                   / row["st"]["rows_per_s_median"])
            print(f"[{name}] training speed embedkit / st: {row['speed_ratio_embedkit_over_st']:.2f}x", flush=True)
        values[name] = row
        (out / "summary.json").write_text(json.dumps(values, indent=1))
    if args.record:
        from record import write_record

        write_record(args.record, values, command="bench/bench_rerank.py " + " ".join(sys.argv[1:]))
    print(json.dumps({k: v for k, v in values.items() if k not in ("settings",)}, indent=1, default=str)[:4000])


if __name__ == "__main__":
    main()
