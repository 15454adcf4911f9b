"""Benchmark: `embedkit tune` against the default recipe and sentence-transformers' default trainer.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    .venv/bin/python bench/bench_tune.py --datasets scifact,medquad --budget 60m --json /tmp/bench_tune.json
    BENCH_SMOKE=1 BENCH_MAX_STEPS=2 .venv/bin/python bench/bench_tune.py --budget 2 --seeds 1   # smoke test

Per data set (MiniLM, recipes/minilm-<dataset>.yaml, 2 threads):
1. tune: `embedkit tune` on the *train* split only (its `data.dev` is removed, so the dev split is carved from the
   training queries; the test split is never seen), `--budget` (default 60m) of search, `--no-final`: it writes
   tuned_recipe.yaml. The budget bounds the search; the trials use the recipe's seed.
2. the final trainings, each in its own child process, once per seed of `--seeds` (default 42,43,44):
   - tuned: tuned_recipe.yaml with training.seed = the seed;
   - default: the recipe as written (the same data: SciFact's 919 train pairs, MedQuAD's seeded 1,000-pair sample);
   - st: sentence-transformers' SentenceTransformerTrainer + MultipleNegativesRankingLoss with its default training
     arguments (lr 5e-5, 3 epochs, no warmup, no weight decay), except the batch size (the recipe's 32: in-batch
     negatives are the loss's whole point, and ST's default of 8 leaves 7), the NO_DUPLICATES batch sampler ST's
     documentation recommends for that loss, and the recipe's attention dropout (0; hidden dropout stays 0.1 on both
     sides, as in bench_train.py); same pairs, same max length (256), same threads; the trainer's seed is the
     bench seed x 1000 (st_seed: ST's sampler seeds epoch e with seed + e, so nearby seeds would share epoch orders);
   - st-mined: the compute-matched peer. sentence-transformers' own `util.mine_hard_negatives` (FAISS, the base model,
     the tuned recipe's rank window, negatives count, sampling and relative margin, from the same pool: the BEIR
     corpus of a `beir:` training set, else the training positives), then the same trainer for the tuned recipe's
     epochs (ST's other defaults, the matched dropout and sampler as above). ST's miner returns only rows that got
     all their negatives (output_format n-tuple): the result records how many it kept. What it cannot match is the
     tuned recipe's online re-mining (ST has none) and its searched lr / temperature: that is what tune adds;
3. every model (and the base model) is evaluated on the *test* split by embedkit's evaluation runner (what
   `embedkit eval` runs); nDCG@10 is the mean +- sd over the seeds, and each verdict is `embedkit compare` on the
   per-query nDCG@10 averaged over the seeds (difference, 95% interval, p(improvement), the default gate at a 0.01
   margin): tuned vs default, tuned vs ST, tuned vs base.

Few labels (`--queries 100 --subsamples 1,2`): every arm, the search included, trains on a seeded sample of 100 of
the recipe's training queries (MedQuAD: of its 1,000-pair sample; SciFact: of its train qrels), what a team with a
hundred labelled questions has; the test split is the full one. Each sample is its own row (<dataset>-q100-sub<k>).

Environment: BENCH_MAX_STEPS=N caps the optimizer steps of every training (the trials, the final runs, ST's);
BENCH_SMOKE=1 also shrinks the data (48 training pairs, a 100-document dev corpus, a 30-query / 300-document cut of
the test split) so the whole script runs in minutes: a check of the script, not a measurement.

Expected duration on 2 cores with nothing else running: tune 60 min of search per data set, plus the base model's
ranking of the dev candidates (MedQuAD: 14,070 answers, 6 min); the final runs: default ~2.5 min and ST ~11 min per
seed on MedQuAD, the tuned recipe as long as its schedule (MedQuAD's second search chose 6 epochs with a mined
negative: ~30 min per seed); evaluation ~70 min (SciFact: 10 encodings of its 5,183 abstracts) and ~20 min
(MedQuAD). About 8-9 h for both data sets: run one data set at a time into a kept --out (e.g.
runs/bench-tune), and `--resume` continues an interrupted run where it stopped (the finished search when --budget
is the same, every trained model, every evaluation) instead of starting over. A run that was trained and evaluated
is reused from its two small files (<out>/<dataset>-<arm>-s<seed>.result.json and .eval.json) even when the model
folder is gone: bench/records/tune/ keeps those files (and the search's summary, report and tuned recipe) of the
runs behind the README's table, so a bench longer than one machine's life continues on the next one
(`cp -r bench/records/tune/. runs/bench-tune/`, then the same command with --resume).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]

DATASETS = {
    "scifact": {"recipe": "recipes/minilm-scifact.yaml", "train": "beir:{data}/scifact:train",
                "test": ("{data}/scifact", "test")},
    "medquad": {"recipe": "recipes/minilm-medquad.yaml", "train": "{data}/medquad/train_pairs.jsonl",
                "test": ("{data}/medquad/test", "test")},
}
ARMS = ("default", "tuned", "st", "st-mined")
# Not in the default --arms: candidate default recipes of issue #30 item 3, each compared with the recipe as written
# (`<arm>_vs_default`) and with ST's default trainer (`<arm>_vs_st`). A candidate becomes the default only if it wins
# on both data sets at both sizes over 3 seeds; its values come from outside these test splits:
# - steps: the recipe as written with a floor of optimizer steps (tune's MIN_STEPS);
# - schedule: sentence-transformers' default schedule (lr 5e-5, 3 epochs: what its users train with on every kind of
#   corpus) plus one positive-aware negative mined online with the recipe format's mining defaults (window 10:100,
#   relative margin 0.05): every search so far chose mined negatives and more than one epoch;
# - st-schedule: sentence-transformers' default schedule whole (lr 5e-5, 3 epochs, no warm-up, no weight decay) in
#   embedkit's trainer, no negatives: the same training as the `st` arm, so it separates the trainer from the recipe.
#   It won on both data sets at both sizes and is the MiniLM recipes' schedule since 2026-12-07 (docs/tune.md, "The
#   default recipe"): on today's recipes it trains what `default` trains (one shared run);
# - former: the MiniLM recipes' schedule before that (lr 2e-5, 1 epoch, 10% warm-up, weight decay 0.01), so the
#   comparison behind the change can be re-run at any later commit.
CANDIDATE_ARMS = ("steps", "schedule", "st-schedule", "former")
ST_ARMS = ("st", "st-mined")  # trained by sentence-transformers; every other arm by embedkit
CANDIDATE_MIN_STEPS = 150  # embedkit/tune/space.py's MIN_STEPS: the epochs' bound a search already uses
CANDIDATE_SETS = {"steps": [f"training.min_steps={CANDIDATE_MIN_STEPS}"],
                  "schedule": ["training.lr=5e-5", "training.epochs=3", "loss.hard_negatives=1", "mining.online=true"],
                  "st-schedule": ["training.lr=5e-5", "training.epochs=3", "training.warmup_ratio=0",
                                  "training.weight_decay=0"],
                  "former": ["training.lr=2e-5", "training.epochs=1", "training.warmup_ratio=0.1",
                             "training.weight_decay=0.01"]}
LABELS = {"base": "base model", "default": "default recipe", "tuned": "tuned recipe", "st": "ST default trainer",
          "st-mined": "ST mined + tuned epochs", "steps": f"recipe + min_steps {CANDIDATE_MIN_STEPS}",
          "schedule": "recipe + lr 5e-5, 3 epochs, 1 mined negative",
          "st-schedule": "recipe + ST's schedule (lr 5e-5, 3 epochs, no warm-up or decay)",
          "former": "former recipe (lr 2e-5, 1 epoch, warm-up 0.1, decay 0.01)"}
THREADS = 2
MAX_LENGTH = 256
SMOKE = os.environ.get("BENCH_SMOKE") == "1"
MAX_STEPS = os.environ.get("BENCH_MAX_STEPS")
COLLECTION = 2000  # documents of a few-label row's collection (subsample_queries)
SMOKE_SIZES = {"train_pairs": 48, "dev_docs": 100, "test_queries": 30, "test_docs": 300}


def recipe_overrides(dataset: str, data_root: str, train: str | None = None, extra: list[str] = ()) -> list[str]:
    """The recipe's own settings, on the train split only (no dev: tune carves one from the training queries);
    `train`: a subsample of it (`subsample_queries`) instead."""
    overrides = [f"data.train={train or DATASETS[dataset]['train'].format(data=data_root)}", "data.dev=null",
                 "training.progress=false", f"training.threads={THREADS}"]
    if train:
        overrides += ["data.max_examples=null", *extra]
    if SMOKE and not train:
        overrides += [f"data.max_examples={SMOKE_SIZES['train_pairs']}", "data.sample=random"]
    if MAX_STEPS:
        overrides.append(f"training.max_steps={MAX_STEPS}")
    return overrides


def write_if_changed(path: Path, text: str) -> None:
    """Write `text` unless `path` holds it already: a second bench on the same --out (another arm, run beside the
    first) must not truncate a sample file that the first one's training is reading."""
    if not (path.is_file() and path.read_text() == text):
        path.write_text(text)


