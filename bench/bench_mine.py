"""Benchmark: embedkit's hard-negative mining against sentence-transformers' `util.mine_hard_negatives`, plus a
false-negative audit of what each one mined.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    .venv/bin/python bench/bench_mine.py --out runs/bench-mine --json runs/bench-mine/result.json

Data (same pairs on both sides):
- scifact: the SciFact train pairs (qrels/train.tsv, score > 0); pool = the whole corpus (5,183 abstracts).
- medquad: a seeded 1,000-pair sample of medquad/train_pairs.jsonl, drawn as the trainer's recipe draws it
  (`sorted(random.Random(42).sample(range(n), 1000))`); pool = the sample's positives.
Settings: all-MiniLM-L6-v2 on both sides; window 10-50, relative margin 0.05, 1 negative, "top" sampling (ST's
default), ST with use_faiss=True and its default output (triplets). embedkit uses the same window, margin, count and
sampling, plus its near-duplicate filter (cosine >= 0.98 to a positive, reported separately), starting from an
empty corpus-embedding cache so both sides encode everything. Times exclude model loading.
One semantic difference (reported, not hidden): ST's range_min/range_max apply to the ranking *after* positives
and margin-filtered candidates are taken out; embedkit's window is over the raw ranking (positives count as ranks).

Audit of each side's mined negatives, all with the same MiniLM embeddings:
- negatives scored above / within 0.02 of their row's positive;
- exact and near duplicates of the positive (cosine >= 0.95 between negative and positive documents);
- negatives that are a positive of another query whose text is near-identical (query cosine >= 0.9), or of any
  other query (SciFact: also of a *test* query, against the base rate of test positives in the corpus);
- MedQuAD: negatives that answer a question on the same topic (`focus`), and same focus + same question type;
- rows lost (pairs without a row in the output).

`--train` runs the training comparison instead (issue #5 acceptance; one dataset at a time with --datasets):

    nice -n 5 .venv/bin/python bench/bench_mine.py --train --datasets scifact,medquad

MiniLM trained by embedkit's trainer (batch 32, lr 2e-5, 1 epoch, max length 256, seed 42, 2 threads) a) without
mined negatives, b) with sentence-transformers' mined negatives, c) with embedkit's, d) with embedkit's online
re-mining; test nDCG@10 of each, mining time of each. See TRAIN_MINING below for the mining settings and why.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WINDOW = (10, 50)
RELATIVE_MARGIN = 0.05
NUM_NEGATIVES = 1


def load_scifact(data: Path) -> dict[str, Any]:
    from embedkit.data import load_beir, pairs_from_beir

    ds = load_beir(data / "scifact", "train")
    test = load_beir(data / "scifact", "test")
    pairs = pairs_from_beir(ds)
    corpus_texts = ds.document_texts()
    text_to_id = {t: i for i, t in zip(ds.corpus, corpus_texts)}
    positives_by_doc: dict[str, set[str]] = {}
    for qid, doc_id, _ in ds.relevant_pairs():
        positives_by_doc.setdefault(doc_id, set()).add(ds.queries[qid])
    test_docs = {doc_id for _, doc_id, _ in test.relevant_pairs()}
    return {"name": "scifact", "pairs": [(p.query, p.positive) for p in pairs], "corpus": corpus_texts,
            "corpus_rows": ds.corpus, "text_to_id": text_to_id, "train_positive_of": positives_by_doc,
            "test_docs": test_docs, "meta": None}


def load_medquad(data: Path, sample: int, seed: int) -> dict[str, Any]:
    rows = [json.loads(line) for line in (data / "medquad" / "train_pairs.jsonl").read_text().splitlines() if line]
    chosen = sorted(random.Random(seed).sample(range(len(rows)), sample))
    rows = [rows[i] for i in chosen]
    meta = {}
    for r in rows:  # answer text -> (focus, qtype) of the pairs it answers
        meta.setdefault(r["positive"], set()).add((r["focus"], r["qtype"]))
    return {"name": "medquad", "pairs": [(r["query"], r["positive"]) for r in rows], "corpus": None,
            "corpus_rows": None, "rows": rows, "answer_meta": meta, "meta": {r["query"]: (r["focus"], r["qtype"])
                                                                              for r in rows}}


def run_st(dataset: dict[str, Any], batch_size: int) -> tuple[list[dict], float, str]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from embedkit.models.registry import minilm_path

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    ds = Dataset.from_dict({"query": [q for q, _ in dataset["pairs"]], "positive": [p for _, p in dataset["pairs"]]})
    log = io.StringIO()
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(log):
        mined = mine_hard_negatives(ds, model, corpus=dataset["corpus"], range_min=WINDOW[0], range_max=WINDOW[1],
                                    relative_margin=RELATIVE_MARGIN, num_negatives=NUM_NEGATIVES,
                                    sampling_strategy="top", batch_size=batch_size, use_faiss=True,
                                    output_scores=True, verbose=True)
    seconds = (time.perf_counter() - t0, time.process_time() - c0)
    rows = [{"query": r["query"], "positive": r["positive"], "negatives": [r["negative"]], "scores": r["scores"]}
            for r in mined]
    return rows, seconds, log.getvalue()


def run_embedkit(dataset: dict[str, Any], batch_size: int, out: Path, cache: Path):
    """Mine with embedkit. The corpus cache starts empty (a miss: everything is encoded, as on the ST side); the
    audit then reads the same document vectors back from it instead of encoding the pool a third time."""
    import numpy as np

    from embedkit.data import TrainingExample
    from embedkit.mine import MiningSettings, mine_to_file, task_from_pairs
    from embedkit.models import load_model

    encoder = load_model("minilm")
    settings = MiningSettings(range_min=WINDOW[0], range_max=WINDOW[1], num_negatives=NUM_NEGATIVES,
                              sampling="top", relative_margin=RELATIVE_MARGIN, duplicate_threshold=0.98,
                              batch_size=batch_size)
    t0, c0 = time.perf_counter(), time.process_time()
    task = task_from_pairs([TrainingExample(q, p) for q, p in dataset["pairs"]], dataset["corpus_rows"],
                           {"kind": "bench", "name": dataset["name"]})
    summary = mine_to_file(encoder, task, out, settings, cache_dir=cache, use_cache=True)
    seconds = (time.perf_counter() - t0, time.process_time() - c0)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    vectors = np.load(summary["corpus_embeddings"]["path"], allow_pickle=False)
    row_of = {t: i for i, t in reversed(list(enumerate(task.corpus_texts)))}
    docs = lambda items: vectors[[row_of[t] for t in items]]  # noqa: E731
    unique_queries = list(dict.fromkeys(q for q, _ in dataset["pairs"]))
    qv = encoder.encode(unique_queries, kind="query", batch_size=batch_size)
    q_row = {t: i for i, t in enumerate(unique_queries)}
    queries = lambda items: qv[[q_row[t] for t in items]]  # noqa: E731
    return rows, seconds, summary, docs, queries


def audit(name: str, dataset: dict[str, Any], rows: list[dict], docs, queries) -> dict[str, Any]:
    import numpy as np

    pairs = dataset["pairs"]
    positives_of: dict[str, set[str]] = {}
    for q, p in pairs:
        positives_of.setdefault(q, set()).add(p)
    neg_rows = [(r["query"], r["positive"], n, r["scores"][0], s) for r in rows
                for n, s in zip(r["negatives"], r["scores"][1:])]
    result: dict[str, Any] = {"rows": len(rows), "pairs_in": len(pairs), "negatives": len(neg_rows),
                              "pairs_without_row": len({(q, p) for q, p in pairs} - {(r["query"], r["positive"])
                                                                                    for r in rows})}
    if not neg_rows:
        return result
    q_text, p_text, n_text = zip(*[(a, b, c) for a, b, c, _, _ in neg_rows])
    pos_s = np.array([d for *_, d, _ in neg_rows])
    neg_s = np.array([e for *_, e in neg_rows])
    qv, pv, nv = queries(list(q_text)), docs(list(p_text)), docs(list(n_text))
    own_pos = np.einsum("ij,ij->i", qv, pv)
    own_neg = np.einsum("ij,ij->i", qv, nv)
    neg_pos_sim = np.einsum("ij,ij->i", nv, pv)
    # The strongest test: the negative is one of the query's *own* known positives (any pair of the same query).
    result["negative_is_known_positive"] = int(sum(n in positives_of[q] for q, n in zip(q_text, n_text)))
    result["negative_above_positive"] = int((own_neg > own_pos).sum())
    result["negative_within_0.02_of_positive"] = int((own_neg > own_pos - 0.02).sum())
    result["negative_identical_text_to_positive"] = int(sum(n == p for p, n in zip(p_text, n_text)))
    result["negative_near_duplicate_of_positive_0.95"] = int((neg_pos_sim >= 0.95).sum())
    result["negative_positive_cosine"] = {"median": round(float(np.median(neg_pos_sim)), 4),
                                          "p90": round(float(np.quantile(neg_pos_sim, 0.9)), 4)}
    result["score_gap_pos_minus_neg"] = {"median": round(float(np.median(pos_s - neg_s)), 4),
                                         "p10": round(float(np.quantile(pos_s - neg_s, 0.1)), 4)}
    # Negatives that are the positive of another query: near-identical query (cos >= 0.9) -> likely false negative.
    owners: dict[str, set[str]] = {}
    for q, p in pairs:
        owners.setdefault(p, set()).add(q)
    other_q, sibling = 0, 0
    for q, n in zip(q_text, n_text):
        others = owners.get(n, set()) - {q}
        if others:
            other_q += 1
            sims = queries(list(others)) @ queries([q])[0]
            sibling += int(sims.max() >= 0.9)
    result["negative_is_positive_of_another_query"] = other_q
    result["negative_is_positive_of_a_near_identical_query_0.9"] = sibling
    if name == "scifact":
        ids = [dataset["text_to_id"].get(n) for n in n_text]
        in_test = sum(i in dataset["test_docs"] for i in ids)
        result["negative_is_a_test_positive"] = in_test
        result["test_positive_base_rate"] = round(len(dataset["test_docs"]) / len(dataset["corpus"]), 4)
        result["negative_is_a_test_positive_rate"] = round(in_test / len(n_text), 4)
    if name == "medquad":
        meta, ans = dataset["meta"], dataset["answer_meta"]
        same_focus = same_both = 0
        for q, n in zip(q_text, n_text):
            focus, qtype = meta[q]
            tags = ans.get(n, set())
            same_focus += any(f == focus for f, _ in tags)
            same_both += any(f == focus and t == qtype for f, t in tags)
        result["negative_same_focus"] = same_focus
        result["negative_same_focus_and_qtype"] = same_both
    return result


def lost_pairs(dataset: dict[str, Any], st_rows: list[dict], ek_rows: list[dict]) -> dict[str, Any]:
    """Pairs that ST's triplet output left out (no negative found), and how well the model scored their positive.

    embedkit keeps every pair (short queries keep fewer negatives), so its rows give every pair's positive score.
    """
    import numpy as np

    st_pairs = {(r["query"], r["positive"]) for r in st_rows}
    score = {(r["query"], r["positive"]): r["scores"][0] for r in ek_rows}
    unique = list(dict.fromkeys(dataset["pairs"]))
    lost = [score[p] for p in unique if p not in st_pairs and p in score]
    kept = [score[p] for p in unique if p in st_pairs and p in score]

    def describe(values: list[float]) -> dict[str, float]:
        return {"n": len(values), "median": round(float(np.median(values)), 4)} if values else {"n": 0}

    return {"count": sum(p not in st_pairs for p in unique), "distinct_pairs": len(unique),
            "lost_positive_score": describe(lost), "kept_positive_score": describe(kept)}


# ---------------------------------------------------------------------------------------------------- --train
# The training comparison (issue #5 acceptance). Same trainer, recipe and settings for every variant; only the
# negatives differ:
#   a) none (in-batch negatives only)            b) sentence-transformers' mine_hard_negatives
#   c) embedkit mine (static, base model)         d) embedkit online re-mining during training
# Mining settings (the same for b, c and d; see TRAIN_MINING for why):
#   pool: the whole SciFact corpus (5,183 abstracts) / every distinct MedQuAD train answer (not only the sample's);
#   window: SciFact ranks 10-100 (the head holds unlabelled relevant abstracts), MedQuAD 1-100 (the confusers of the
#   test set are answers on the *same topic* to another question type, which rank right below the positive);
#   positive-aware margin: drop candidates scored above 95% of the positive (relative margin 0.05, NV-Retriever's
#   TopK-PercPos), take the best survivors ("top"); embedkit also drops near duplicates of a positive (cos >= 0.98).
# ST's output keeps only pairs that got all their negatives (n-tuple rows); embedkit keeps every pair (a short row
# trains with the negatives it has).
TRAIN_SETTINGS = {"batch_size": 32, "lr": 2e-5, "epochs": 1, "max_length": 256, "seed": 42, "threads": 2}
TRAIN_MINING = {
    "scifact": {"range": (10, 100), "relative_margin": 0.05, "online_every": 10},
    "medquad": {"range": (1, 100), "relative_margin": 0.05, "online_every": 16},
}
TEST_TASKS = {"scifact": "beir:{data}/scifact:test", "medquad": "beir:{data}/medquad/test:test"}
VARIANTS = ("none", "st", "embedkit", "online")


def _write_jsonl(path: Path, rows) -> None:
    from embedkit.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def train_pool(name: str, data: Path, dataset: dict[str, Any]) -> dict[str, dict]:
    """The mining pool as a corpus {id: {title, text}} (the same documents for ST and embedkit)."""
    if name == "scifact":
        return dataset["corpus_rows"]
    answers = dict.fromkeys(json.loads(line)["positive"]
                            for line in (data / "medquad" / "train_pairs.jsonl").read_text().splitlines() if line)
    return {f"answer-{i}": {"title": "", "text": text} for i, text in enumerate(answers)}


def mine_st_train(dataset, pool_texts: list[str], settings: dict, k: int, batch_size: int):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from embedkit.models.registry import minilm_path

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    model.max_seq_length = TRAIN_SETTINGS["max_length"]
    ds = Dataset.from_dict({"query": [q for q, _ in dataset["pairs"]], "positive": [p for _, p in dataset["pairs"]]})
    log = io.StringIO()
    started, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(log):
        mined = mine_hard_negatives(ds, model, corpus=pool_texts, range_min=settings["range"][0],
                                    range_max=settings["range"][1], relative_margin=settings["relative_margin"],
                                    num_negatives=k, sampling_strategy="top", batch_size=batch_size,
                                    use_faiss=True, output_format="n-tuple", verbose=True)
    seconds = (time.perf_counter() - started, time.process_time() - cpu)
    rows = [{"query": r["query"], "positive": r["positive"], "negatives": [r[f"negative_{j + 1}"] for j in range(k)]}
            for r in mined]
    return rows, seconds, log.getvalue()


def mine_embedkit_train(dataset, pool: dict[str, dict], settings: dict, k: int, batch_size: int, output: Path):
    """Static mining with a cold corpus cache (everything encoded, as on ST's side); the vectors are then put in
    the shared embedding cache, where the online run's first round (base weights) finds them."""
    import shutil

    from embedkit.data import TrainingExample
    from embedkit.eval.runner import default_cache_dir, embedding_cache_path
    from embedkit.mine import MiningSettings, mine_to_file, task_from_pairs
    from embedkit.models import load_model

    encoder = load_model("minilm", max_length=TRAIN_SETTINGS["max_length"])
    mining = MiningSettings(range_min=settings["range"][0], range_max=settings["range"][1], num_negatives=k,
                            sampling="top", relative_margin=settings["relative_margin"], duplicate_threshold=0.98,
                            seed=TRAIN_SETTINGS["seed"], batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="bench-mine-cold-") as cold:
        started, cpu = time.perf_counter(), time.process_time()
        task = task_from_pairs([TrainingExample(q, p) for q, p in dataset["pairs"]], pool,
                               {"kind": "bench", "name": dataset["name"]})
        summary = mine_to_file(encoder, task, output, mining, cache_dir=cold, use_cache=True, histogram=False)
        seconds = (time.perf_counter() - started, time.process_time() - cpu)
        target = embedding_cache_path(default_cache_dir(), encoder, task.corpus_ids, task.corpus_texts, "document")
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(summary["corpus_embeddings"]["path"], target)
    return summary, seconds


def _variant_overrides(variant: str, files: dict[str, Path], k: int, settings: dict, output: Path) -> list[str]:
    s = TRAIN_SETTINGS
    train_file = {"none": files["pairs"], "st": files["st"], "embedkit": files["embedkit"],
                  "online": files["pairs"]}[variant]
    overrides = [f"data.train={train_file}", "data.dev=null", "data.max_examples=null", "data.sample=first",
                 "data.columns={query: query, positive: positive, negatives: negatives}"
                 if variant in ("st", "embedkit") else "data.columns={query: query, positive: positive}",
                 f"training.output_dir={output}", "training.progress=false", f"training.batch_size={s['batch_size']}",
                 f"training.lr={s['lr']}", f"training.epochs={s['epochs']}", f"model.max_length={s['max_length']}",
                 f"training.seed={s['seed']}", f"training.threads={s['threads']}",
                 f"loss.hard_negatives={0 if variant == 'none' else k}"]
    if variant == "online":
        lo, hi = settings["range"]
        overrides += ["mining.online=true", f"mining.every={settings['online_every']}", f"mining.range={lo}:{hi}",
                      "mining.sampling=top", f"mining.relative_margin={settings['relative_margin']}",
                      "mining.duplicate_threshold=0.98", f"mining.corpus={files['pool']}"]
    if os.environ.get("BENCH_MAX_STEPS"):  # smoke test of the benchmark itself
        overrides.append(f"training.max_steps={os.environ['BENCH_MAX_STEPS']}")
    return overrides


def child_train(spec_path: Path) -> None:
    """One variant in its own process (so peak RSS is its own): train, then evaluate on the test split."""
    import resource

    import torch

    from embedkit.eval.runner import evaluate
    from embedkit.manifest import MANIFEST_NAME
    from embedkit.models import load_model
    from embedkit.train.config import load_recipe
    from embedkit.train.contrastive import train

    spec = json.loads(spec_path.read_text())
    recipe = load_recipe(REPO / spec["recipe"], spec["overrides"])
    started = time.perf_counter()
    from embedkit.train.engine import configure_logging

    configure_logging(f"  [{spec['variant']}]")
    result = train(recipe)
    train_s = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    manifest = json.loads((result.output_dir / MANIFEST_NAME).read_text())["training"]
    torch.set_num_threads(TRAIN_SETTINGS["threads"])
    t0 = time.perf_counter()
    encoder = load_model(result.output_dir, max_length=TRAIN_SETTINGS["max_length"])
    report = evaluate(encoder, [spec["task"]], batch_size=64)
    (name,) = report["results"]
    out = {"variant": spec["variant"], "ndcg_at_10": report["results"][name]["metrics"]["ndcg_at_10"],
           "steps": result.steps, "samples": result.samples, "train_s": round(train_s, 1),
           "steps_s": round(result.train_seconds, 1), "eval_s": round(time.perf_counter() - t0, 1),
           "peak_rss_gb_train": round(rss, 2), "final_loss": result.final_loss,
           "rows": manifest["data"].get("used"), "hard_negatives": manifest["data"].get("hard_negatives")}
    online = manifest.get("online_mining")
    if online:
        out["refreshes"] = [{k: r[k] for k in ("step", "seconds", "negatives_changed", "rows_changed", "rows_short",
                                               "removed")} for r in online["refreshes"]]
    Path(spec["result"]).write_text(json.dumps(out, indent=2))


def run_variant(name: str, variant: str, recipe: str, overrides: list[str], task: str, work: Path,
                reuse: bool) -> dict[str, Any]:
    import subprocess

    result_path = work / f"{variant}.result.json"
    if reuse and result_path.is_file():
        print(f"[{name}] {variant}: reusing {result_path}", flush=True)
        return json.loads(result_path.read_text())
    spec = work / f"{variant}.spec.json"
    spec.write_text(json.dumps({"variant": variant, "recipe": recipe, "overrides": overrides, "task": task,
                                "result": str(result_path)}))
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child-train", str(spec)], cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"[{name}] {variant} failed (exit {os.waitstatus_to_exitcode(status)})")
    result = json.loads(result_path.read_text())
    result["child_peak_rss_gb"] = round(usage.ru_maxrss / 1e6, 2)
    result["child_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)  # train + eval; robust to pauses
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result_path.write_text(json.dumps(result, indent=2))
    return result


def train_comparison(args, name: str, data: Path, work: Path, results: dict[str, Any], save) -> None:
    import statistics

    from embedkit.eval.runner import evaluate
    from embedkit.models import load_model

    k = args.num_negatives
    settings = TRAIN_MINING[name]
    work.mkdir(parents=True, exist_ok=True)
    dataset = load_scifact(data) if name == "scifact" else load_medquad(data, args.medquad_sample, args.seed)
    pool = train_pool(name, data, dataset)
    task = TEST_TASKS[name].format(data=data)
    row: dict[str, Any] = results.setdefault(name, {})
    row.update({"pairs": len(dataset["pairs"]), "pool": len(pool), "num_negatives": k,
                "mining": {"range": settings["range"], "relative_margin": settings["relative_margin"],
                           "sampling": "top", "online_every": settings["online_every"]}, "task": task})
    print(f"\n== {name}: {len(dataset['pairs']):,} training pairs, pool {len(pool):,} documents, {k} negative(s), "
          f"window {settings['range']}", flush=True)
    files = {"pairs": work / "pairs.jsonl", "pool": work / "pool.jsonl", "st": work / "st-mined.jsonl",
             "embedkit": work / "embedkit-mined.jsonl"}
    _write_jsonl(files["pairs"], ({"query": q, "positive": p} for q, p in dataset["pairs"]))
    _write_jsonl(files["pool"], ({"_id": i, "title": d.get("title", ""), "text": d["text"]} for i, d in pool.items()))

    if "base_ndcg_at_10" not in row:  # the base model's test embeddings come from the eval cache after one run
        t0 = time.perf_counter()
        report = evaluate(load_model("minilm", max_length=TRAIN_SETTINGS["max_length"]), [task], batch_size=64)
        row["base_ndcg_at_10"] = next(iter(report["results"].values()))["metrics"]["ndcg_at_10"]
        print(f"[{name}] base MiniLM nDCG@10 {row['base_ndcg_at_10']:.4f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        save()

    from embedkit.data.beir import mteb_document_text

    pool_texts = [mteb_document_text(d.get("title", ""), d["text"]) for d in pool.values()]
    timing_path = work / "mining.json"
    timing = json.loads(timing_path.read_text()) if (args.reuse and timing_path.is_file()) else {}
    if not (timing and files["st"].is_file() and files["embedkit"].is_file()):
        st_times, ek_times = [], []
        for repeat in range(args.mine_repeats):
            st_rows, st_s, st_log = mine_st_train(dataset, pool_texts, settings, k, args.batch_size)
            summary, ek_s = mine_embedkit_train(dataset, pool, settings, k, args.batch_size, files["embedkit"])
            st_times.append(st_s)
            ek_times.append(ek_s)
            print(f"[{name}] mining round {repeat + 1}: ST wall {st_s[0]:.1f} s / CPU {st_s[1]:.1f} s "
                  f"({len(st_rows)} rows), embedkit wall {ek_s[0]:.1f} s / CPU {ek_s[1]:.1f} s "
                  f"({summary['rows_written']} rows)", flush=True)
        _write_jsonl(files["st"], st_rows)
        ek_rows = [json.loads(line) for line in files["embedkit"].read_text().splitlines()]
        stats = summary["stats"]
        # Wall and CPU seconds (CPU time of this process, threads included): on a shared machine whose other jobs
        # may pause or slow this one, CPU time is the comparable number.
        timing = {"st_s": st_times, "embedkit_s": ek_times,
                  "st_median_s": statistics.median(t[0] for t in st_times),
                  "embedkit_median_s": statistics.median(t[0] for t in ek_times),
                  "st_median_cpu_s": statistics.median(t[1] for t in st_times),
                  "embedkit_median_cpu_s": statistics.median(t[1] for t in ek_times), "st_rows": len(st_rows),
                  "embedkit_rows": len(ek_rows), "embedkit_short_rows": sum(len(r["negatives"]) < k for r in ek_rows),
                  "embedkit_removed": stats["removed"], "embedkit_positive_ranked_before_window":
                  stats["positive_ranked_before_window"], "st_log": [line for line in st_log.splitlines()
                                                                     if line.strip() and "it/s" not in line]}
        timing_path.write_text(json.dumps(timing, indent=2))
    row["mining_time"] = timing
    print(f"[{name}] mining (median of {len(timing['st_s'])}): ST wall {timing['st_median_s']:.1f} s, CPU "
          f"{timing['st_median_cpu_s']:.1f} s -> {timing['st_rows']} rows of {len(dataset['pairs'])} pairs; embedkit "
          f"wall {timing['embedkit_median_s']:.1f} s, CPU {timing['embedkit_median_cpu_s']:.1f} s -> "
          f"{timing['embedkit_rows']} rows ({timing['embedkit_short_rows']} short)", flush=True)
    save()

    recipe = {"scifact": "recipes/minilm-scifact.yaml", "medquad": "recipes/minilm-medquad.yaml"}[name]
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        overrides = _variant_overrides(variant, files, k, settings, work / f"model-{variant}")
        result = run_variant(name, variant, recipe, overrides, task, work, args.reuse)
        row.setdefault("variants", {})[variant] = result
        base = row["variants"].get("none", {}).get("ndcg_at_10")
        delta = f" ({result['ndcg_at_10'] - base:+.4f} vs none)" if base is not None and variant != "none" else ""
        print(f"[{name}] {variant:9s} nDCG@10 {result['ndcg_at_10']:.4f}{delta}  train {result['train_s']:.0f} s, "
              f"eval {result['eval_s']:.0f} s, peak RSS {result['child_peak_rss_gb']:.2f} GB", flush=True)
        save()


def print_train_table(results: dict[str, Any]) -> None:
    names = {"none": "a) no mined negatives", "st": "b) ST mine_hard_negatives", "embedkit": "c) embedkit mine",
             "online": "d) embedkit online"}
    print(f"\n{'dataset':<9}{'variant':<28}{'rows':>6}{'nDCG@10':>9}{'vs a)':>8}{'mine CPU s':>11}{'mine s':>8}"
          f"{'train s':>9}{'RSS GB':>8}")
    for name in ("scifact", "medquad"):
        row = results.get(name)
        if not row or "variants" not in row:
            continue
        print(f"{name:<9}{'base MiniLM (untrained)':<28}{'':>6}{row['base_ndcg_at_10']:>9.4f}")
        base = row["variants"].get("none", {}).get("ndcg_at_10")
        timing = row.get("mining_time", {})
        for variant, r in row["variants"].items():
            mining = {"st": timing.get("st_median_s"), "embedkit": timing.get("embedkit_median_s")}.get(variant)
            cpu = {"st": timing.get("st_median_cpu_s"), "embedkit": timing.get("embedkit_median_cpu_s")}.get(variant)
            if variant == "online" and r.get("refreshes"):
                mining = sum(x["seconds"] for x in r["refreshes"])  # wall time of all refreshes, inside training
            delta = f"{r['ndcg_at_10'] - base:+.4f}" if base is not None and variant != "none" else ""
            print(f"{name:<9}{names[variant]:<28}{r.get('rows') or 0:>6}{r['ndcg_at_10']:>9.4f}{delta:>8}"
                  f"{(f'{cpu:.1f}' if cpu is not None else ''):>11}{(f'{mining:.1f}' if mining is not None else ''):>8}"
                  f"{r['train_s']:>9.0f}{r['child_peak_rss_gb']:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--datasets", default="scifact,medquad")
    parser.add_argument("--medquad-sample", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42, help="MedQuAD sample seed (the trainer recipe's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", help="folder for the mined JSONL files (default: a temp folder)")
    parser.add_argument("--json", help="write all numbers here")
    parser.add_argument("--train", action="store_true",
                        help="instead of the audit: train MiniLM with no / ST-mined / embedkit-mined / online-mined "
                             "negatives and compare test nDCG@10 (see TRAIN_MINING; results in --json, default "
                             "bench/results/mine_train.json)")
    parser.add_argument("--num-negatives", type=int, default=1, help="--train: negatives per pair (default 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="--train: which of none,st,embedkit,online")
    parser.add_argument("--mine-repeats", type=int, default=1, help="--train: mining runs per side (median time)")
    parser.add_argument("--reuse", action="store_true",
                        help="--train: reuse mined files and finished variants found in --out (resume a run)")
    parser.add_argument("--child-train", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_train:
        child_train(Path(args.child_train))
        return
    if args.train:
        import torch

        torch.set_num_threads(2)
        out = Path(args.out or "/tmp/embedkit-bench-mine-train")
        json_path = Path(args.json or REPO / "bench" / "results" / "mine_train.json")
        results: dict[str, Any] = {"settings": TRAIN_SETTINGS, "mining": TRAIN_MINING,
                                   "load_average_start": os.getloadavg()}
        if args.reuse and json_path.is_file():
            results.update({k: v for k, v in json.loads(json_path.read_text()).items() if k in ("scifact", "medquad")})

        def save() -> None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            results["load_average_now"] = os.getloadavg()
            json_path.write_text(json.dumps(results, indent=2, default=str))

        for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
            train_comparison(args, name, Path(args.data), out / name, results, save)
        save()
        print_train_table(results)
        print(f"\nresults in {json_path}; models and mined files in {out}")
        return

    import torch

    torch.set_num_threads(2)
    data = Path(args.data)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-mine-"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"settings": {"window": WINDOW, "relative_margin": RELATIVE_MARGIN,
                                            "num_negatives": NUM_NEGATIVES, "sampling": "top"},
                               "load_average_start": os.getloadavg()}
    mined_files: dict[str, dict[str, Path]] = {}
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        dataset = load_scifact(data) if name == "scifact" else load_medquad(data, args.medquad_sample, args.seed)
        pool = len(dataset["corpus"]) if dataset["corpus"] else len({p for _, p in dataset["pairs"]})
        print(f"\n== {name}: {len(dataset['pairs']):,} pairs, pool {pool:,} documents", flush=True)
        st_rows, st_seconds, st_log = run_st(dataset, args.batch_size)
        print(f"sentence-transformers mine_hard_negatives: wall {st_seconds[0]:.1f} s, CPU {st_seconds[1]:.1f} s, "
              f"{len(st_rows):,} rows")
        print("  " + "\n  ".join(line for line in st_log.splitlines() if line.strip() and "it/s" not in line))
        st_path = out / f"st-{name}.jsonl"
        st_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in st_rows))
        ek_path = out / f"embedkit-{name}.jsonl"
        cache = tempfile.TemporaryDirectory(prefix="bench-mine-cache-")
        ek_rows, ek_seconds, summary, docs, queries = run_embedkit(dataset, args.batch_size, ek_path,
                                                                   Path(cache.name))
        print(f"embedkit mine: wall {ek_seconds[0]:.1f} s, CPU {ek_seconds[1]:.1f} s, {len(ek_rows):,} rows "
              f"(search and filters: {summary['stats']['seconds']})")
        from embedkit.mine.report import format_summary

        print("  " + format_summary(summary).replace("\n", "\n  "))
        print(f"ratio embedkit / ST: wall {ek_seconds[0] / st_seconds[0]:.2f}, CPU {ek_seconds[1] / st_seconds[1]:.2f}"
              " (CPU time of this process: less sensitive to other load on the machine)")
        mined_files[name] = {"st": st_path, "embedkit": ek_path}
        st_audit = audit(name, dataset, st_rows, docs, queries)
        ek_audit = audit(name, dataset, ek_rows, docs, queries)
        cache.cleanup()
        print(f"{'audit of the mined negatives':<52}{'ST':>22}{'embedkit':>22}")
        for key in st_audit:
            a, b = st_audit[key], ek_audit.get(key)
            if isinstance(a, dict):
                a, b = " ".join(f"{k}={v}" for k, v in a.items()), " ".join(f"{k}={v}" for k, v in (b or {}).items())
            print(f"{key:<52}{a!s:>22}{b!s:>22}")
        lost = lost_pairs(dataset, st_rows, ek_rows)
        print(f"pairs with no row in ST's output: {lost['count']:,}; their positive's score (embedkit's rows): "
              f"{lost['lost_positive_score']}; pairs ST kept: {lost['kept_positive_score']}")
        results[name] = {"pairs": len(dataset["pairs"]), "pool": pool, "st_lost_pairs": lost,
                         "st": {"wall_s": round(st_seconds[0], 2), "cpu_s": round(st_seconds[1], 2),
                                "rows": len(st_rows), "log": st_log,
                                "audit": st_audit},
                         "embedkit": {"wall_s": round(ek_seconds[0], 2), "cpu_s": round(ek_seconds[1], 2),
                                      "rows": len(ek_rows),
                                      "summary": summary["stats"], "short": len(summary["short_queries"]),
                                      "audit": ek_audit},
                         "ratio_embedkit_over_st": {"wall": round(ek_seconds[0] / st_seconds[0], 3),
                                                    "cpu": round(ek_seconds[1] / st_seconds[1], 3)}}
    results["load_average_end"] = os.getloadavg()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print(f"\nmined files in {out}; load average {results['load_average_start']} -> {results['load_average_end']}")


if __name__ == "__main__":
    main()
