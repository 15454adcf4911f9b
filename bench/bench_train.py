"""Benchmark: embedkit's training engine against today's trainer (a git ref) and/or sentence-transformers' trainer.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    .venv/bin/python bench/bench_train.py --datasets scifact,medquad --json /tmp/bench_train.json
    # the engine against the trainer it replaced, same run, no ST arm:
    .venv/bin/python bench/bench_train.py --baseline-ref 25a23ca --arms baseline,engine --json /tmp/bench_engine.json
    BENCH_MAX_STEPS=2 .venv/bin/python bench/bench_train.py --datasets scifact --seeds 1,2 --no-base   # smoke test

Arms (`--arms`, comma-separated; default st,engine, plus baseline when --baseline-ref is given):
- engine: this checkout's `embedkit.train.contrastive.train` (the training engine);
- baseline: the embedkit of `--baseline-ref` (e.g. 25a23ca, `embedkit.train.trainer.train`), checked out with
  `git worktree add --detach` into a temporary folder (removed afterwards) and imported from there in its child
  (PYTHONPATH=<worktree>; the child checks that embedkit.__file__ lies inside it). Same recipe file, overrides,
  data subset, seed, threads and model as the engine arm;
- st: sentence-transformers' SentenceTransformerTrainer + MultipleNegativesRankingLoss (the peer).

Same model (all-MiniLM-L6-v2), data, batch size (32), lr (2e-5), epochs (1), max length (256), seeds, warmup (0.1),
weight decay (0.01), gradient clipping (1.0) and threads (2) on every arm; embedkit (engine and baseline) runs its
default recipe (recipes/minilm-<dataset>.yaml). sentence-transformers gets the recipe's attention dropout (0; hidden
dropout stays 0.1 on both sides) and the NO_DUPLICATES batch sampler (its way of keeping a text's copies out of each
other's negatives, where embedkit masks them: loss.mask_false_negatives), so a difference is the trainer's.
- scifact: the 919 SciFact train pairs (qrels/train.tsv) -> nDCG@10 on SciFact test;
- medquad: a seeded 1,000-pair sample of medquad/train_pairs.jsonl (the recipe's sample; every arm trains on the
  same pairs) -> nDCG@10 on medquad/test.
Each arm trains in its own subprocess (one after the other; side by side with --parallel), so peak RSS is per
trainer: ru_maxrss of the child read at its last training step (the whole child's ru_maxrss from wait4, which adds
the final save, is printed too). Train samples/s = samples / wall time of the training call (ST:
`trainer.train()`; embedkit: `train()` up to its last step, i.e. including model loading, data loading and
tokenization); for the embedkit arms "steps only" = samples / the summed time of the optimizer steps, as the
trainer itself reports it. Because wall time depends on whatever else the machine runs, samples per CPU-second of
the child is printed too. Every trained model is evaluated afterwards in this (parent) process by this checkout's
evaluation runner (embedkit.eval.runner, as `embedkit eval` runs it), so the metric code is identical for all arms.
`--seeds` (default 42,43,44): every arm trains once per seed (the arm order reversed on every other seed). Timings are
medians over the seeds (the same work each time); nDCG@10 is the mean +- standard deviation over the seeds, and the
verdict between two arms is `embedkit compare` on their per-query nDCG@10 averaged over the seeds (difference, 95%
interval, p(improvement), the default gate at a 0.01 margin). Engine vs old trainer: per-seed differences (the same
seed must give the same model within 0.003) and whether the weights are identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
from cpuinfo import describe, int8_instructions  # noqa: E402  (bench/ is on sys.path: a script, or imported by one)
# The embedkit this process imports: the installed package (this checkout, editable), or in a baseline child the
# worktree of the baseline ref, first on sys.path through PYTHONPATH (_check_code verifies which one it got).
CODE = Path(os.environ.get("BENCH_TRAIN_CODE") or REPO).resolve()

DATASETS = {
    "scifact": {"recipe": "recipes/minilm-scifact.yaml", "test": "beir:{data}/scifact:test"},
    "medquad": {"recipe": "recipes/minilm-medquad.yaml", "test": "beir:{data}/medquad/test:test"},
}
SHARED = {"batch_size": 32, "lr": 2e-5, "epochs": 1, "max_length": 256, "warmup_ratio": 0.1,
          "weight_decay": 0.01, "max_grad_norm": 1.0, "threads": 2}
ARMS = ("st", "baseline", "engine")
ARM_ALIASES = {"embedkit": "engine", "old": "baseline"}
LABELS = {"st": "ST", "baseline": "old", "engine": "engine"}
# Acceptance targets of the engine against the trainer it replaced.
TARGETS = {"samples_per_s": 0.95, "peak_rss": 1.10, "ndcg_abs_delta": 0.003}


def _recipe(dataset: str, data_root: str, output: Path, seed: int):
    from embedkit.train.config import load_recipe

    raw_train = {"scifact": f"beir:{data_root}/scifact:train",
                 "medquad": f"{data_root}/medquad/train_pairs.jsonl"}[dataset]
    s = SHARED
    overrides = [f"data.train={raw_train}", "data.dev=null", f"training.output_dir={output}",
                 "training.progress=false", f"training.batch_size={s['batch_size']}", f"training.lr={s['lr']}",
                 f"training.epochs={s['epochs']}", f"model.max_length={s['max_length']}",
                 f"training.seed={seed}", f"training.warmup_ratio={s['warmup_ratio']}",
                 f"training.weight_decay={s['weight_decay']}", f"training.max_grad_norm={s['max_grad_norm']}",
                 f"training.threads={s['threads']}"]
    if os.environ.get("BENCH_MAX_STEPS"):  # smoke test of the benchmark itself
        overrides.append(f"training.max_steps={os.environ['BENCH_MAX_STEPS']}")
    # Always this checkout's recipe file (the baseline ref's is read by its own loader): the same settings.
    return load_recipe(REPO / DATASETS[dataset]["recipe"], overrides)


# ---------------------------------------------------------------------------------------------------- children
def _check_code() -> str:
    """The embedkit this child imported must be the one it was started for (worktree or this checkout)."""
    import embedkit

    where = Path(embedkit.__file__).resolve()
    if not where.is_relative_to(CODE):
        raise SystemExit(f"embedkit imported from {where}, expected it under {CODE}")
    return str(where)


def _code_hash() -> str:
    """sha256 of the embedkit sources this child imports from (to see that no arm's code changed mid-benchmark)."""
    h = hashlib.sha256()
    for f in sorted((CODE / "embedkit").rglob("*.py")):
        h.update(str(f.relative_to(CODE)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def child_embedkit(dataset: str, data_root: str, output: Path, kind: str, seed: int) -> dict:
    """The engine (this checkout) or the baseline trainer (the worktree): the same recipe and measurement."""
    import inspect

    code = _check_code()
    if kind == "baseline":
        from embedkit.train.trainer import train  # today's trainer at the baseline ref
    else:
        from embedkit.train.contrastive import train

    recipe = _recipe(dataset, data_root, output, seed)
    marks = {}
    started, cpu0 = time.perf_counter(), time.process_time()

    def on_step(step, record):
        marks["end"], marks["cpu"] = time.perf_counter(), time.process_time()
        marks["rss"] = _self_peak_rss_gb()

    kwargs = {"say": lambda message: None} if "say" in inspect.signature(train).parameters else {}
    result = train(recipe, on_step=on_step, **kwargs)
    return {"samples": result.samples, "steps": result.steps, "train_s": marks["end"] - started,
            "cpu_s": marks["cpu"] - cpu0, "steps_only_s": result.train_seconds, "final_loss": result.final_loss,
            "train_peak_rss_gb": marks["rss"], "embedkit_file": code, "code_sha256": _code_hash(),
            "recipe": recipe.model_dump(mode="json")}


def child_st(dataset: str, data_root: str, output: Path, kind: str, seed: int) -> dict:
    import torch

    torch.set_num_threads(SHARED["threads"])
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)
    from sentence_transformers.training_args import BatchSamplers

    from embedkit.models.registry import minilm_path
    from embedkit.train.contrastive import load_examples

    recipe = _recipe(dataset, data_root, output, seed)
    examples, _ = load_examples(recipe)  # the very same pairs as embedkit
    # Matched to embedkit's recipe: its attention dropout (0; hidden dropout stays 0.1 on both sides).
    model = SentenceTransformer(str(minilm_path()), device="cpu",
                                config_kwargs={"attention_probs_dropout_prob": recipe.model.attention_dropout})
    dropouts = {name: module.p for name, module in model.named_modules() if isinstance(module, torch.nn.Dropout)}
    assert all(p == recipe.model.attention_dropout for n, p in dropouts.items() if "attention.self" in n), dropouts
    assert model[0].auto_model.config.attention_probs_dropout_prob == recipe.model.attention_dropout
    model.max_seq_length = SHARED["max_length"]
    data = Dataset.from_dict({"anchor": [e.query for e in examples], "positive": [e.positive for e in examples]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output) + ".st-work", num_train_epochs=SHARED["epochs"],
        per_device_train_batch_size=SHARED["batch_size"], learning_rate=SHARED["lr"], seed=seed, data_seed=seed,
        # embedkit masks in-batch duplicates of a positive (loss.mask_false_negatives); ST's answer to the same
        # problem is never to put two copies of a text in one batch
        batch_sampler=BatchSamplers.NO_DUPLICATES,
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
            "final_loss": out.training_loss, "train_peak_rss_gb": rss,
            "matched": {"attention_dropout": recipe.model.attention_dropout, "batch_sampler": "no_duplicates",
                        "warmup_ratio": SHARED["warmup_ratio"], "weight_decay": SHARED["weight_decay"]}}


def _self_peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


# ---------------------------------------------------------------------------------------------------- machine
def load_avg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def cpu_busy_s() -> float | None:
    """CPU-seconds the whole machine has been busy (all cores; /proc/stat), to see what else ran during a child."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def engine_code() -> dict:
    """Which code the engine arm ran: HEAD plus a hash of the uncommitted changes under embedkit/ (if any)."""
    diff = _git("diff", "HEAD", "--", "embedkit")
    untracked = _git("ls-files", "--others", "--exclude-standard", "--", "embedkit")
    return {"head": _git("rev-parse", "HEAD"), "uncommitted_embedkit_changes": bool(diff or untracked),
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
            "changed_files": _git("diff", "HEAD", "--name-only", "--", "embedkit").split() + untracked.split()}


class BaselineWorktree:
    """`git worktree add --detach` of a ref into a temporary folder; removed (--force) on exit, even on error."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.sha = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
        self.tmp = Path(tempfile.mkdtemp(prefix="embedkit-bench-baseline-"))
        self.path = self.tmp / f"embedkit-{self.sha[:7]}"

    def __enter__(self) -> "BaselineWorktree":
        _git("worktree", "add", "--detach", str(self.path), self.sha)
        if not (self.path / "embedkit" / "train" / "trainer.py").is_file():
            self.__exit__(None, None, None)
            raise SystemExit(f"{self.ref} has no embedkit/train/trainer.py: not a baseline this bench knows")
        print(f"baseline {self.ref} = {self.sha[:12]} checked out at {self.path}", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        try:
            _git("worktree", "remove", "--force", str(self.path))
        except subprocess.CalledProcessError as err:
            print(f"warning: git worktree remove failed: {err.stderr.strip()}", file=sys.stderr)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- parent
def start_child(kind: str, dataset: str, data_root: str, output: Path, code: Path | None,
                seed: int) -> subprocess.Popen:
    result_file = output.with_suffix(".result.json")
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", kind, "--datasets", dataset, "--data", data_root,
           "--output", str(output), "--result", str(result_file), "--seed", str(seed)]
    env = dict(os.environ)
    env.pop("BENCH_TRAIN_CODE", None)
    if code is not None:  # the baseline: its own embedkit first on the path
        env["BENCH_TRAIN_CODE"] = str(code)
        env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.Popen(cmd, cwd=REPO, env=env)


def wait_child(proc: subprocess.Popen, kind: str, dataset: str, output: Path) -> dict:
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} on {dataset} failed with exit code {proc.returncode}")
    result = json.loads(output.with_suffix(".result.json").read_text())
    result["peak_rss_gb"] = result["train_peak_rss_gb"]  # peak up to the end of training (the save follows)
    result["child_peak_rss_gb"] = usage.ru_maxrss / 1e6  # the whole child, from wait4 (KiB on Linux)
    result["child_cpu_s"] = usage.ru_utime + usage.ru_stime
    result["samples_per_s"] = result["samples"] / result["train_s"]
    result["samples_per_cpu_s"] = result["samples"] / result["cpu_s"]
    if result.get("steps_only_s"):
        result["steps_only_samples_per_s"] = result["samples"] / result["steps_only_s"]
    result["weights_sha256"] = _weights_hash(output)
    return result


def _weights_hash(output: Path) -> str | None:
    files = sorted(output.rglob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _recipe_differences(old: dict, new: dict, prefix: str = "") -> tuple[list[str], list[str]]:
    """(keys whose values differ, keys only in the engine's recipe with their values), ignoring output_dir."""
    differ, only_new = [], []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if key == "output_dir":
            continue
        if key not in new:
            differ.append(f"{name} only in baseline ({old[key]!r})")
        elif key not in old:
            only_new.append(f"{name}={new[key]!r}")
        elif isinstance(old[key], dict) and isinstance(new[key], dict):
            d, o = _recipe_differences(old[key], new[key], name + ".")
            differ += d
            only_new += o
        elif old[key] != new[key]:
            differ.append(f"{name}: baseline {old[key]!r}, engine {new[key]!r}")
    return differ, only_new


def compare_engine(dataset: str, old: dict, new: dict, ref: str) -> dict:
    """The old trainer against the engine on the same seeds (`new` aggregates the engine's runs of the seeds the
    baseline trained on, so timings and nDCG@10 compare like with like)."""
    cmp: dict = {
        "ndcg_old": old["ndcg_at_10"], "ndcg_engine": new["ndcg_at_10"],
        "ndcg_delta": new["ndcg_at_10"] - old["ndcg_at_10"],
        "samples_per_s": new["samples_per_s"] / old["samples_per_s"],
        "steps_only_samples_per_s": new["steps_only_samples_per_s"] / old["steps_only_samples_per_s"],
        "samples_per_cpu_s": new["samples_per_cpu_s"] / old["samples_per_cpu_s"],
        "peak_rss": new["peak_rss_gb"] / old["peak_rss_gb"],
        "child_peak_rss": new["child_peak_rss_gb"] / old["child_peak_rss_gb"],
        "same_weights": all(a == b for a, b in zip(old["weights_sha256_all"], new["weights_sha256_all"])),
        # same seed, same data: the nDCG@10 differences seed by seed
        "ndcg_delta_per_seed": [b - a for a, b in zip(old["ndcg_at_10_all"], new["ndcg_at_10_all"])],
    }
    cmp["max_abs_ndcg_delta"] = max(abs(d) for d in cmp["ndcg_delta_per_seed"])
    cmp["pass"] = {"ndcg": cmp["max_abs_ndcg_delta"] <= TARGETS["ndcg_abs_delta"],
                   "samples_per_s": cmp["samples_per_s"] >= TARGETS["samples_per_s"],
                   "steps_only_samples_per_s": cmp["steps_only_samples_per_s"] >= TARGETS["samples_per_s"],
                   "peak_rss": cmp["peak_rss"] <= TARGETS["peak_rss"]}
    cmp["recipe_differences"], cmp["engine_only_recipe_keys"] = _recipe_differences(old["recipe"], new["recipe"])

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISS"

    p = cmp["pass"]
    lines = [
        f"[{dataset}] old trainer ({ref}) vs engine, same recipe/data/seed/threads, each in its own child:",
        f"  {'':28s} {'old':>9s} {'engine':>9s} {'engine/old':>11s}  target",
        f"  {'nDCG@10':28s} {old['ndcg_at_10']:9.4f} {new['ndcg_at_10']:9.4f} {cmp['ndcg_delta']:+11.4f}  "
        f"|diff| <= {TARGETS['ndcg_abs_delta']} every seed  {verdict(p['ndcg'])}",
        f"  {'nDCG@10 diff per seed':28s} " + " ".join(f"{d:+.4f}" for d in cmp["ndcg_delta_per_seed"]),
        f"  {'samples/s (train call)':28s} {old['samples_per_s']:9.3f} {new['samples_per_s']:9.3f} "
        f"{'x%.3f' % cmp['samples_per_s']:>11s}  >= {TARGETS['samples_per_s']}  {verdict(p['samples_per_s'])}",
        f"  {'samples/s (steps only)':28s} {old['steps_only_samples_per_s']:9.3f} "
        f"{new['steps_only_samples_per_s']:9.3f} {'x%.3f' % cmp['steps_only_samples_per_s']:>11s}  "
        f">= {TARGETS['samples_per_s']}  {verdict(p['steps_only_samples_per_s'])}",
        f"  {'samples/CPU-s (train call)':28s} {old['samples_per_cpu_s']:9.3f} {new['samples_per_cpu_s']:9.3f} "
        f"{'x%.3f' % cmp['samples_per_cpu_s']:>11s}  (load-independent cross-check)",
        f"  {'peak RSS GB (to last step)':28s} {old['peak_rss_gb']:9.3f} {new['peak_rss_gb']:9.3f} "
        f"{'x%.3f' % cmp['peak_rss']:>11s}  <= {TARGETS['peak_rss']}  {verdict(p['peak_rss'])}",
        f"  {'peak RSS GB (whole child)':28s} {old['child_peak_rss_gb']:9.3f} {new['child_peak_rss_gb']:9.3f} "
        f"{'x%.3f' % cmp['child_peak_rss']:>11s}",
        f"  {'cores used by others':28s} {old.get('other_cores') or float('nan'):9.2f} "
        f"{new.get('other_cores') or float('nan'):9.2f}   (median while each trained; near 0 = a quiet machine)",
        f"  {'final loss':28s} {old['final_loss']:9.4f} {new['final_loss']:9.4f}   "
        f"same weights every seed: {'yes' if cmp['same_weights'] else 'no'}",
    ]
    busy = [v for r in (old, new) for v in r["other_cores_all"] if v is not None]
    cmp["max_other_cores"] = max(busy) if busy else None
    if busy and max(busy) > 0.1:
        lines.append(f"  WARNING: other processes used up to {max(busy):.2f} of {os.cpu_count()} cores while a trainer "
                     "ran: the wall-clock ratios are not clean (samples/CPU-s is the cross-check)")
    codes = set(new["code_sha256_all"])
    if len(codes) > 1:
        lines.append(f"  WARNING: the engine's code changed between its runs ({sorted(codes)})")
    if cmp["recipe_differences"]:
        lines.append("  RECIPE DIFFERENCES: " + "; ".join(cmp["recipe_differences"]))
    lines.append("  recipe keys only the engine has (defaults): " + (", ".join(cmp["engine_only_recipe_keys"]) or "-"))
    print("\n".join(lines), flush=True)
    return cmp


def evaluate_report(model: str | Path, task: str, cache: Path) -> dict:
    """This checkout's evaluation runner (what `embedkit eval` runs), whatever code trained the model."""
    import torch

    from embedkit.eval.runner import evaluate
    from embedkit.models.encoder import load_model

    torch.set_num_threads(SHARED["threads"])
    encoder = load_model(model, max_length=SHARED["max_length"])
    return evaluate(encoder, [task], batch_size=64, cache_dir=cache)


def _ndcg(report: dict) -> float:
    (task,) = report["results"].values()
    return task["metrics"]["ndcg_at_10"]


def seed_mean_report(reports: list[dict]) -> dict:
    """One report whose per-query scores are the means over the seeds' reports (same task, same queries): the
    arm's expected score per query, which `embedkit compare` then tests between arms, paired over queries."""
    from embedkit.eval.compare import seed_average

    return seed_average(reports)


TIMING_KEYS = ("samples_per_s", "samples_per_cpu_s", "steps_only_samples_per_s", "peak_rss_gb", "child_peak_rss_gb",
               "train_s", "cpu_s", "steps_only_s", "other_cpu_s", "other_cores")


def aggregate(runs: list[dict]) -> dict:
    """An arm over its seeds: timings as medians (every seed does the same work), nDCG@10 as mean and spread (the
    seed changes the result), every value kept under <key>_all."""
    out = dict(runs[0])
    for key in TIMING_KEYS:
        values = [r.get(key) for r in runs]
        out[f"{key}_all"] = values
        present = [v for v in values if v is not None]
        out[key] = statistics.median(present) if present else None
    for key in ("final_loss", "weights_sha256", "code_sha256", "seed", "ndcg_at_10", "eval_s"):
        out[f"{key}_all"] = [r.get(key) for r in runs]
    scores = out["ndcg_at_10_all"]
    out["ndcg_at_10"] = statistics.fmean(scores)
    out["ndcg_at_10_sd"] = statistics.stdev(scores) if len(scores) > 1 else 0.0
    return out


def verdict_between(baseline: dict | list[dict], candidate: dict | list[dict], name_b: str, name_c: str,
                    seed: int) -> dict:
    """`embedkit compare` of the seed-averaged per-query scores: difference, 95% interval, p(improvement), and the
    default gate's verdict at a 0.01 margin. Given each side's per-seed reports (lists of 2 or more), also
    compare's interval over the seeds (Welch's t; see embedkit.eval.compare for why it sits beside the other)."""
    from embedkit.eval.compare import compare

    gate = compare(baseline, candidate, max_drop=0.01, seed=seed)
    (task,) = gate.tasks
    print(f"  embedkit compare, {name_c} vs {name_b} (per-query nDCG@10 averaged over the seeds):")
    for line in gate.summary_lines():
        print(f"    {line}")
    out = {"difference": task.difference, "ci_low": task.ci_low, "ci_high": task.ci_high,
           "p_improvement": task.p_improvement, "p_drop_beyond_0.01": task.p_value, "verdict": task.verdict,
           "exit_code": gate.exit_code}
    if task.seeds is not None and min(task.seeds) > 1:
        out["over_seeds"] = {"difference": task.difference, "ci_low": task.seeds_ci_low,
                             "ci_high": task.seeds_ci_high, "seeds": task.seeds,
                             "method": "Welch t over per-seed nDCG@10, 95% interval"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="scifact,medquad")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default="/tmp/embedkit-bench-train", help="work folder (models, caches)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--arms", help="comma-separated from st, baseline, engine (default: st,engine, plus "
                                       "baseline with --baseline-ref)")
    parser.add_argument("--baseline-ref", help="git ref of today's trainer to compare the engine with (e.g. 25a23ca)")
    parser.add_argument("--seeds", default="42,43,44",
                        help="comma-separated training seeds; every arm trains once per seed (default: 3 seeds)")
    parser.add_argument("--baseline-seeds", type=int, default=None,
                        help="train the baseline arm on the first N seeds only (it must equal the engine seed by seed, "
                             "so one seed often suffices; default: all)")
    parser.add_argument("--no-base", action="store_true", help="skip evaluating the base model")
    parser.add_argument("--parallel", action="store_true",
                        help="run the arms of a seed side by side (on a busy machine all then see the same load; "
                             "compare samples per CPU-second)")
    parser.add_argument("--child", choices=["st", "engine", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        fn = child_st if args.child == "st" else child_embedkit
        result = fn(args.datasets, args.data, Path(args.output), args.child, args.seed)
        result["seed"] = args.seed
        Path(args.result).write_text(json.dumps(result))
        return

    if args.arms:
        arms = [ARM_ALIASES.get(a.strip(), a.strip()) for a in args.arms.split(",") if a.strip()]
    else:
        arms = ["st", "engine"] + (["baseline"] if args.baseline_ref else [])
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    if "baseline" in arms and not args.baseline_ref:
        parser.error("the baseline arm needs --baseline-ref (e.g. --baseline-ref 25a23ca)")
    arms = [a for a in ARMS if a in arms]  # ST first, then the old trainer, then the engine
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--seeds: not a comma-separated list of integers: {args.seeds!r}")
    if not seeds:
        parser.error("--seeds: give at least one seed")
    baseline_seeds = len(seeds) if args.baseline_seeds is None else max(1, min(args.baseline_seeds, len(seeds)))
    # SIGTERM should still remove the worktree (the `finally` of the context manager runs on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    cpu = int8_instructions()
    results: dict = {"settings": {**SHARED, "seeds": seeds}, "arms": arms, "cpu": cpu,
                     "load_avg_before": load_avg(), "targets": TARGETS, "datasets": {},
                     "engine_code": engine_code(), "command": " ".join(sys.argv)}
    print(describe(cpu), flush=True)
    print(f"arms: {', '.join(arms)}; seeds {seeds}; {'parallel' if args.parallel else 'one after another'}",
          flush=True)

    def write_json() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    import contextlib

    baseline = BaselineWorktree(args.baseline_ref) if "baseline" in arms else None
    with baseline if baseline is not None else contextlib.nullcontext():
        if baseline is not None:
            results["baseline"] = {"ref": args.baseline_ref, "sha": baseline.sha}
        for dataset in args.datasets.split(","):
            task = DATASETS[dataset]["test"].format(data=args.data)
            row: dict = {"task": task, "parallel": args.parallel, "load_avg_before": load_avg()}
            if not args.no_base:
                row["base_ndcg_at_10"] = _ndcg(evaluate_report("minilm", task, work / "cache"))
                print(f"[{dataset}] base nDCG@10 {row['base_ndcg_at_10']:.4f}", flush=True)
            t0 = time.perf_counter()
            runs: dict[str, list[dict]] = {arm: [] for arm in arms}
            reports: dict[str, list[dict]] = {arm: [] for arm in arms}
            for index, seed in enumerate(seeds):
                order = arms if index % 2 == 0 else arms[::-1]  # no arm always first (warm caches)
                procs = {}
                for arm in [a for a in order if a != "baseline" or index < baseline_seeds]:
                    output = work / f"{dataset}-{arm}-s{seed}"
                    code = baseline.path if arm == "baseline" else None
                    load_at_start, busy_at_start, started_at = load_avg(), cpu_busy_s(), time.perf_counter()
                    procs[arm] = (start_child(arm, dataset, args.data, output, code, seed), output)
                    if not args.parallel:
                        r = wait_child(procs[arm][0], arm, dataset, output)
                        runs[arm].append(r)
                        r["load_avg_at_start"], r["load_avg_at_end"] = load_at_start, load_avg()
                        r["child_wall_s"] = time.perf_counter() - started_at
                        if busy_at_start is not None:  # CPU time of everything else while this child ran
                            r["other_cpu_s"] = cpu_busy_s() - busy_at_start - r["child_cpu_s"]
                            r["other_cores"] = r["other_cpu_s"] / r["child_wall_s"]
                        print(f"[{dataset}] {arm:8s} seed {seed}: {r['samples_per_s']:.3f} samples/s, "
                              f"{r['samples_per_cpu_s']:.3f} samples/CPU-s, peak RSS {r['peak_rss_gb']:.3f} GB; "
                              f"other processes used {r.get('other_cores', float('nan')):.2f} cores meanwhile, "
                              f"load {load_avg()}", flush=True)
                if args.parallel:
                    for arm in procs:
                        runs[arm].append(wait_child(procs[arm][0], arm, dataset, procs[arm][1]))
                for arm in procs:  # evaluated by this process's (this checkout's) evaluation code, after training
                    started = time.perf_counter()
                    report = evaluate_report(procs[arm][1], task, work / "cache")
                    reports[arm].append(report)
                    r = runs[arm][-1]
                    r["ndcg_at_10"], r["eval_s"] = _ndcg(report), time.perf_counter() - started
                    print(f"[{dataset}] {arm:8s} seed {seed}: nDCG@10 {r['ndcg_at_10']:.4f}", flush=True)
            row["load_avg_after_training"] = load_avg()
            for arm in arms:
                row[arm] = r = aggregate(runs[arm])
                steps_only = (f", steps only {r['steps_only_samples_per_s']:.3f} samples/s"
                              if r.get("steps_only_samples_per_s") else "")
                print(f"[{dataset}] {arm:8s} nDCG@10 {r['ndcg_at_10']:.4f} +- {r['ndcg_at_10_sd']:.4f} "
                      f"({len(runs[arm])} seeds)  median {r['samples_per_s']:.3f} samples/s{steps_only}  "
                      f"{r['samples_per_cpu_s']:.3f} samples/CPU-s  peak RSS {r['peak_rss_gb']:.2f} GB "
                      f"(whole child {r['child_peak_rss_gb']:.2f})", flush=True)
            print(f"[{dataset}] {time.perf_counter() - t0:.0f} s for all arms", flush=True)
            means = {arm: seed_mean_report(reports[arm]) for arm in arms}
            if "st" in arms and "engine" in arms:
                st, ek = row["st"], row["engine"]
                row["ratios"] = {"ndcg_delta": ek["ndcg_at_10"] - st["ndcg_at_10"],
                                 "samples_per_s": ek["samples_per_s"] / st["samples_per_s"],
                                 "samples_per_cpu_s": ek["samples_per_cpu_s"] / st["samples_per_cpu_s"],
                                 "peak_rss": ek["peak_rss_gb"] / st["peak_rss_gb"]}
                q = row["ratios"]
                print(f"[{dataset}] engine vs ST (matched settings): nDCG@10 {q['ndcg_delta']:+.4f}, speed "
                      f"x{q['samples_per_s']:.2f} (per CPU-s x{q['samples_per_cpu_s']:.2f}), peak RSS "
                      f"x{q['peak_rss']:.2f}", flush=True)
                row["engine_vs_st"] = verdict_between(means["st"], means["engine"], "ST", "engine", seeds[0])
            if "baseline" in arms and "engine" in arms:
                same_seeds = aggregate(runs["engine"][:baseline_seeds])
                row["engine_vs_baseline"] = compare_engine(dataset, row["baseline"], same_seeds, args.baseline_ref)
                row["engine_vs_baseline"]["compare"] = verdict_between(
                    means["baseline"], seed_mean_report(reports["engine"][:baseline_seeds]), "old", "engine", seeds[0])
            row["load_avg_after"] = load_avg()
            results["datasets"][dataset] = row
            write_json()
    results["load_avg_after"] = load_avg()
    _summary(results)
    write_json()


def _summary(results: dict) -> None:
    """One Markdown table: every arm, every data set, mean +- spread over the seeds and the verdicts."""
    cpu, seeds = results["cpu"], results["settings"]["seeds"]
    print(f"\n{describe(cpu)}; load average before {results['load_avg_before']}, after {results['load_avg_after']}")
    print(f"| data | arm | nDCG@10 mean +- sd (seeds) | samples/s | samples/CPU-s | peak RSS GB | "
          "others' cores | vs ST (diff, 95% CI, p(improve)) | vs old (max abs diff per seed) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dataset, row in results["datasets"].items():
        for arm in results["arms"]:
            r = row[arm]
            vs_st = vs_old = ""
            if arm == "engine" and "engine_vs_st" in row:
                v = row["engine_vs_st"]
                vs_st = (f"{v['difference']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}], "
                         f"p {v['p_improvement']:.3f}")
            if arm == "engine" and "engine_vs_baseline" in row:
                c = row["engine_vs_baseline"]
                vs_old = (f"{c['max_abs_ndcg_delta']:.4f}; speed x{c['samples_per_s']:.3f}, "
                          f"RSS x{c['peak_rss']:.3f}")
            others = max((v for v in r["other_cores_all"] if v is not None), default=None)
            print(f"| {dataset} | {LABELS[arm]} | {r['ndcg_at_10']:.4f} +- {r['ndcg_at_10_sd']:.4f} "
                  f"({len(r['ndcg_at_10_all'])}) "
                  f"| {r['samples_per_s']:.3f} | {r['samples_per_cpu_s']:.3f} | {r['peak_rss_gb']:.3f} "
                  f"| {'n/a' if others is None else f'{others:.2f}'} | {vs_st} | {vs_old} |")
    if any("engine_vs_baseline" in row for row in results["datasets"].values()):
        print(f"engine vs old targets: samples/s >= x{TARGETS['samples_per_s']}, peak RSS <= x{TARGETS['peak_rss']}, "
              f"|nDCG@10 diff| <= {TARGETS['ndcg_abs_delta']} at the same seed", flush=True)


if __name__ == "__main__":
    main()
