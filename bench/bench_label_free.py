"""Benchmark: specializing MiniLM from documents alone (issue #32), measured on human-labelled test queries.

    nice -n 10 .venv/bin/python bench/bench_label_free.py --datasets scifact --out runs/bench-label-free \
        --json runs/bench-label-free/scifact.json --record bench/records/label-free/scifact.json
    nice -n 10 .venv/bin/python bench/bench_label_free.py --datasets medquad --out runs/bench-label-free \
        --json runs/bench-label-free/medquad.json --record bench/records/label-free/medquad.json
    ... --resume                                  # continue an interrupted run in the same --out
    ... --styles title,ict,crop,question          # also SmolLM2-135M questions (slow on a CPU, see below)
    ... --teacher runs/my-reranker                # pseudo labels from a cross-encoder instead of the base model
    BENCH_SMOKE=1 BENCH_MAX_STEPS=2 .venv/bin/python bench/bench_label_free.py --datasets scifact --seeds 42 \
        --out /tmp/lf-smoke                       # smoke test: minutes, a check of the script, not a measurement

Per data set the training queries and qrels are hidden: the label-free arms see a corpus folder holding nothing but
corpus.jsonl (SciFact: its 5,183 abstracts; MedQuAD: the 14,268 distinct answers of train_pairs.jsonl, what
bench_tune.py's few-label collection is drawn from, without their questions; the test topics are disjoint from
them), and `check_label_free` refuses a training file with a query that synth did not write and removes (and
counts) a synthetic query equal to a human query of the data set (train or test). Each arm is evaluated on the full
human test split (bench_tune.py's `test_task`).

Pipeline of one arm, each step the user's command (`python -m embedkit.cli`):
1. `embedkit synth CORPUS --style S -k 3 --sample DOCS --seed 42` (GPL's 3 queries per passage; `--docs`, default
   1,000 documents, bounds the CPU cost; the round-trip arms add `--round-trip-k 10`);
2. `embedkit mine -m minilm -d pairs.jsonl --corpus corpus.jsonl -n 1` (one negative per query as in GPL, from the
   base model's ranks 10-100 of the whole corpus with mine's positive-aware 5 % relative margin and duplicate
   filter; with `--teacher DIR` the pseudo-label arm's rows are mined again with `--teacher DIR`);
3. `embedkit train recipes/label-free/minilm.yaml --set data.train=MINED --set training.seed=SEED` for each seed;
4. evaluation on the test split (embedkit's evaluation runner, what `embedkit eval` runs), nDCG@10 mean +- sd over
   the seeds, and `embedkit compare` of each arm against the base model on the per-query nDCG@10 averaged over the
   seeds (difference, 95% interval, p(improvement), the default gate at a 0.01 margin), as bench_tune.py does.

Arms (`--arms`, default all):
- base: all-MiniLM-L6-v2 untouched;
- style-S for each generator-free style of `--styles` (title, ict, crop; question with SmolLM2 when listed): the
  style's pairs, synth's default filters (empty, length, copy, near-duplicate), no round-trip filter;
- label-free: the recipe as shipped, the main style (`--main-style`, default ict: it needs neither titles, which
  MedQuAD's answers lack, nor a generator, and gives k distinct queries per passage) with the round-trip filter
  (`--round-trip-k 10`, the top of docs/synth.md's range: the filter model is the base being adapted, and a strict
  filter keeps only the queries the base already solves). style-<main> vs label-free is "no filter vs round-trip";
  this is the acceptance row: label-free beats base by >= 0.02 nDCG@10 with the 95% interval above 0;
- label-free-pseudo: the same rows with margin-MSE distillation (`loss.distillation=margin_mse`) on their scores:
  the base bi-encoder's scores as mine wrote them, or the `--teacher` reranker's (GPL's pseudo labels);
- q100: a seeded 100-query sample of the supervised training pairs (bench_tune.py's `subsample_queries`, sample 1),
  mined from the same corpus and trained with the label-free recipe at the supervised recipes' schedule (`5e-5`,
  3 epochs, no warm-up or weight decay: FEW_SCHEDULE): what a team with a hundred labelled questions has;
- q100+label-free: those rows added to the label-free arm's, the same schedule.

Synthetic eval set (`--synthetic-eval N`, off by default: it needs the generator): `embedkit synth --eval --style
question --sample N --seed 7 --round-trip-k 10` on the corpus (another seed than the training data); every model is
also evaluated on it, and the result reports Kendall's tau between the arms' order on it and on the human test split
(does a synthetic eval set rank models as people's queries do?).

Environment: BENCH_MAX_STEPS=N caps every training's optimizer steps; BENCH_SMOKE=1 shrinks the data (a seeded
24-document corpus, 20 sampled queries for q100, bench_tune's 30-query / 300-document cut of the test split).

Expected duration on 2 cores with nothing else running (an estimate: the smoke run below measured ~35-40 s per
optimizer step on 2 cores shared at load 5-7, and bench_tune.py's ~5 s per 32-pair step on a free machine gives
~10 s for a step with one negative per pair). Synth of the generator-free styles is instant; mining and the
round-trip filter encode each corpus once (the shared embedding cache): SciFact ~7 min, MedQuAD ~6 min. Trainings,
per seed: ict and the label-free arms ~3,000 pairs (1,000 documents x 3) = ~94 steps, ~16 min each (style-ict,
label-free, label-free-pseudo, q100+label-free); title ~1,000 pairs and crop ~1,000 after the copy filter, ~5 min
each; q100 under a minute; plus ~1 min of start-up per run: ~75 min per seed, ~4 h for 3 seeds per data set
(MedQuAD: no titles, style-title is skipped). Evaluation: SciFact 22 models (base + 7 arms x 3 seeds), ~7 min each
(~2.6 h); MedQuAD 19, ~2 min each (~40 min). About 7 h for SciFact and 5 h for MedQuAD. `question` adds SmolLM2
generation: docs/synth.md measured 0.06 queries/s under load, i.e. ~14 h for 3,000 queries (try --docs 100 first),
and one more arm. --synthetic-eval N adds N generated queries and a second evaluation of every model.

Smoke (BENCH_SMOKE=1 BENCH_MAX_STEPS=2, scifact, 1 seed, the generator-free styles): 15.5 min on 2 cores shared at
load 5-7, nearly all of it the start-up of ~20 embedkit processes and models; a second call with --resume reuses
every synth, mine, training and evaluation and took 3 s. `--synthetic-eval 3` on top: 3 min (SmolLM2's 3 queries
2 min of it). MedQuAD's smoke: 12 min (style-title skipped: its answers have no titles). With BENCH_MAX_STEPS=2 the
warm-up and decay leave about one small update, so most arms score as the base model there: a check, not a result.

Measured (MedQuAD, `--docs 300 --arms label-free,q100,q100+label-free`, 3 seeds, 2 cores shared with another
bench most of the time): 7,089 s in all; the round-trip filter's encoding of the 14,268 answers ~9 min (26 texts/s),
the mine of synth's output corpus another ~12 min before the cache reused rows (it now encodes only the ~450 new
passages), the q100+label-free trainings 54 steps in 795-1,336 s each.

Run one data set at a time into a kept --out and use --resume: a run that was trained and evaluated is reused from
its <arm>-s<seed>.result.json and .eval.json (the model folder may be gone: --cleanup removes it after its
evaluation) when the recipe as parsed and the training file are the same, synth and mine outputs from their folders.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_tune  # noqa: E402  (stdlib-only imports at its top; sets the offline variables)
from bench_tune import SMOKE, ndcg, seed_mean_report, subsample_queries, test_task, verdict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/label-free/minilm.yaml"
FREE_STYLES = ("title", "ict", "crop")
GENERATOR_STYLES = ("question", "keyword", "claim")
QUERIES_PER_DOC = 3  # GPL: 3 queries per passage
NEGATIVES = 1  # GPL: one mined negative per query
ROUND_TRIP_K = 10
SYNTH_SEED = 42
EVAL_SEED = 7  # the synthetic eval set: another seed than the training data
FEW_QUERIES = 100
ACCEPT_GAIN = 0.02
MAX_STEPS = os.environ.get("BENCH_MAX_STEPS")
SMOKE_SIZES = {"corpus_docs": 24, "few_queries": 20}
DISTILL = ["loss.distillation=margin_mse", "data.columns.scores=scores"]
# The few-label arms train the supervised recipes' schedule (recipes/minilm-*.yaml since 2026-12-07: sentence-
# transformers' default), so q100 is what a team with a hundred labels trains by default; on the label-free recipe's
# one epoch at 2e-5, 100 pairs make 4 optimizer steps, mostly warm-up (docs/tune.md, "The default recipe").
FEW_SCHEDULE = ["training.lr=5e-5", "training.epochs=3", "training.warmup_ratio=0.0", "training.weight_decay=0.0"]


# ---------------------------------------------------------------------------------------------------- arms
def arm_plan(styles: list[str], main_style: str, teacher: str | None = None) -> dict[str, dict]:
    """Every trained arm: the synth sources its training rows come from ((style, round-trip k, teacher) each),
    whether it adds the supervised 100-query sample, and the recipe overrides on top of the label-free recipe."""
    if main_style not in styles:
        raise ValueError(f"--main-style {main_style} is not one of --styles {','.join(styles)}")
    plan = {f"style-{s}": {"synth": [(s, 0, None)], "few": False, "overrides": []} for s in styles}
    main = (main_style, ROUND_TRIP_K, None)
    plan["label-free"] = {"synth": [main], "few": False, "overrides": []}
    plan["label-free-pseudo"] = {"synth": [(main_style, ROUND_TRIP_K, teacher)], "few": False, "overrides": DISTILL}
    plan["q100"] = {"synth": [], "few": True, "overrides": FEW_SCHEDULE}
    plan["q100+label-free"] = {"synth": [main], "few": True, "overrides": FEW_SCHEDULE}
    return plan


def synth_name(style: str, round_trip_k: int) -> str:
    return f"synth-{style}" + (f"-rt{round_trip_k}" if round_trip_k else "")


def mined_name(style: str, round_trip_k: int, teacher: str | None) -> str:
    return synth_name(style, round_trip_k) + ("-teacher" if teacher else "") + ".mined.jsonl"


# ---------------------------------------------------------------------------------------------------- data
def label_free_corpus(dataset: str, data_root: str, work: Path) -> Path:
    """A folder holding only corpus.jsonl: the documents a team has, without a query or a qrel (SciFact: its
    abstracts; MedQuAD: the distinct answers of train_pairs.jsonl, ids a0.. as bench_tune's collection names them).
    BENCH_SMOKE: a seeded sample of SMOKE_SIZES['corpus_docs'] of them."""
    folder = work / f"{dataset}-corpus"
    target = folder / "corpus.jsonl"
    if target.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    root = Path(data_root)
    if dataset == "scifact":
        lines = [line for line in (root / "scifact" / "corpus.jsonl").read_text(encoding="utf-8").splitlines() if line]
    else:
        answers: dict[str, None] = {}
        with (root / "medquad" / "train_pairs.jsonl").open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    answers.setdefault(json.loads(line)["positive"], None)
        lines = [json.dumps({"_id": f"a{i}", "title": "", "text": t}) for i, t in enumerate(answers)]
    if SMOKE:
        lines = random.Random(0).sample(lines, min(len(lines), SMOKE_SIZES["corpus_docs"]))
    tmp = target.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(target)
    return folder


def style_possible(corpus: Path, style: str) -> bool:
    """Whether some document of `corpus` can give a `style` query (synth's own rule, embedkit.synth.styles); a
    generator style always can."""
    if style not in FREE_STYLES:
        return True
    from embedkit.data.documents import load_documents
    from embedkit.synth.styles import queries_available

    return any(queries_available(style, doc, QUERIES_PER_DOC) for doc in load_documents(corpus / "corpus.jsonl"))


def human_queries(dataset: str, data_root: str) -> set[str]:
    """Every human query text of the data set (training and test), normalised: what no label-free arm may train on."""
    root = Path(data_root)
    texts: list[str] = []
    if dataset == "scifact":
        texts = [json.loads(line)["text"] for line in (root / "scifact" / "queries.jsonl").open(encoding="utf-8")
                 if line.strip()]
    else:
        with (root / "medquad" / "train_pairs.jsonl").open(encoding="utf-8") as f:
            texts = [json.loads(line)["query"] for line in f if line.strip()]
        texts += [json.loads(line)["text"] for line in (root / "medquad" / "test" / "queries.jsonl").open(
            encoding="utf-8") if line.strip()]
    return {normalise(t) for t in texts}


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class LabelLeak(SystemExit):
    pass


def check_label_free(training: list[dict], synthetic: set[str], human: set[str], allowed: set[str] = frozenset(),
                     corpus_folder: Path | None = None) -> tuple[list[dict], dict]:
    """The hidden-labels guard: the rows an arm may train on, and the counts. Refuses (LabelLeak) a synth input
    folder holding anything but corpus.jsonl, and a training row whose query synth did not write (`synthetic`: the
    queries of the synth outputs the arm uses) unless it is one of `allowed` (the q100 arms' sampled human queries).
    A synthetic query that happens to equal a human query of the data set (`human`, normalised: a sentence of a
    document that is also a question or claim of the train or test split) is removed and counted."""
    if corpus_folder is not None:
        extra = sorted(p.name for p in corpus_folder.iterdir() if p.name != "corpus.jsonl")
        if extra:
            raise LabelLeak(f"label-free corpus folder {corpus_folder} holds more than corpus.jsonl: {extra}")
    kept: list[dict] = []
    counts = {"synthetic_rows": 0, "human_rows": 0, "removed_equal_to_human": 0}
    for row in training:
        query = row["query"]
        if query in allowed:
            counts["human_rows"] += 1
        elif query not in synthetic:
            raise LabelLeak(f"a training query synth did not write: {query[:80]!r}")
        elif normalise(query) in human:
            counts["removed_equal_to_human"] += 1
            continue
        else:
            counts["synthetic_rows"] += 1
        kept.append(row)
    return kept, counts


def few_label_pairs(dataset: str, data_root: str, work: Path) -> Path:
    """bench_tune's seeded 100-query sample (sample 1) of the supervised training pairs, as a pairs file."""
    out = work / f"{dataset}-q{FEW_QUERIES}.pairs.jsonl"
    if out.is_file():
        return out
    queries = SMOKE_SIZES["few_queries"] if SMOKE else FEW_QUERIES
    spec, _ = subsample_queries(dataset, data_root, work, queries, 1)
    if spec.startswith("beir:"):
        from embedkit.data.beir import load_beir
        from embedkit.data.tuples import pairs_from_beir

        path, split = spec[len("beir:"):].rsplit(":", 1)
        rows = [{"query": e.query, "positive": e.positive} for e in pairs_from_beir(load_beir(path, split))]
    else:
        rows = [{"query": r["query"], "positive": r["positive"]} for r in read_jsonl(Path(spec))]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------------- commands
def cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "embedkit.cli", *args]
    print("  $ embedkit " + " ".join(args), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"embedkit {args[0]} failed with exit code {proc.returncode}")
    return proc


def synth(corpus: Path, out: Path, style: str, round_trip_k: int, docs: int | None, resume: bool, *,
          eval_set: bool = False, seed: int = SYNTH_SEED, model: str | None = None) -> dict:
    """`embedkit synth`; with --resume a finished output (its summary saved beside it) is reused as it is."""
    saved = out.with_suffix(".summary.json")
    if resume and saved.is_file() and (out / ("queries.jsonl" if eval_set else "pairs.jsonl")).is_file():
        return json.loads(saved.read_text())
    args = ["synth", str(corpus / "corpus.jsonl"), "-o", str(out), "--style", style, "-k",
            str(1 if eval_set else QUERIES_PER_DOC), "--seed", str(seed), "--round-trip-k", str(round_trip_k),
            "--device", "cpu", "--json"]
    if docs:
        args += ["--sample", str(docs)]
    if style == "title":
        args += ["--min-words", "1"]  # docs/synth.md: keeps one-word titles
    if eval_set:
        args.append("--eval")
    if model:
        args += ["--model", model]
    started = time.perf_counter()
    summary = json.loads(cli(*args).stdout)
    summary["wall_s"] = time.perf_counter() - started
    saved.write_text(json.dumps(summary, indent=2))
    return summary


def mine(pairs: Path, corpus: Path, out: Path, resume: bool, teacher: str | None = None) -> dict:
    saved = out.with_name(out.stem + ".bench.json")
    if resume and saved.is_file() and out.is_file():
        return json.loads(saved.read_text())
    args = ["mine", "-m", "minilm", "-d", str(pairs), "--corpus", str(corpus / "corpus.jsonl"), "-n", str(NEGATIVES),
            "-o", str(out), "--device", "cpu", "--json"]
    if teacher:
        args += ["--teacher", teacher]
    started = time.perf_counter()
    summary = json.loads(cli(*args).stdout)
    result = {"wall_s": time.perf_counter() - started, "rows": sum(1 for _ in out.open(encoding="utf-8")),
              "seconds": summary.get("seconds")}
    saved.write_text(json.dumps(result, indent=2))
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def trained_settings(data: Path, sets: list[str]) -> dict:
    """What a training run depends on: the recipe as parsed with its overrides (not where its data or model lie, so
    a comment in the recipe or a moved --out retrains nothing) and the training file's content."""
    from embedkit.train.config import load_recipe

    recipe = load_recipe(REPO / RECIPE, sets, check_environment=False).model_dump(mode="json")
    recipe["training"].pop("output_dir", None)
    recipe["data"].pop("train", None)
    return {"recipe": recipe, "data_sha256": sha256(data)}


def train(data: Path, overrides: list[str], output: Path, seed: int, resume: bool,
          evals: list[Path] = ()) -> dict:
    """`embedkit train RECIPE` on `data`; --resume reuses a run of the same recipe, data and overrides that was
    trained, and evaluated on every set whose report is in `evals` when its model folder is gone (--cleanup)."""
    done = output.with_suffix(".result.json")
    sets = [f"data.train={data}", f"training.seed={seed}", "training.progress=false", *overrides]
    if MAX_STEPS:
        sets.append(f"training.max_steps={MAX_STEPS}")
    settings = trained_settings(data, sets)
    if resume and done.is_file() and ((output / "model.safetensors").is_file()
                                      or all(e.is_file() for e in evals)):
        run = json.loads(done.read_text())
        if run.get("settings") == settings:
            print(f"  --resume: reusing {output.name}", flush=True)
            return run
    for report in evals:  # the reports of another model
        report.unlink(missing_ok=True)
    started = time.perf_counter()
    cli("train", RECIPE, *[a for s in sets for a in ("--set", s)], "-o", str(output))
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines() if line.strip()]
    end = next((e for e in reversed(log) if e.get("event") == "done"), {})
    run = {"settings": settings, "steps": end.get("steps"), "samples": end.get("samples"),
           "train_s": end.get("train_seconds"), "wall_s": time.perf_counter() - started}
    done.write_text(json.dumps(run, indent=2))
    return run


# ---------------------------------------------------------------------------------------------------- statistics
def kendall_tau(a: list[float], b: list[float]) -> float | None:
    """Kendall's tau-b between two score lists over the same models (ties counted as neither order); None with
    fewer than two models or when either list is constant."""
    if len(a) != len(b):
        raise ValueError("kendall_tau: lists of different lengths")
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = ((concordant + discordant + ties_a) * (concordant + discordant + ties_b)) ** 0.5
    return None if denominator == 0 else (concordant - discordant) / denominator


def acceptance(v: dict) -> bool:
    """The issue's bar: label-free beats the base model by >= 0.02 nDCG@10 with the 95% interval above 0."""
    return v["difference"] >= ACCEPT_GAIN and v["ci_low"] > 0


# ---------------------------------------------------------------------------------------------------- main
def run_dataset(dataset: str, args, plan: dict[str, dict], seeds: list[int], styles_needed: set) -> dict:
    work = Path(args.out) / dataset
    work.mkdir(parents=True, exist_ok=True)
    corpus = label_free_corpus(dataset, args.data, work)
    human = human_queries(dataset, args.data)
    docs = None if SMOKE else (args.docs or None)
    row: dict = {"corpus_documents": sum(1 for _ in (corpus / "corpus.jsonl").open(encoding="utf-8")),
                 "synth": {}, "mine": {}, "arms": {}}
    # 1-2. synth and mine each source once; every arm and seed shares them
    mined: dict[tuple, Path] = {}
    synthetic: dict[tuple, set[str]] = {}
    for style, rt, teacher in sorted(styles_needed, key=str):
        out = work / synth_name(style, rt)
        if not style_possible(corpus, style):  # synth would stop: e.g. title on MedQuAD's answers, which have none
            row["synth"][synth_name(style, rt)] = {"skipped": f"no document of the corpus can give a {style} query"}
            print(f"[{dataset}] synth {style}: skipped, no document of the corpus can give one", flush=True)
            continue
        if synth_name(style, rt) not in row["synth"]:
            row["synth"][synth_name(style, rt)] = synth(corpus, out, style, rt, docs, args.resume)
            s = row["synth"][synth_name(style, rt)]
            print(f"[{dataset}] synth {style} (round trip {rt or 'off'}): {s['kept']} of {s['generated_total']} "
                  f"queries kept", flush=True)
        synthetic[(style, rt, teacher)] = {r["query"] for r in read_jsonl(out / "pairs.jsonl")}
        target = work / mined_name(style, rt, teacher)
        if synthetic[(style, rt, teacher)]:  # the filters may have removed every row
            row["mine"][target.name] = mine(out / "pairs.jsonl", corpus, target, args.resume, teacher)
            mined[(style, rt, teacher)] = target
    few_mined = None
    if any(spec["few"] for spec in plan.values()):
        few = few_label_pairs(dataset, args.data, work)
        few_mined = work / f"{dataset}-q{FEW_QUERIES}.mined.jsonl"
        row["mine"][few_mined.name] = mine(few, corpus, few_mined, args.resume)
    task = test_task(dataset, args.data, work)
    row["task"] = task
    eval_sets = {"human": task}
    if args.synthetic_eval:
        out = work / "synthetic-eval"
        row["synthetic_eval"] = synth(corpus, out, "question", ROUND_TRIP_K, args.synthetic_eval, args.resume,
                                      eval_set=True, seed=EVAL_SEED)
        if row["synthetic_eval"].get("kept"):
            eval_sets["synthetic"] = f"beir:{out}:test"
        else:
            print(f"[{dataset}] synthetic eval set: the filters kept no query; no Kendall tau", flush=True)

    def eval_file(name: str, kind: str) -> Path:
        return work / (f"{name}.eval.json" if kind == "human" else f"{name}.{kind}-eval.json")

    def evaluate(model, name: str) -> dict[str, dict]:
        """bench_tune's evaluation of `model` on each eval set, its report (with its time) kept for --resume."""
        out = {}
        for kind, spec in eval_sets.items():
            saved = eval_file(name, kind)
            if args.resume and saved.is_file():
                out[kind] = json.loads(saved.read_text())
                continue
            started = time.perf_counter()
            out[kind] = bench_tune.evaluate(model, spec, Path(args.out) / "cache")
            out[kind]["eval_s"] = time.perf_counter() - started
            saved.write_text(json.dumps(out[kind]))
        return out

    base = evaluate("minilm", "base")
    row["base"] = {kind: ndcg(r) for kind, r in base.items()}
    print(f"[{dataset}] base model nDCG@10 {row['base']['human']:.4f}", flush=True)
    reports: dict[str, dict[str, list]] = {}
    few_rows = read_jsonl(few_mined) if few_mined else []
    few_queries = {r["query"] for r in few_rows}
    for arm, spec in plan.items():
        if any(source not in mined for source in spec["synth"]):
            row["arms"][arm] = {"rows": 0, "skipped": "synth made or kept no pairs of this style"}
            print(f"[{dataset}] {arm}: skipped, {row['arms'][arm]['skipped']}", flush=True)
            continue
        rows = [r for source in spec["synth"] for r in read_jsonl(mined[source])]
        allowed = few_queries if spec["few"] else set()
        if spec["few"]:
            rows = few_rows + rows
        synthetic_queries = set().union(*(synthetic[s] for s in spec["synth"])) if spec["synth"] else set()
        rows, guard = check_label_free(rows, synthetic_queries, human, allowed, corpus)
        data = work / f"train-{arm}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not data.is_file() or data.read_text(encoding="utf-8") != text:
            data.write_text(text, encoding="utf-8")
        runs = []
        reports[arm] = {kind: [] for kind in eval_sets}
        for seed in seeds:
            output = work / f"{arm}-s{seed}"
            run = train(data, spec["overrides"], output, seed, args.resume,
                        [eval_file(output.name, kind) for kind in eval_sets])
            evals = evaluate(output, output.name)
            for kind, report in evals.items():
                reports[arm][kind].append(report)
                run[f"ndcg_at_10_{kind}"] = ndcg(report)
            run["eval_s"] = evals["human"].get("eval_s")
            runs.append(run)
            print(f"[{dataset}] {arm:16s} seed {seed}: {run['steps']} steps in {run['train_s'] or 0:.0f} s, "
                  f"nDCG@10 {run['ndcg_at_10_human']:.4f}", flush=True)
            if args.cleanup and output.is_dir():
                shutil.rmtree(output)  # the .result.json and .eval.json files are what --resume needs
        scores = [r["ndcg_at_10_human"] for r in runs]
        row["arms"][arm] = {"rows": len(rows), "guard": guard, "runs": runs, "ndcg_at_10": statistics.fmean(scores),
                            "ndcg_at_10_sd": statistics.stdev(scores) if len(scores) > 1 else 0.0}
        if "synthetic" in eval_sets:
            row["arms"][arm]["ndcg_at_10_synthetic"] = statistics.fmean(r["ndcg_at_10_synthetic"] for r in runs)
        means = seed_mean_report(reports[arm]["human"])
        row["arms"][arm]["vs_base"] = verdict(base["human"], means, "base model", arm)
    if {"q100", "q100+label-free"} <= reports.keys():
        # what the label-free rows do to a team's hundred labelled queries, both arms at the same schedule
        row["arms"]["q100+label-free"]["vs_q100"] = verdict(reports["q100"]["human"],
                                                             reports["q100+label-free"]["human"], "q100",
                                                             "q100+label-free")
    if "label-free" in row["arms"]:
        row["acceptance"] = {"arm": "label-free", "passed": acceptance(row["arms"]["label-free"]["vs_base"]),
                             "bar": f"difference >= {ACCEPT_GAIN} and 95% interval above 0"}
    if "synthetic" in eval_sets:
        trained = [a for a in row["arms"] if "skipped" not in row["arms"][a]]
        names = ["base", *trained]
        human_scores = [row["base"]["human"], *(row["arms"][a]["ndcg_at_10"] for a in trained)]
        synth_scores = [row["base"]["synthetic"], *(row["arms"][a]["ndcg_at_10_synthetic"] for a in trained)]
        row["kendall_tau"] = {"models": names, "human": human_scores, "synthetic": synth_scores,
                              "tau": kendall_tau(human_scores, synth_scores)}
    return row


def summary(results: dict) -> None:
    print(f"\nLabel-free MiniLM (recipe {RECIPE}), seeds {results['seeds']}"
          + (" (SMOKE: shrunken data, not a measurement)" if results["smoke"] else ""))
    print("| data | arm | training rows | nDCG@10 (mean +- sd) | vs base: diff [95% CI], p(improve), gate | "
          "steps | train s | eval s |")
    print("|---|---|---|---|---|---|---|---|")
    for dataset, row in results["datasets"].items():
        print(f"| {dataset} | base | - | {row['base']['human']:.4f} | - | - | - | - |")
        for arm, a in row["arms"].items():
            if "skipped" in a:
                print(f"| {dataset} | {arm} | 0 | skipped: {a['skipped']} | - | - | - | - |")
                continue
            v = a["vs_base"]
            run = a["runs"][0]
            print(f"| {dataset} | {arm} | {a['rows']} | {a['ndcg_at_10']:.4f} +- {a['ndcg_at_10_sd']:.4f} | "
                  f"{v['difference']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}], p {v['p_improvement']:.3f}, "
                  f"{v['verdict']} | {run['steps']} | {run['train_s'] or 0:.0f} | {run['eval_s'] or 0:.0f} |")
        if "acceptance" in row:
            print(f"{dataset}: acceptance (label-free vs base, {row['acceptance']['bar']}): "
                  f"{'PASSED' if row['acceptance']['passed'] else 'not met'}")
        if "kendall_tau" in row:
            tau = row["kendall_tau"]["tau"]
            k = row["kendall_tau"]
            print(f"{dataset}: Kendall tau, synthetic vs human test order of {len(k['models'])} models: "
                  f"{'- (a constant order)' if tau is None else f'{tau:+.3f}'}; nDCG@10 human / synthetic: "
                  + ", ".join(f"{m} {h:.4f} / {y:.4f}" for m, h, y in zip(k["models"], k["human"], k["synthetic"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="scifact,medquad")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default="/tmp/embedkit-bench-label-free", help="work folder (outputs, models, caches)")
    parser.add_argument("--styles", default=",".join(FREE_STYLES),
                        help="synth styles, one style-S arm each (question: SmolLM2-135M, slow on a CPU)")
    parser.add_argument("--main-style", default="ict", help="the label-free arms' style (default ict)")
    parser.add_argument("--arms", help="comma-separated trained arms (default: all; the base model always runs)")
    parser.add_argument("--seeds", default="42,43,44", help="training seeds of every trained arm")
    parser.add_argument("--docs", type=int, default=1000,
                        help="documents synth samples per style (0: all); BENCH_SMOKE uses its whole small corpus")
    parser.add_argument("--teacher", help="a reranker folder: the pseudo-label arm mines with --teacher DIR (default: "
                                          "the base bi-encoder's own scores)")
    parser.add_argument("--synthetic-eval", type=int, default=0, metavar="N",
                        help="also build a synthetic eval set of N documents (question style, SmolLM2) and report "
                             "Kendall's tau between the models' order on it and on the human test split")
    parser.add_argument("--cleanup", action="store_true", help="delete each model folder after its evaluation")
    parser.add_argument("--resume", action="store_true", help="reuse what an earlier run with the same --out finished")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--record", help="write a bench record (bench/record.py) to this path")
    args = parser.parse_args()

    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    unknown = [s for s in styles if s not in FREE_STYLES + GENERATOR_STYLES]
    if unknown:
        parser.error(f"--styles: unknown {unknown}; choose from {', '.join(FREE_STYLES + GENERATOR_STYLES)}")
    try:
        plan = arm_plan(styles, args.main_style, args.teacher)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    if args.arms:
        chosen = [a.strip() for a in args.arms.split(",") if a.strip()]
        if any(a not in plan for a in chosen):
            parser.error(f"--arms: choose from {', '.join(plan)}")
        plan = {a: plan[a] for a in chosen}
    needed = {source for spec in plan.values() for source in spec["synth"]}
    results = {"recipe": RECIPE, "seeds": seeds, "styles": styles, "main_style": args.main_style,
               "docs": None if SMOKE else args.docs, "queries_per_doc": QUERIES_PER_DOC, "negatives": NEGATIVES,
               "round_trip_k": ROUND_TRIP_K, "teacher": args.teacher, "smoke": SMOKE, "max_steps": MAX_STEPS,
               "command": " ".join(sys.argv), "datasets": {}}
    started = time.perf_counter()
    for dataset in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        if dataset not in bench_tune.DATASETS:
            parser.error(f"--datasets: unknown {dataset}")
        results["datasets"][dataset] = run_dataset(dataset, args, plan, seeds, needed)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    results["wall_s"] = time.perf_counter() - started
    summary(results)
    print(f"wall time {results['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.record:
        from record import write_record

        write_record(args.record, results, command="bench/bench_label_free.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