def subsample_queries(dataset: str, data_root: str, work: Path, queries: int, sample: int) -> tuple[str, list[str]]:
    """A seeded sample of `queries` of the recipe's training queries (every pair of each, as the recipe reads them:
    MedQuAD's 1,000-pair sample, SciFact's train qrels), written under `work`; returns its data.train spec. What a
    team with ~100 labelled questions has (the few-label case of issue #30)."""
    from embedkit.train.config import load_recipe

    recipe = load_recipe(DATASETS[dataset]["recipe"], recipe_overrides(dataset, data_root), check_environment=False)
    rng = random.Random(1000 + sample)
    folder = work / f"{dataset}-q{queries}-sub{sample}"
    spec = str(recipe.data.train)
    if spec.startswith("beir:"):
        from embedkit.data.beir import load_beir

        path, split = spec[len("beir:"):].rsplit(":", 1)
        ds = load_beir(path, split)
        qids = sorted(rng.sample(ds.judged_query_ids(), min(queries, len(ds.judged_query_ids()))))
        (folder / "qrels").mkdir(parents=True, exist_ok=True)
        for name in ("corpus.jsonl", "queries.jsonl"):
            target = folder / name
            if not target.exists():
                target.symlink_to(Path(path).resolve() / name)
        write_if_changed(folder / "qrels" / "train.tsv", "query-id\tcorpus-id\tscore\n" + "".join(
            f"{q}\t{d}\t{s}\n" for q in qids for d, s in ds.qrels[q].items() if s > 0))
        return f"beir:{folder}:train", []
    from embedkit.train.contrastive import load_examples

    examples, _ = load_examples(recipe)
    distinct = sorted({e.query for e in examples})
    texts = sorted(rng.sample(distinct, min(queries, len(distinct))))  # BENCH_SMOKE has fewer
    keep = set(texts)
    # The team's documents beside its labelled pairs, as mining.corpus, so the dev corpus and mined negatives come
    # from a collection, not from the 100 positives alone: the positives and a seeded sample of the training file's
    # other answers, COLLECTION documents in all (MedQuAD's 14,070 would cost every trial minutes per mining round on
    # 2 cores; a team's collection of a few thousand documents is the case this row stands for).
    folder.mkdir(parents=True, exist_ok=True)
    cols = recipe.data.columns
    from embedkit.data.tuples import read_examples

    positives = list(dict.fromkeys(e.positive for e in examples if e.query in keep))
    answers = [a for a in dict.fromkeys(e.positive for e in read_examples(Path(spec), query=cols.query,
                                                                          positive=cols.positive))
               if a not in set(positives)]
    collection = positives + rng.sample(answers, min(len(answers), max(0, COLLECTION - len(positives))))
    write_if_changed(folder / "corpus.jsonl", "".join(json.dumps({"_id": f"a{i}", "title": "", "text": t}) + "\n"
                                                      for i, t in enumerate(collection)))
    write_if_changed(folder / "train.jsonl", "".join(
        json.dumps({cols.query: e.query, cols.positive: e.positive}) + "\n" for e in examples if e.query in keep))
    return str(folder / "train.jsonl"), [f"mining.corpus={folder / 'corpus.jsonl'}"]


