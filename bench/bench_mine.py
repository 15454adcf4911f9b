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
`--train` is the place for the training comparison (mined sets are written to --out for it); it needs the
training engineer's `embedkit.train` API and is not wired yet.
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


def train_step(args, mined: dict[str, dict[str, Path]]) -> None:
    """Hook for the training comparison (no hard negatives vs ST-mined vs embedkit-mined), not wired yet."""
    try:
        from embedkit.train import trainer  # noqa: F401
    except ImportError:
        print("--train: embedkit.train is not available", file=sys.stderr)
        return
    print("--train: not wired yet; train on these files with the trainer's recipes (data.train = the path):")
    for dataset, files in mined.items():
        for side, path in files.items():
            print(f"  {dataset} {side}: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--datasets", default="scifact,medquad")
    parser.add_argument("--medquad-sample", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42, help="MedQuAD sample seed (the trainer recipe's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", help="folder for the mined JSONL files (default: a temp folder)")
    parser.add_argument("--json", help="write all numbers here")
    parser.add_argument("--train", action="store_true", help="also train on the mined sets (not wired yet)")
    args = parser.parse_args()

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
    if args.train:
        train_step(args, mined_files)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print(f"\nmined files in {out}; load average {results['load_average_start']} -> {results['load_average_end']}")


if __name__ == "__main__":
    main()
