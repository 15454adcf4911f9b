"""SmolLM2-135M as a retriever on medquad/test, against BM25 and MiniLM in the same run (issue #17).

    .venv/bin/python bench/bench_llm_retrieval.py                       # the attention x pooling x MNTP grid
    .venv/bin/python bench/bench_llm_retrieval.py --arms recipe --eval-docs 0   # the recipe as shipped, full test
    .venv/bin/python bench/bench_llm_retrieval.py --arms none --eval-docs 0     # the baselines alone
    .venv/bin/python bench/bench_llm_retrieval.py --arms bidirectional/mean/mntp --adapter lora --pairs 5600 \
        --mntp-steps 100 --lr 5e-4 --eval-docs 0 --no-baselines                # the recipe's settings with LoRA

Rows, all scored by embedkit's evaluator (embedkit.eval.runner.evaluate: pytrec_eval nDCG@10) on the same task:
- BM25 (bm25s, Lucene scoring, English stopwords, no stemmer: embedkit/rag/bm25.py's tokenizer);
- all-MiniLM-L6-v2 as shipped (the embedded `minilm`);
- SmolLM2-135M-Instruct untrained: causal last-token (the LLM default) and mean pooling;
- one trained model per arm ATTENTION/POOLING/MNTP (causal|bidirectional, lasttoken|mean, mntp|none): `embedkit
  train recipes/smollm2-qlora.yaml` with the arm's settings and this run's size overrides, as a subprocess (its peak
  RSS is the process's own), then evaluated from the saved folder as `embedkit eval` would load it; `recipe` is
  the recipe file as it is (the README's headline);
- with --joint N: one `embedkit llm joint` model (embeds and answers; bidirectional / mean on the embedding side)
  trained on N pairs: its retrieval score beside its held-out answer loss before / after.
Rows of several runs into one --out are merged into its results.json.

Task: the full medquad/test (1,498 questions over 1,555 answers) with --eval-docs 0; a smaller number takes whole
test topics in seeded order until that many documents (bench_llm.subset_beir), for a pilot. Training data:
--pairs seeded random pairs of medquad/train_pairs.jsonl (topics disjoint from the test set).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from bench_llm import DATA, subset_beir  # noqa: E402  (bench/ is on sys.path: a script)

RECIPE = REPO / "recipes" / "smollm2-qlora.yaml"
ATTENTIONS, POOLINGS, WARMUPS = ("causal", "bidirectional"), ("lasttoken", "mean"), ("none", "mntp")


def parse_arms(text: str) -> list[tuple[str, ...]]:
    """'grid', 'none', or a comma list of ATTENTION/POOLING/MNTP and 'recipe' (the recipe file as it is)."""
    if text == "grid":
        return list(itertools.product(ATTENTIONS, POOLINGS, WARMUPS))
    if text == "none":
        return []
    arms = []
    for item in text.split(","):
        if item.strip() == "recipe":
            arms.append(("recipe",))
            continue
        parts = tuple(item.strip().split("/"))
        if len(parts) != 3 or parts[0] not in ATTENTIONS or parts[1] not in POOLINGS or parts[2] not in WARMUPS:
            raise SystemExit(f"--arms: {item!r} is not ATTENTION/POOLING/MNTP ({'|'.join(ATTENTIONS)} / "
                             f"{'|'.join(POOLINGS)} / {'|'.join(WARMUPS)})")
        arms.append(parts)
    return arms


def bm25_ndcg(task_dir: Path, split: str) -> dict:
    """BM25 through the same metrics core as the models (top 100 per query)."""
    import numpy as np

    from embedkit.data.beir import load_beir
    from embedkit.eval.metrics import retrieval_metrics
    from embedkit.rag.bm25 import Bm25Index

    ds = load_beir(task_dir, split)
    doc_ids = list(ds.corpus)
    index = Bm25Index.build(enumerate(ds.document_texts(doc_ids)))  # the text the models encode
    judged = [qid for qid in ds.queries if qid in ds.qrels]
    run = {}
    for qid, (ids, scores) in zip(judged, index.search([ds.queries[q] for q in judged], 100)):
        run[qid] = {doc_ids[int(i)]: float(s) for i, s in zip(np.asarray(ids), np.asarray(scores))}
    return retrieval_metrics(ds.qrels, run).metrics


def evaluate_encoder(encoder, spec: str, seed: int) -> dict:
    from embedkit.eval.runner import evaluate

    report = evaluate(encoder, [spec], batch_size=32, seed=seed, use_cache=False)
    result = next(iter(report["results"].values()))
    return {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}


def run_measured(command: list[str], what: str) -> tuple[float, float]:
    """Run a training command as a subprocess: (wall seconds, the process's own peak RSS in GB)."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M"] + command, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    return round(wall, 1), round(peak_kb / 1024 ** 2, 2)


def arm_overrides(arm: tuple[str, ...], args, out: Path) -> list[str]:
    """The recipe's settings for one ATTENTION/POOLING/MNTP arm at this run's size."""
    attention, pooling, warmup = arm
    return [f"model.attention={attention}", f"model.pooling={pooling}",
            f"model.padding_side={'left' if pooling == 'lasttoken' else 'right'}",
            f"model.max_length={args.max_length}", f"adapter.type={args.adapter}", f"adapter.r={args.rank}",
            f"adapter.alpha={2 * args.rank}", f"data.max_examples={args.pairs}", "data.dev=null",
            f"training.output_dir={out}", f"training.batch_size={args.batch_size}", "training.grad_cache=null",
            f"training.lr={args.lr}", f"training.seed={args.seed}", f"training.threads={args.threads}",
            "training.progress=false", "training.checkpoint_every=null",
            f"mntp.steps={args.mntp_steps if warmup == 'mntp' else 0}", f"mntp.max_length={args.max_length}",
            f"mntp.batch_size={args.mntp_batch_size}", f"mntp.lr={args.mntp_lr}"]


def train_arm(arm: tuple[str, ...], args, out: Path) -> dict:
    """`embedkit train recipes/smollm2-qlora.yaml` for one arm as a subprocess; its stats and peak RSS.

    The arm ("recipe",) is the recipe file as it is (only the output folder and the progress bar change): the row
    that shows `embedkit train recipes/smollm2-qlora.yaml` reproduces the README's headline."""
    if arm == ("recipe",):
        sets = [f"training.output_dir={out}", "training.progress=false"]
    else:
        sets = arm_overrides(arm, args, out)
    command = [str(REPO / ".venv" / "bin" / "embedkit"), "train", str(RECIPE)] + [x for s in sets for x in ("--set", s)]
    wall, peak_gb = run_measured(command, f"training {arm}")
    manifest = json.loads((out / "embedkit_manifest.json").read_text())
    stats = manifest["training"]["stats"]
    mntp = stats.get("memory", {}).get("mntp") or {}
    return {"wall_seconds": wall, "train_seconds": stats["train_seconds"], "steps": stats["steps"],
            "samples": stats["samples"], "mntp_seconds": mntp.get("train_seconds", 0.0),
            "mntp_final_loss": mntp.get("final_loss"), "peak_rss_gb": peak_gb,
            "command": " ".join(["embedkit", "train", "recipes/smollm2-qlora.yaml"]
                                + [x for s in sets for x in ("--set", s)])}


JOINT_RECIPE = REPO / "recipes" / "llm" / "smollm2-joint.yaml"


def train_joint_arm(args, out: Path, heldout_spec: str) -> dict:
    """`embedkit llm joint` (contrastive + sft_weight x answer loss, one model) with the winning embedding settings
    (bidirectional attention, mean pooling; no MNTP: `llm joint` has no warm-up stage) as a subprocess: its held-out
    answer loss before / after (medquad/test questions and answers, topics disjoint from training) and peak RSS."""
    sets = ["model.embedding_attention=bidirectional", "model.pooling=mean", "model.padding_side=right",
            f"model.max_length={args.joint_max_length}", f"adapter.type={args.adapter}", f"adapter.r={args.rank}",
            f"adapter.alpha={2 * args.rank}", f"data.max_examples={args.joint}", "data.dev=null",
            f"data.heldout={heldout_spec}", "data.heldout_examples=64", f"joint.sft_weight={args.sft_weight}",
            f"training.output_dir={out}", f"training.batch_size={args.batch_size}", "training.micro_batch_size=null",
            f"training.lr={args.lr}", f"training.seed={args.seed}", f"training.threads={args.threads}",
            "training.progress=false"]
    command = [str(REPO / ".venv" / "bin" / "embedkit"), "llm", "joint", str(JOINT_RECIPE)]
    command += [x for s in sets for x in ("--set", s)]
    wall, peak_gb = run_measured(command, "joint training")
    stats = json.loads((out / "embedkit_manifest.json").read_text())["llm"]["stats"]
    return {"wall_seconds": wall, "train_seconds": stats.get("train_seconds"), "steps": stats.get("steps"),
            "samples": stats.get("samples"), "heldout_answer_loss_before": stats.get("heldout_answer_loss_before"),
            "heldout_answer_loss": stats.get("heldout_answer_loss"), "sft_weight": args.sft_weight,
            "peak_rss_gb": peak_gb,
            "command": " ".join(["embedkit", "llm", "joint", "recipes/llm/smollm2-joint.yaml"]
                                + [x for s in sets for x in ("--set", s)])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="grid", help="'grid' (all 8), 'none' (baselines only), or a comma list of "
                        "ATTENTION/POOLING/MNTP and 'recipe' (recipes/smollm2-qlora.yaml as it is)")
    parser.add_argument("--pairs", type=int, default=256, help="training pairs (seeded random sample)")
    parser.add_argument("--eval-docs", type=int, default=300, help="0 = the full medquad/test")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--adapter", choices=("lora", "qlora"), default="lora")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mntp-steps", type=int, default=30)
    parser.add_argument("--mntp-batch-size", type=int, default=8)
    parser.add_argument("--mntp-lr", type=float, default=1e-4)
    parser.add_argument("--joint", type=int, default=0, metavar="PAIRS",
                        help="also train one joint model (embeds and answers) on PAIRS pairs: its retrieval score "
                        "beside its held-out answer loss")
    parser.add_argument("--joint-max-length", type=int, default=128, help="joint: tokens per text (answers need more)")
    parser.add_argument("--sft-weight", type=float, default=10.0,
                        help="joint: weight of the answer loss (at temperature 0.02 the contrastive gradient is ~25x "
                        "the answer loss's, bench_llm.py)")
    parser.add_argument("--no-baselines", action="store_true", help="skip BM25, MiniLM and the untrained SmolLM2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-llm-retrieval")
    args = parser.parse_args()
    arms = parse_arms(args.arms)

    import torch

    torch.set_num_threads(args.threads)
    from cpuinfo import describe as cpu_description  # the CPU and its int8 instructions, as every bench prints

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.eval_docs:
        task_dir = out / f"medquad-test-{args.eval_docs}"
        sizes = subset_beir(DATA / "test", task_dir, args.eval_docs, args.seed)
    else:
        task_dir = DATA / "test"
        sizes = {"documents": sum(1 for _ in open(task_dir / "corpus.jsonl")),
                 "queries": sum(1 for _ in open(task_dir / "queries.jsonl"))}
    spec = f"beir:{task_dir}:test"
    print(cpu_description(), flush=True)
    print(f"task: medquad/test{'' if not args.eval_docs else ' subset'} ({sizes['documents']} documents, "
          f"{sizes['queries']} queries); train: {args.pairs} pairs, max length {args.max_length}, {args.adapter} "
          f"r{args.rank}, lr {args.lr}, batch {args.batch_size}, seed {args.seed}; MNTP arms: {args.mntp_steps} steps "
          f"of {args.mntp_batch_size} documents at lr {args.mntp_lr}", flush=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.update({"task": spec, "sizes": sizes, "args": {k: str(v) for k, v in vars(args).items()}})
    rows = results.setdefault("rows", {})

    def record(name: str, row: dict) -> None:
        # Re-read before writing: several runs (arms, baselines) may share one --out and write rows in turn.
        latest = json.loads(results_path.read_text()) if results_path.is_file() else {}
        rows.update({k: v for k, v in latest.get("rows", {}).items() if k not in rows})
        rows[name] = row
        tmp = results_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(results_path)
        print(f"{name:40s} nDCG@10 {row['ndcg_at_10']:.4f}" + (f"  train {row['train_seconds']:.0f} s, "
              f"{row['samples']} pairs, peak RSS {row['peak_rss_gb']:.2f} GB" if "train_seconds" in row else ""),
              flush=True)

    if not args.no_baselines:
        from embedkit.models import load_model

        record("BM25 (bm25s, English stopwords)", bm25_ndcg(task_dir, "test"))
        record("all-MiniLM-L6-v2", evaluate_encoder(load_model("minilm"), spec, args.seed))
        for pooling in ("lasttoken", "mean"):
            model = load_model("smollm2-135m", pooling=pooling, max_length=args.max_length,
                               padding_side="left" if pooling == "lasttoken" else "right")
            record(f"SmolLM2-135M untrained, causal/{pooling}", evaluate_encoder(model, spec, args.seed))
    from embedkit.models import load_model

    for arm in arms:
        name = "SmolLM2 recipes/smollm2-qlora.yaml as is" if arm == ("recipe",) else "SmolLM2 " + "/".join(arm)
        folder = out / "models" / "-".join(arm)
        trained = train_arm(arm, args, folder)
        metrics = evaluate_encoder(load_model(folder), spec, args.seed)
        record(name, {**metrics, **trained})
    if args.joint:
        folder = out / "models" / "joint"
        trained = train_joint_arm(args, folder, f"beir:{DATA / 'test'}:test")
        metrics = evaluate_encoder(load_model(folder), spec, args.seed)
        record(f"SmolLM2 joint (bidirectional/mean, + {args.sft_weight:g} x answer loss)", {**metrics, **trained})
        print(f"  held-out answer loss {trained['heldout_answer_loss_before']} -> {trained['heldout_answer_loss']}",
              flush=True)
    print("\n| model | nDCG@10 | train s | pairs | peak RSS GB |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['ndcg_at_10']:.4f} | {row.get('train_seconds', '')} | {row.get('samples', '')} | "
              f"{row.get('peak_rss_gb', '')} |")
    print(f"wrote {results_path}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