# ---------------------------------------------------------------------------------------------------- children
def child_embedkit(recipe: str, overrides: list[str], output: Path, seed: int) -> dict:
    from embedkit.train.config import load_recipe
    from embedkit.train.contrastive import train

    parsed = load_recipe(recipe, [*overrides, f"training.seed={seed}", f"training.output_dir={output}"])
    started = time.perf_counter()
    result = train(parsed)
    return {"steps": result.steps, "samples": result.samples, "train_s": time.perf_counter() - started,
            "recipe": parsed.model_dump(mode="json")}


def st_settings(arm: str, recipe: str, overrides: list[str]) -> dict:
    """What the sentence-transformers arm trains with, from the recipe it is matched to (the default recipe for `st`,
    the tuned one for `st-mined`): written into the run's result, and compared by --resume."""
    from embedkit.train.config import load_recipe

    parsed = load_recipe(recipe, overrides)
    settings = {"learning_rate": 5e-5, "num_train_epochs": 3, "warmup_ratio": 0.0, "weight_decay": 0.0,
                "batch_size": parsed.training.batch_size, "batch_sampler": "no_duplicates",
                "attention_dropout": parsed.model.attention_dropout,
                "seed": st_seed(parsed.training.seed)}
    if arm == "st-mined":
        settings["num_train_epochs"] = parsed.training.epochs
        negatives = parsed.loss.hard_negatives or 0
        if negatives:
            lo, hi = (int(x) for x in parsed.mining.range.split(":"))
            settings["mining"] = {"num_negatives": negatives, "range_min": lo, "range_max": hi,
                                  "sampling_strategy": parsed.mining.sampling,
                                  "relative_margin": parsed.mining.relative_margin, "output_format": "n-tuple",
                                  "use_faiss": True}
    return settings


def st_seed(seed: int) -> int:
    """The seed a sentence-transformers run gets for the bench's `seed` (its `seed` and `data_seed`). ST's batch
    samplers seed epoch e with the trainer's `seed` + e (not `data_seed`, which they ignore), so seed = 42, 43, 44
    gave the three runs two of their three epoch orders in common (42's second epoch is 43's first): three runs that
    were not three draws. The ST arms of the records before 2026-12-07 ran that way; seed * 1000 keeps the seeds'
    orders apart, as embedkit's own seed * 1000 + epoch does."""
    return seed * 1000


def mteb_text(document: dict) -> str:
    from embedkit.data.beir import mteb_document_text

    return mteb_document_text(document.get("title", ""), document["text"])


def st_mining_corpus(parsed) -> list[str] | None:
    """The pool the tuned recipe mines from: a `beir:` training set's whole corpus, else None (ST then mines from the
    training positives, which is embedkit's pool for a pairs file too)."""
    if parsed.mining.corpus is not None:  # the pairs' document collection (a few-label row)
        from embedkit.data.beir import read_corpus

        return [mteb_text(d) for d in read_corpus(Path(parsed.mining.corpus)).values()]
    spec = parsed.data.train
    if not str(spec).startswith("beir:"):
        return None
    from embedkit.data.beir import load_beir, mteb_document_text

    parts = str(spec)[len("beir:"):].rsplit(":", 1)
    ds = load_beir(parts[0], parts[1] if len(parts) > 1 else "train")
    # the positives' own text form (embedkit.data.tuples), so that ST's miner recognises and skips them
    return [mteb_document_text(d.get("title", ""), d["text"]) for d in ds.corpus.values()]


def child_st(arm: str, recipe: str, overrides: list[str], output: Path, seed: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)
    from sentence_transformers.training_args import BatchSamplers
    from sentence_transformers.util import mine_hard_negatives

    from embedkit.models.registry import minilm_path
    from embedkit.train.config import load_recipe
    from embedkit.train.contrastive import load_examples

    settings = st_settings(arm, recipe, [*overrides, f"training.seed={seed}"])
    parsed = load_recipe(recipe, [*overrides, f"training.seed={seed}"])
    examples, _ = load_examples(parsed)  # the very pairs the embedkit arms train on
    # Matched to embedkit's recipe: its attention dropout (hidden dropout stays 0.1 on both sides).
    model = SentenceTransformer(str(minilm_path()), device="cpu",
                                config_kwargs={"attention_probs_dropout_prob": settings["attention_dropout"]})
    assert model[0].auto_model.config.attention_probs_dropout_prob == settings["attention_dropout"]
    model.max_seq_length = MAX_LENGTH
    data = Dataset.from_dict({"anchor": [e.query for e in examples], "positive": [e.positive for e in examples]})
    mined = {}
    if "mining" in settings:
        started = time.perf_counter()
        data = mine_hard_negatives(data, model, corpus=st_mining_corpus(parsed), batch_size=64, verbose=False,
                                   **settings["mining"])
        mined = {"rows_in": len(examples), "rows_kept": len(data), "mine_s": time.perf_counter() - started}
        print(f"[st-mined] ST's miner kept {len(data)} of {len(examples)} rows (all their negatives found)",
              flush=True)
    args = SentenceTransformerTrainingArguments(  # ST's defaults otherwise: lr 5e-5, no warmup, no decay
        output_dir=str(output) + ".st-work", per_device_train_batch_size=settings["batch_size"],
        seed=settings["seed"], data_seed=settings["seed"], batch_sampler=BatchSamplers.NO_DUPLICATES, use_cpu=True,
        report_to=[], save_strategy="no", num_train_epochs=settings["num_train_epochs"], disable_tqdm=True,
        max_steps=int(MAX_STEPS or -1))
    assert (args.learning_rate, args.warmup_ratio or 0.0, args.weight_decay) == (
        settings["learning_rate"], settings["warmup_ratio"], settings["weight_decay"]), "ST's defaults changed"
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                         loss=losses.MultipleNegativesRankingLoss(model))
    started = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - started
    model.save(str(output))
    shutil.rmtree(str(output) + ".st-work", ignore_errors=True)
    return {"steps": out.global_step, "train_s": wall, "settings": settings, **({"mined": mined} if mined else {})}


def run_child(kind: str, recipe: str, overrides: list[str], output: Path, seed: int) -> dict:
    """`kind`: embedkit, st or st-mined; trained in a child process (peak memory and state of one run only)."""
    result_file = output.with_suffix(".result.json")
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", kind, "--recipe", recipe, "--output", str(output), "--seed",
           str(seed), "--result", str(result_file), *[f"--set={o}" for o in overrides]]
    started = time.perf_counter()
    code = subprocess.run(cmd, cwd=REPO).returncode
    if code != 0:
        raise SystemExit(f"{kind} training (seed {seed}) failed with exit code {code}")
    result = json.loads(result_file.read_text())
    result["child_wall_s"] = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------------------------------- parent
def trained_another_recipe(done: Path, arm: str, recipe: str, overrides: list[str], seed: int) -> bool:
    """Whether the run recorded in `done` trained other settings than `arm` would now (an embedkit arm records its
    recipe, a sentence-transformers arm its settings: runs from before the dropout was matched are trained again)."""
    ran_json = json.loads(done.read_text())
    if arm in ST_ARMS:
        return ran_json.get("settings") != st_settings(arm, recipe, [*overrides, f"training.seed={seed}"])
    from embedkit.train.config import load_recipe

    ran = ran_json.get("recipe") or {}
    now = load_recipe(recipe, [*overrides, f"training.seed={seed}"]).model_dump(mode="json")
    for settings in (ran, now):  # where the model went is not a setting (records move between checkouts)
        settings.get("training", {}).pop("output_dir", None)
    return ran != _without_new_defaults(load_recipe(recipe, [*overrides, f"training.seed={seed}"]), now, ran)


def _without_new_defaults(model, now: dict, ran: dict) -> dict:
    """`now` (the dump of the recipe object `model`) less the fields that `ran` lacks and that hold their default:
    recipe fields added since that run (task, training.min_steps, ...), which cannot have changed what it trained."""
    from pydantic import BaseModel

    out = {}
    for key, value in now.items():
        field = type(model).model_fields.get(key) if isinstance(model, BaseModel) else None
        if key not in ran and field is not None:
            default = field.get_default(call_default_factory=True)
            if (default.model_dump(mode="json") if isinstance(default, BaseModel) else default) == value:
                continue
        if isinstance(value, dict) and isinstance(ran.get(key), dict):
            value = _without_new_defaults(getattr(model, key, None), value, ran[key])
        out[key] = value
    return out


def resolved_training(recipe: str, overrides: list[str], seed: int) -> str:
    """What an embedkit arm trains, as one comparable string: the recipe with its overrides and the seed, the output
    folder left out. Two arms with the same string train the same model (training is seeded and deterministic on
    CPU), so the second reuses the first's run: a search that changed nothing makes `tuned` the recipe as written."""
    from embedkit.train.config import load_recipe

    dump = load_recipe(recipe, [*overrides, f"training.seed={seed}"]).model_dump(mode="json")
    dump["training"].pop("output_dir", None)
    return json.dumps(dump, sort_keys=True)


def test_task(dataset: str, data_root: str, work: Path) -> str:
    """The test split as an eval task spec; under BENCH_SMOKE a seeded cut of it (queries and documents)."""
    folder, split = DATASETS[dataset]["test"]
    folder = folder.format(data=data_root)
    if not SMOKE:
        return f"beir:{folder}:{split}"
    from embedkit.data.beir import load_beir

    ds = load_beir(folder, split)
    rng = random.Random(0)
    qids = sorted(rng.sample(ds.judged_query_ids(), min(SMOKE_SIZES["test_queries"], len(ds.judged_query_ids()))))
    keep = {d for q in qids for d, s in ds.qrels[q].items() if s > 0}
    others = [d for d in ds.corpus if d not in keep]
    keep |= set(rng.sample(others, max(0, min(len(others), SMOKE_SIZES["test_docs"] - len(keep)))))
    cut = work / f"{dataset}-test-cut"
    shutil.rmtree(cut, ignore_errors=True)
    (cut / "qrels").mkdir(parents=True)
    (cut / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, **ds.corpus[d]}) + "\n"
                                              for d in ds.corpus if d in keep))
    (cut / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": ds.queries[q]}) + "\n" for q in qids))
    (cut / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{s}\n" for q in qids for d, s in ds.qrels[q].items() if d in keep))
    return f"beir:{cut}:{split}"


def evaluate_once(model: str | Path, task: str, cache: Path, saved: Path, resume: bool) -> dict:
    """evaluate(), its report kept in `saved` so that --resume does not encode the corpus again."""
    if resume and saved.is_file():
        return json.loads(saved.read_text())
    report = evaluate(model, task, cache)
    saved.write_text(json.dumps(report))
    return report


def evaluate(model: str | Path, task: str, cache: Path) -> dict:
    import torch

    from embedkit.eval.runner import evaluate as run
    from embedkit.models.encoder import load_model

    torch.set_num_threads(THREADS)
    return run(load_model(model, max_length=MAX_LENGTH), [task], batch_size=64, cache_dir=cache)


def ndcg(report: dict) -> float:
    (task,) = report["results"].values()
    return task["metrics"]["ndcg_at_10"]


def seed_mean_report(reports: list[dict]) -> dict:
    from bench_train import seed_mean_report as mean_report  # stdlib-only imports at its top

    return mean_report(reports)


def verdict(baseline: dict | list[dict], candidate: dict | list[dict], name_b: str, name_c: str) -> dict:
    """`embedkit compare` between two arms: over the queries of the seed-averaged models, and, given each arm's
    per-seed reports, over the seeds too (the training run's own noise, which the first one leaves out)."""
    from bench_train import verdict_between

    return verdict_between(baseline, candidate, name_b, name_c, seed=0)


def tune_dataset(dataset: str, data_root: str, work: Path, budget: str, resume: bool = False, *,
                 name: str | None = None, train: str | None = None, extra: list[str] = ()) -> dict:
    """`embedkit tune` as a user runs it, on the train split only (or the subsample `train`, named `name`); returns
    its JSON summary and its wall time.

    With `resume`, a search that an earlier run with the same --out and --budget finished is reused."""
    name = name or dataset
    out = work / f"{name}-tune"
    saved = work / f"{name}-tune.summary.json"
    if resume and saved.is_file():
        summary = json.loads(saved.read_text())
        if summary.get("budget") == budget and Path(summary["tuned_recipe"]).is_file():
            print(f"[{dataset}] --resume: reusing the search in {out} (budget {budget})", flush=True)
            return summary
    cmd = [sys.executable, "-m", "embedkit.cli", "tune", DATASETS[dataset]["recipe"], "--budget", budget, "-o",
           str(out), "--no-final", "--json", *[f"--set={o}" for o in recipe_overrides(dataset, data_root, train, extra)]]
    if resume and (out / "search_state.json").is_file():
        cmd.append("--resume")  # an interrupted search goes on
    if SMOKE:
        cmd += ["--dev-docs", str(SMOKE_SIZES["dev_docs"]), "--dev-corpus", "random"]  # no ranking of the whole file
    print(f"[{dataset}] {' '.join(cmd[2:])}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"embedkit tune on {dataset} failed with exit code {proc.returncode}")
    summary = json.loads(proc.stdout)
    summary["wall_s"] = time.perf_counter() - started
    report = json.loads((out / "tune_report.json").read_text())
    summary["trial_states"] = [t["state"] for t in report["trials"]]
    summary["changes"] = report["changes"]
    summary["search_seconds"] = report["search_seconds"]
    summary["budget"] = budget
    saved.write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="scifact,medquad")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--budget", default="60m", help="embedkit tune --budget per data set (default 60m)")
    parser.add_argument("--seeds", default="42,43,44", help="seeds of the final trainings (every arm)")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"comma-separated from {', '.join(ARMS + CANDIDATE_ARMS)} (steps, schedule: candidate "
                             "default recipes, see CANDIDATE_ARMS)")
    parser.add_argument("--out", default="/tmp/embedkit-bench-tune", help="work folder (models, caches)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--record", type=Path,
                        help="also write a record (bench/record.py) of the figures a README may quote: per data set "
                             "the base model, each arm's per-seed nDCG@10, mean, sd and steps, every verdict")
    parser.add_argument("--queries", type=int,
                        help="few labels: train every arm on a seeded sample of this many training queries (e.g. 100)")
    parser.add_argument("--subsamples", default="1",
                        help="with --queries: which seeded samples (comma-separated numbers, e.g. 1,2)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse what an earlier run with the same --out finished (the search when --budget is the "
                             "same, each trained model and its evaluation): the whole bench is hours on 2 cores")
    parser.add_argument("--child", choices=["embedkit", *ST_ARMS],
                        help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.child == "embedkit":
            result = child_embedkit(args.recipe, args.set, Path(args.output), args.seed)
        else:
            result = child_st(args.child, args.recipe, args.set, Path(args.output), args.seed)
        Path(args.result).write_text(json.dumps(result))
        return

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or any(a not in ARMS + CANDIDATE_ARMS for a in arms):
        parser.error(f"--arms: choose from {', '.join(ARMS + CANDIDATE_ARMS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: not a comma-separated list of integers: {args.seeds!r}")
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"budget": args.budget, "seeds": seeds, "arms": arms, "smoke": SMOKE, "max_steps": MAX_STEPS,
                     "command": " ".join(sys.argv), "datasets": {}}

    def write_json() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    results["queries"] = args.queries
    runs_of = [(d, None) for d in args.datasets.split(",")] if not args.queries else [
        (d, int(k)) for d in args.datasets.split(",") for k in args.subsamples.split(",")]
    for dataset, sample in runs_of:
        name = dataset if sample is None else f"{dataset}-q{args.queries}-sub{sample}"
        train, extra_sets = (None, []) if sample is None else subsample_queries(dataset, args.data, work,
                                                                                args.queries, sample)
        task = test_task(dataset, args.data, work)
        row: dict = {"task": task, "train": train}
        if not {"tuned", "st-mined"} & set(arms):  # arms that do not depend on the search: --resume reuses them
            row["tune"] = t = {"tuned_recipe": None, "trial_states": [], "skipped": True}
        else:
            row["tune"] = t = tune_dataset(dataset, args.data, work, args.budget, args.resume, name=name, train=train,
                                           extra=extra_sets)
            print(f"[{dataset}] tune: {len(t['trial_states'])} trials ({t['trial_states'].count('pruned')} pruned) in "
                  f"{t['search_seconds']:.0f} s; best trial {t['best_trial']}, dev {t['metric']} {t['dev']:.4f}; "
                  f"changed: {'; '.join(t['changes']) or 'nothing'}", flush=True)
        base = evaluate_once("minilm", task, work / "cache", work / f"{dataset}-base.eval.json", args.resume)
        row["base"] = {"ndcg_at_10": ndcg(base)}
        print(f"[{dataset}] base model nDCG@10 {row['base']['ndcg_at_10']:.4f}", flush=True)
        overrides = recipe_overrides(dataset, args.data, train, extra_sets)
        recipes = {"default": (DATASETS[dataset]["recipe"], overrides),
                   "tuned": (t["tuned_recipe"], []),
                   "st": (DATASETS[dataset]["recipe"], overrides),
                   "st-mined": (t["tuned_recipe"], []),  # matched to the tuned recipe's epochs and negatives
                   **{c: (DATASETS[dataset]["recipe"], [*overrides, *CANDIDATE_SETS[c]]) for c in CANDIDATE_ARMS}}
        reports: dict[str, list[dict]] = {arm: [] for arm in arms}
        trained: dict[str, Path] = {}  # resolved_training -> the output of the arm that trained it (embedkit arms)
        for arm in arms:
            runs = []
            for seed in seeds:
                output = work / f"{name}-{arm}-s{seed}"
                recipe, extra = recipes[arm]
                done = output.with_suffix(".result.json")
                evaluated = output.with_suffix(".eval.json")
                same = None if arm in ST_ARMS else resolved_training(recipe, extra, seed)
                twin = trained.get(same) if same else None
                if twin is not None:
                    print(f"[{dataset}] {arm} seed {seed} trains what {twin.name} trained (same recipe and seed): "
                          "reusing its run and evaluation", flush=True)
                    done.write_text(twin.with_suffix(".result.json").read_text())
                    evaluated.write_text(twin.with_suffix(".eval.json").read_text())
                # an earlier run with this --out trained it (and perhaps evaluated it: then the model may be gone)
                reuse = twin is not None or args.resume and done.is_file() and (
                    (output / "model.safetensors").is_file() or evaluated.is_file())
                if reuse and twin is None and trained_another_recipe(done, arm, recipe, extra, seed):
                    # e.g. a search run again chose other values: the run it left is not this recipe's
                    print(f"[{dataset}] --resume: {output.name} trained another recipe than {recipe}; training "
                          "again", flush=True)
                    evaluated.unlink(missing_ok=True)
                    reuse = False
                if reuse:
                    run = json.loads(done.read_text())
                    if twin is None:
                        print(f"[{dataset}] --resume: reusing {output}", flush=True)
                    else:
                        run["same_as"] = twin.name
                else:
                    run = run_child(arm if arm in ST_ARMS else "embedkit", recipe, extra, output, seed)
                    done.write_text(json.dumps(run))
                report = evaluate_once(output, task, work / "cache", evaluated, args.resume or twin is not None)
                if same:
                    trained.setdefault(same, output)
                reports[arm].append(report)
                run["ndcg_at_10"] = ndcg(report)
                runs.append(run)
                print(f"[{dataset}] {arm:8s} seed {seed}: {run['steps']} steps in {run['train_s']:.0f} s, "
                      f"nDCG@10 {run['ndcg_at_10']:.4f}", flush=True)
            scores = [r["ndcg_at_10"] for r in runs]
            row[arm] = {"runs": runs, "ndcg_at_10": statistics.fmean(scores),
                        "ndcg_at_10_sd": statistics.stdev(scores) if len(scores) > 1 else 0.0}
            write_json()
        sides: dict[str, dict | list[dict]] = {**reports, "base": base}  # each arm's per-seed reports
        row["verdicts"] = {}
        for other in [a for a in ("default", "st", "st-mined", "base") if a in sides and "tuned" in sides]:
            row["verdicts"][f"tuned_vs_{other}"] = verdict(sides[other], sides["tuned"], LABELS[other], "tuned")
        for candidate in [c for c in CANDIDATE_ARMS if c in sides]:
            for other in [a for a in ("default", "st") if a in sides]:
                row["verdicts"][f"{candidate}_vs_{other}"] = verdict(sides[other], sides[candidate], LABELS[other],
                                                                     LABELS[candidate])
        results["datasets"][name] = row
        write_json()
    summary(results)
    write_json()
    if args.record:
        from record import write_record  # bench/record.py (bench/ is on sys.path: this is a script)

        write_record(args.record, record_values(results), command=" ".join(["bench/bench_tune.py", *sys.argv[1:]]))
        print(f"record: {args.record}")


def record_values(results: dict) -> dict:
    """The figures of `results` a README may quote, without the runs' recipes and logs (those stay in --json)."""
    values = {k: results[k] for k in ("budget", "seeds", "arms", "queries", "smoke", "max_steps")}
    values["datasets"] = {}
    for name, row in results["datasets"].items():
        t = row["tune"]
        out = {"base": row["base"]["ndcg_at_10"], "verdicts": row["verdicts"],
               "tune": {k: t.get(k) for k in ("trial_states", "search_seconds", "best_trial", "dev", "changes")}}
        for arm in results["arms"]:
            runs = row[arm]["runs"]
            out[arm] = {"per_seed": [r["ndcg_at_10"] for r in runs], "mean": row[arm]["ndcg_at_10"],
                        "sd": row[arm]["ndcg_at_10_sd"], "steps": [r["steps"] for r in runs],
                        **({"settings": runs[0]["settings"]} if "settings" in runs[0] else {})}
        values["datasets"][name] = out
    return values


def summary(results: dict) -> None:
    arms = results["arms"]
    print(f"\nembedkit tune, budget {results['budget']} per data set; final trainings over seeds {results['seeds']}"
          + (" (SMOKE: shrunken data, not a measurement)" if results["smoke"] else ""))
    head = "| data | tune (trials, pruned) | base | " + " | ".join(f"{LABELS[a]} (mean +- sd)" for a in arms)
    others = [a for a in ("default", "st", "st-mined", "base") if a in arms or a == "base"]
    head += " | " + " | ".join(f"tuned vs {LABELS[o]}: diff [95% CI], p(improve), gate" for o in others) + " |"
    print(head)
    print("|---" * (3 + len(arms) + len(others)) + "|")
    for dataset, row in results["datasets"].items():
        t = row["tune"]
        cells = [dataset, f"{len(t['trial_states'])}, {t['trial_states'].count('pruned')}",
                 f"{row['base']['ndcg_at_10']:.4f}"]
        cells += [f"{row[a]['ndcg_at_10']:.4f} +- {row[a]['ndcg_at_10_sd']:.4f}" for a in arms]
        for o in others:
            v = row["verdicts"].get(f"tuned_vs_{o}")
            cells.append("-" if v is None else f"{v['difference']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}], "
                                               f"p {v['p_improvement']:.3f}, {v['verdict']}")
        print("| " + " | ".join(cells) + " |")
    for dataset, row in results["datasets"].items():
        for candidate in CANDIDATE_ARMS:
            for other in ("default", "st"):
                v = row["verdicts"].get(f"{candidate}_vs_{other}")
                if v is not None:
                    seeds = v.get("over_seeds") or {}
                    print(f"{dataset}: {LABELS[candidate]} vs {LABELS[other]}: {v['difference']:+.4f} "
                          f"[{v['ci_low']:+.4f}, {v['ci_high']:+.4f}] over queries, p(improvement) "
                          f"{v['p_improvement']:.3f}, {v['verdict']}"
                          + (f"; over seeds [{seeds['ci_low']:+.4f}, {seeds['ci_high']:+.4f}]"
                             if seeds.get("ci_low") is not None else ""))


if __name__ == "__main__":
    main()
