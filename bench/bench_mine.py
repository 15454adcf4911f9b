"""Benchmark: embedkit's hard-negative mining against sentence-transformers' `util.mine_hard_negatives`, plus a
false-negative audit of what each one mined.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    .venv/bin/python bench/bench_mine.py --out runs/bench-mine --json runs/bench-mine/result.json

Data (same pairs on both sides):
- scifact: the SciFact train pairs (qrels/train.tsv, score > 0); pool = the whole corpus (5,183 abstracts).
- medquad: a seeded 1,000-pair sample of medquad/train_pairs.jsonl, drawn as the trainer's recipe draws it
  (`sorted(random.Random(42).sample(range(n), 1000))`); pool = the sample's positives.
Settings: all-MiniLM-L6-v2 on both sides; window 10-50, relative margin 0.05, 1 negative, "top" sampling (ST's
default), ST with use_faiss=True. embedkit uses the same window, margin, count and sampling, plus its near-duplicate
filter (cosine >= 0.98 to a positive, reported separately), starting from an empty corpus-embedding cache so both
sides encode everything. Times exclude model loading.

One window definition for both miners: embedkit's (embedkit/mine/settings.py, MiningSettings): the window
[range_min, range_max) is a slice of the model's *raw* ranking of the whole pool (rank 0 = the most similar
document; the query's known positives count as ranks and are then never chosen); inside it, candidates scored above
pos - |pos| x relative_margin (pos = the query's lowest positive score) are removed and the best survivors taken
("top"). sentence-transformers' own range_min/range_max index a different list: its ranking *after* the positives
and the margin-filtered candidates are taken out, so ST's "10-50" reaches deeper into the ranking than embedkit's,
by a different amount per query (the margin mostly removes the head, where embedkit's window does not look).
No ST range translates that exactly, so ST's candidates are post-filtered (`mine_st`): ST is asked for its raw
ranking (`include_positives=True`, range 0..range_max, every rank returned as an n-tuple with scores, no margin),
and embedkit's own filter and sampling code (`embedkit.mine.filters.apply_filters` / `sample_negatives`, without
the near-duplicate filter, which ST does not have) applies the window, the known-positive rule and the margin to
it. What differs between the two sides is then ST's encoding, FAISS search and scores against embedkit's, plus
embedkit's near-duplicate filter. ST's time includes that post-filter and building a range_max-column n-tuple
dataset. (ST de-duplicates pool texts, embedkit ranks each document id; the pools here have no repeated texts.)

Same rows on both sides: every (query, positive) pair of the data set gets one row in the pairs' order, with the
negatives mined for its query; a pair that a miner could not fill keeps its row without a negative (ST's own
output would drop it). The count of such rows is printed per side.

Audit of each side's mined negatives, all with the same MiniLM embeddings:
- negatives scored above / within 0.02 of their row's positive;
- exact and near duplicates of the positive (cosine >= 0.95 between negative and positive documents);
- negatives that are a positive of another query whose text is near-identical (query cosine >= 0.9), or of any
  other query (SciFact: also of a *test* query, against the base rate of test positives in the corpus);
- MedQuAD: negatives that answer a question on the same topic (`focus`), and same focus + same question type;
- rows without a negative (and their positive's score).

`--train` runs the training comparison instead (issue #5 acceptance; one dataset at a time with --datasets):

    nice -n 5 .venv/bin/python bench/bench_mine.py --train --datasets scifact,medquad --seeds 42,43,44
    BENCH_MAX_STEPS=1 .venv/bin/python bench/bench_mine.py --train --smoke 16 --seeds 1,2 --out /tmp/mine-smoke  # smoke

MiniLM trained by embedkit's trainer (batch 32, lr 2e-5, 1 epoch, max length 256, 2 threads) a) without mined
negatives, b) with sentence-transformers' mined negatives, c) with embedkit's, d) with embedkit's online re-mining,
each once per seed of `--seeds` (default 42,43,44; the variant order reversed on every other seed). The mining is
deterministic ("top" sampling) and runs once; only the training takes the seed. All four variants train on the same
rows in the same order (the data set's pairs; b and c with their negatives, a pair without one trains without).
Printed per variant: test nDCG@10 mean +- sd over the seeds, rows and rows without a negative, mining time, training
time, peak RSS; then `embedkit compare` (difference, 95% interval, p(improvement), the default gate at a 0.01
margin) of embedkit's negatives against ST's and against none, on the per-query nDCG@10 averaged over the seeds
(as bench_train.py does). See TRAIN_MINING below for the mining settings and why. `--smoke N` (with BENCH_MAX_STEPS)
shrinks everything for a test of the benchmark itself: N pairs, a pool of their positives + 5N documents, and a test
task of N judged queries over their documents + 5N others, written under --out.
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
from cpuinfo import describe as describe_cpu, int8_instructions  # noqa: E402  (bench/ is on sys.path: a script)

WINDOW = (10, 50)
RELATIVE_MARGIN = 0.05
NUM_NEGATIVES = 1
MINING_SEED = 42  # embedkit's random-sampling seed; unused with "top" sampling (the mining is deterministic)


def window_definition(window: tuple[int, int], relative_margin: float, k: int) -> str:
    """The one window definition both miners follow (embedkit's, embedkit/mine/settings.py), in words."""
    lo, hi = window
    return (f"ranks {lo}..{hi - 1} (window [{lo}, {hi})) of the model's raw ranking of the whole pool, rank 0 = the "
            f"most similar document, the query's known positives counting as ranks (never chosen); candidates "
            f"scored above pos - |pos| x {relative_margin} removed (pos = the query's lowest positive score); the "
            f"best {k} survivor(s) taken (top); a pair with no survivor keeps its row without a negative "
            f"(ST: its raw ranking post-filtered by embedkit's filter code; embedkit: also drops near duplicates "
            f"of a positive, cosine >= 0.98)")


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


def mine_st(pairs: list[tuple[str, str]], pool_texts: list[str] | None, window: tuple[int, int],
            relative_margin: float, k: int, batch_size: int, max_length: int | None = None) -> dict[str, Any]:
    """sentence-transformers' mine_hard_negatives (its encoding, FAISS search and scores) under embedkit's window
    definition (see the module docstring): ST returns its raw ranking down to range_max, positives included
    (`include_positives=True`, n-tuple with scores; no margin, so nothing is taken out before ranking), and
    embedkit's `apply_filters` / `sample_negatives` pick from ranks range_min..range_max-1 exactly as `embedkit mine`
    does (known positives, relative margin from the lowest positive score, "top"; no near-duplicate filter).

    Returns {"negatives": {query: [texts]}, "negative_scores": {query: [scores]}, "positive_score": {(query,
    positive): score}, "seconds": (wall, cpu), "log": ST's printout, "stats": counts}. Times cover ST's call and the
    post-filter, not model loading.
    """
    import logging

    import numpy as np
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from embedkit.mine import MiningSettings
    from embedkit.mine.filters import apply_filters, sample_negatives
    from embedkit.models.registry import minilm_path

    lo, hi = window
    settings = MiningSettings(range_min=lo, range_max=hi, num_negatives=k, sampling="top",
                              relative_margin=relative_margin, duplicate_threshold=None, seed=MINING_SEED)
    model = SentenceTransformer(str(minilm_path()), device="cpu")
    if max_length is not None:
        model.max_seq_length = max_length
    queries, positives = [q for q, _ in pairs], [p for _, p in pairs]
    # ST's corpus is the pool plus the positives, de-duplicated; it cannot rank deeper than that.
    depth = min(hi, len(dict.fromkeys([*(pool_texts or []), *positives])))
    ds = Dataset.from_dict({"query": queries, "positive": positives})
    log = io.StringIO()
    st_logger = logging.getLogger("sentence_transformers.util.hard_negatives")
    level = st_logger.level
    st_logger.setLevel(logging.ERROR)  # the warning that include_positives ignores range settings: not ours
    started, cpu = time.perf_counter(), time.process_time()
    try:
        with contextlib.redirect_stdout(log):
            ranked = mine_hard_negatives(ds, model, corpus=pool_texts, range_min=0, range_max=depth,
                                         num_negatives=depth, sampling_strategy="top", include_positives=True,
                                         output_format="n-tuple", output_scores=True, batch_size=batch_size,
                                         use_faiss=True, verbose=True)
    finally:
        st_logger.setLevel(level)
    positives_of: dict[str, dict[str, None]] = {}
    for q, p in pairs:
        positives_of.setdefault(q, {})[p] = None
    first_row: dict[str, int] = {}
    positive_score: dict[tuple[str, str], float] = {}
    score_rows = ranked["scores"]
    for i, (q, p) in enumerate(zip(ranked["query"], ranked["positive"])):
        first_row.setdefault(q, i)
        positive_score[(q, p)] = score_rows[i][0]
    missing = [q for q in positives_of if q not in first_row]
    if missing:  # n-tuple rows are dropped only when the ranking is shorter than `depth`: cannot happen
        raise RuntimeError(f"ST returned no ranking for {len(missing)} queries (e.g. {missing[0][:80]!r})")
    order = list(positives_of)  # distinct queries, first-seen order
    ids: dict[str, int] = {}  # document text -> index (ST's corpus is de-duplicated by text)
    width = hi - lo
    cand_idx = np.full((len(order), width), -1, dtype=np.int64)
    cand_s = np.full((len(order), width), -np.inf, dtype=np.float32)
    is_pos = np.zeros((len(order), width), dtype=bool)
    columns = [ranked[f"negative_{rank + 1}"] for rank in range(lo, depth)]  # ranks lo..depth-1
    for r, q in enumerate(order):
        i = first_row[q]
        for c, column in enumerate(columns):
            text = column[i]
            cand_idx[r, c] = ids.setdefault(text, len(ids))
            cand_s[r, c] = score_rows[i][1 + lo + c]
            is_pos[r, c] = text in positives_of[q]
    pos_ref = np.array([min(positive_score[(q, p)] for p in positives_of[q]) for q in order], dtype=np.float32)
    outcome = apply_filters(cand_idx, cand_s, pos_ref, is_pos, settings)
    chosen = sample_negatives(outcome.alive, settings, np.arange(len(order)))
    text_of = list(ids)
    negatives = {q: [text_of[cand_idx[r, c]] for c in chosen[r]] for r, q in enumerate(order)}
    negative_scores = {q: [round(float(cand_s[r, c]), 6) for c in chosen[r]] for r, q in enumerate(order)}
    seconds = (time.perf_counter() - started, time.process_time() - cpu)
    stats = {"queries": len(order), "ranking_depth": depth, "candidates_in_window": outcome.candidates,
             "removed": outcome.removed, "survivors": int(outcome.alive.sum()),
             "queries_without_negative": sum(not negatives[q] for q in order),
             "queries_short": sum(len(negatives[q]) < k for q in order)}
    return {"negatives": negatives, "negative_scores": negative_scores, "positive_score": positive_score,
            "seconds": seconds, "log": log.getvalue(), "stats": stats}


def rows_for_pairs(pairs: list[tuple[str, str]], negatives: dict[str, list[str]],
                   negative_scores: dict[str, list[float]], positive_score: dict[tuple[str, str], float]) -> list[dict]:
    """One row per pair, in the pairs' order, with its query's negatives (none if the miner found none)."""
    return [{"query": q, "positive": p, "negatives": list(negatives.get(q, [])),
             "scores": [positive_score[(q, p)], *negative_scores.get(q, [])]} for q, p in pairs]


def per_query(mined_rows: list[dict]) -> tuple[dict, dict, dict]:
    """embedkit's output rows (one per query and distinct positive) -> negatives and scores by query, positive score
    by pair (every positive of a query carries the same negatives)."""
    negatives, scores, positive = {}, {}, {}
    for r in mined_rows:
        negatives.setdefault(r["query"], r["negatives"])
        scores.setdefault(r["query"], r["scores"][1:])
        positive[(r["query"], r["positive"])] = r["scores"][0]
    return negatives, scores, positive


def without_negative(rows: list[dict], k: int) -> dict[str, int]:
    return {"rows": len(rows), "without_negative": sum(not r["negatives"] for r in rows),
            "short": sum(len(r["negatives"]) < k for r in rows)}


def run_st(dataset: dict[str, Any], batch_size: int) -> tuple[list[dict], tuple[float, float], str, dict]:
    mined = mine_st(dataset["pairs"], dataset["corpus"], WINDOW, RELATIVE_MARGIN, NUM_NEGATIVES, batch_size)
    rows = rows_for_pairs(dataset["pairs"], mined["negatives"], mined["negative_scores"], mined["positive_score"])
    return rows, mined["seconds"], mined["log"], mined["stats"]


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
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    rows = rows_for_pairs(dataset["pairs"], *per_query(mined))  # the same rows as ST's side, in the pairs' order
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
                              "rows_without_negative": sum(not r["negatives"] for r in rows)}
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


def rows_without_negatives(st_rows: list[dict], ek_rows: list[dict]) -> dict[str, Any]:
    """Rows (the same pairs on both sides) each miner left without a negative, and how well the model scored their
    positive (embedkit's positive scores for both sides, so the two are on one scale)."""
    import numpy as np

    if [(r["query"], r["positive"]) for r in st_rows] != [(r["query"], r["positive"]) for r in ek_rows]:
        raise RuntimeError("ST's and embedkit's rows are not the same pairs in the same order")
    score = [r["scores"][0] for r in ek_rows]

    def describe(values: list[float]) -> dict[str, float]:
        return {"n": len(values), "median": round(float(np.median(values)), 4)} if values else {"n": 0}

    out: dict[str, Any] = {"rows": len(ek_rows)}
    for side, rows in (("st", st_rows), ("embedkit", ek_rows)):
        out[side] = {"count": sum(not r["negatives"] for r in rows),
                     "positive_score_without": describe([s for r, s in zip(rows, score) if not r["negatives"]]),
                     "positive_score_with": describe([s for r, s in zip(rows, score) if r["negatives"]])}
    out["both"] = sum(not a["negatives"] and not b["negatives"] for a, b in zip(st_rows, ek_rows))
    return out


# ---------------------------------------------------------------------------------------------------- --train
# The training comparison (issue #5 acceptance). Same trainer, recipe, settings and rows for every variant; only the
# negatives differ:
#   a) none (in-batch negatives only)            b) sentence-transformers' mine_hard_negatives
#   c) embedkit mine (static, base model)         d) embedkit online re-mining during training
# Mining settings (the same for b, c and d; see TRAIN_MINING for why):
#   pool: the whole SciFact corpus (5,183 abstracts) / every distinct MedQuAD train answer (not only the sample's);
#   window: SciFact ranks 10-100 (the head holds unlabelled relevant abstracts), MedQuAD 1-100 (the confusers of the
#   test set are answers on the *same topic* to another question type, which rank right below the positive), both
#   over the raw ranking (embedkit's definition; ST's raw ranking is post-filtered, see mine_st);
#   positive-aware margin: drop candidates scored above 95% of the positive (relative margin 0.05, NV-Retriever's
#   TopK-PercPos), take the best survivors ("top"); embedkit also drops near duplicates of a positive (cos >= 0.98).
# Every variant trains on the data set's pairs, one row each, in the same order; b) and c) give each row its query's
# negatives, and a pair the miner could not fill trains without one (the trainer masks the empty slot).
TRAIN_SETTINGS = {"batch_size": 32, "lr": 2e-5, "epochs": 1, "max_length": 256, "threads": 2}
DEFAULT_SEEDS = "42,43,44"
TRAIN_MINING = {
    "scifact": {"range": (10, 100), "relative_margin": 0.05, "online_every": 10},
    "medquad": {"range": (1, 100), "relative_margin": 0.05, "online_every": 16},
}
TEST_FOLDERS = {"scifact": "scifact", "medquad": "medquad/test"}  # BEIR folders under --data, split "test"
VARIANTS = ("none", "st", "embedkit", "online")
VARIANT_NAMES = {"none": "a) no mined negatives", "st": "b) ST's negatives", "embedkit": "c) embedkit's negatives",
                 "online": "d) embedkit online"}
VERDICTS = (("st", "embedkit"), ("none", "embedkit"))  # (baseline, candidate) pairs for `embedkit compare`


def _write_jsonl(path: Path, rows) -> None:
    from embedkit.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def train_pool(name: str, data: Path, dataset: dict[str, Any]) -> dict[str, dict]:
    """The mining pool as a corpus {id: {title, text}} (the same documents for ST and embedkit)."""
    if name == "scifact":
        return dataset["corpus_rows"]
    answers = dict.fromkeys(json.loads(line)["positive"]
                            for line in (data / "medquad" / "train_pairs.jsonl").read_text().splitlines() if line)
    return {f"answer-{i}": {"title": "", "text": text} for i, text in enumerate(answers)}


def smoke_cut(n: int, dataset: dict[str, Any], pool: dict[str, dict], test_folder: Path,
              work: Path) -> tuple[dict[str, Any], dict[str, dict], str]:
    """--smoke N: the first N pairs, a pool of their positives + 5N other documents, and a test task of the first N
    judged test queries over their judged documents + 5N others (a BEIR folder written under `work`)."""
    from embedkit.data import load_beir
    from embedkit.data.beir import mteb_document_text

    pairs = dataset["pairs"][:n]
    positives = {p for _, p in pairs}
    small, others = {}, 0
    for doc_id, d in pool.items():
        if mteb_document_text(d.get("title", ""), d["text"]) in positives:
            small[doc_id] = d
        elif others < 5 * n:
            small[doc_id] = d
            others += 1
    test = load_beir(test_folder, "test")
    judged = list(test.relevant_pairs())
    qids = list(dict.fromkeys(q for q, _, _ in judged))[:n]
    keep = set(qids)
    qrels = [(q, d, s) for q, d, s in judged if q in keep]
    docs = dict.fromkeys(d for _, d, _ in qrels)
    for doc_id in test.corpus:
        if len(docs) >= len(qrels) + 5 * n:
            break
        docs.setdefault(doc_id, None)
    folder = work / "smoke-test"
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    _write_jsonl(folder / "corpus.jsonl", ({"_id": d, "title": test.corpus[d].get("title", ""),
                                            "text": test.corpus[d]["text"]} for d in docs))
    _write_jsonl(folder / "queries.jsonl", ({"_id": q, "text": test.queries[q]} for q in qids))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                               + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return {**dataset, "pairs": pairs}, small, f"beir:{folder}:test"


def mine_st_train(dataset, pool_texts: list[str], settings: dict, k: int, batch_size: int):
    mined = mine_st(dataset["pairs"], pool_texts, settings["range"], settings["relative_margin"], k, batch_size,
                    max_length=TRAIN_SETTINGS["max_length"])
    rows = rows_for_pairs(dataset["pairs"], mined["negatives"], mined["negative_scores"], mined["positive_score"])
    return rows, mined["seconds"], mined["log"], mined["stats"]


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
                            seed=MINING_SEED, batch_size=batch_size)
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


def _variant_overrides(variant: str, files: dict[str, Path], k: int, settings: dict, output: Path,
                       seed: int) -> list[str]:
    s = TRAIN_SETTINGS
    train_file = {"none": files["pairs"], "st": files["st"], "embedkit": files["embedkit"],
                  "online": files["pairs"]}[variant]
    overrides = [f"data.train={train_file}", "data.dev=null", "data.max_examples=null", "data.sample=first",
                 "data.columns={query: query, positive: positive, negatives: negatives}"
                 if variant in ("st", "embedkit") else "data.columns={query: query, positive: positive}",
                 f"training.output_dir={output}", "training.progress=false", f"training.batch_size={s['batch_size']}",
                 f"training.lr={s['lr']}", f"training.epochs={s['epochs']}", f"model.max_length={s['max_length']}",
                 f"training.seed={seed}", f"training.threads={s['threads']}",
                 f"loss.hard_negatives={0 if variant == 'none' else k}"]
    if variant == "online":
        lo, hi = settings["range"]
        overrides += ["mining.online=true", f"mining.every={settings['online_every']}", f"mining.range={lo}:{hi}",
                      "mining.sampling=top", f"mining.relative_margin={settings['relative_margin']}",
                      "mining.duplicate_threshold=0.98", f"mining.seed={MINING_SEED}", f"mining.corpus={files['pool']}"]
    if os.environ.get("BENCH_MAX_STEPS"):  # smoke test of the benchmark itself
        overrides.append(f"training.max_steps={os.environ['BENCH_MAX_STEPS']}")
    return overrides


def child_train(spec_path: Path) -> None:
    """One variant and seed in its own process (so peak RSS is its own): train, then evaluate on the test split.
    The whole evaluation report (with per-query scores, for `embedkit compare`) goes to spec["report"]."""
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
    from embedkit.logs import configure_logging

    configure_logging(f"  [{spec['variant']} s{spec['seed']}]")
    result = train(recipe)
    train_s = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    manifest = json.loads((result.output_dir / MANIFEST_NAME).read_text())["training"]
    torch.set_num_threads(TRAIN_SETTINGS["threads"])
    t0 = time.perf_counter()
    encoder = load_model(result.output_dir, max_length=TRAIN_SETTINGS["max_length"])
    report = evaluate(encoder, [spec["task"]], batch_size=64)
    (name,) = report["results"]
    Path(spec["report"]).write_text(json.dumps(report, default=str))
    out = {"variant": spec["variant"], "seed": spec["seed"],
           "ndcg_at_10": report["results"][name]["metrics"]["ndcg_at_10"],
           "steps": result.steps, "samples": result.samples, "train_s": round(train_s, 1),
           "steps_s": round(result.train_seconds, 1), "eval_s": round(time.perf_counter() - t0, 1),
           "peak_rss_gb_train": round(rss, 2), "final_loss": result.final_loss,
           "rows": manifest["data"].get("used"), "hard_negatives": manifest["data"].get("hard_negatives")}
    online = manifest.get("online_mining")
    if online:
        out["refreshes"] = [{k: r[k] for k in ("step", "seconds", "negatives_changed", "rows_changed", "rows_short",
                                               "removed")} for r in online["refreshes"]]
    Path(spec["result"]).write_text(json.dumps(out, indent=2))


def run_variant(name: str, variant: str, seed: int, recipe: str, overrides: list[str], task: str, work: Path,
                reuse: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(result, evaluation report) of one variant trained with one seed, in a child process."""
    import subprocess

    result_path = work / f"{variant}-s{seed}.result.json"
    report_path = work / f"{variant}-s{seed}.report.json"
    if reuse and result_path.is_file() and report_path.is_file():
        print(f"[{name}] {variant} seed {seed}: reusing {result_path}", flush=True)
        return json.loads(result_path.read_text()), json.loads(report_path.read_text())
    spec = work / f"{variant}-s{seed}.spec.json"
    spec.write_text(json.dumps({"variant": variant, "seed": seed, "recipe": recipe, "overrides": overrides,
                                "task": task, "result": str(result_path), "report": str(report_path)}))
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child-train", str(spec)], cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"[{name}] {variant} seed {seed} failed (exit {os.waitstatus_to_exitcode(status)})")
    result = json.loads(result_path.read_text())
    result["child_peak_rss_gb"] = round(usage.ru_maxrss / 1e6, 2)
    result["child_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)  # train + eval; robust to pauses
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result_path.write_text(json.dumps(result, indent=2))
    return result, json.loads(report_path.read_text())


def aggregate_variant(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant over its seeds: nDCG@10 mean and sd (the seed changes the result), timings as medians (the same
    work every seed), peak RSS as the maximum; every seed's numbers kept under *_all / runs."""
    import statistics

    scores = [r["ndcg_at_10"] for r in runs]
    out: dict[str, Any] = {
        "seeds": [r["seed"] for r in runs], "ndcg_at_10": statistics.fmean(scores),
        "ndcg_at_10_sd": statistics.stdev(scores) if len(scores) > 1 else 0.0, "ndcg_at_10_all": scores,
        "train_s": statistics.median(r["train_s"] for r in runs), "train_s_all": [r["train_s"] for r in runs],
        "eval_s": statistics.median(r["eval_s"] for r in runs),
        "child_peak_rss_gb": max(r["child_peak_rss_gb"] for r in runs if r.get("child_peak_rss_gb") is not None)
        if any(r.get("child_peak_rss_gb") is not None for r in runs) else None,
        "rows": runs[0]["rows"], "rows_all": [r["rows"] for r in runs], "steps": runs[0]["steps"],
        "hard_negatives": runs[0].get("hard_negatives"), "final_loss_all": [r["final_loss"] for r in runs],
        "runs": runs}
    if any(r.get("refreshes") for r in runs):
        out["refreshes_all"] = [r.get("refreshes") or [] for r in runs]
        out["online_mining_s"] = statistics.median(sum(x["seconds"] for x in r.get("refreshes") or []) for r in runs)
    return out


def no_negative_text(variant: str, row: dict[str, Any]) -> str:
    """Rows without a negative, as the table shows them (online: per refresh, over all seeds)."""
    timing, result = row.get("mining_time", {}), row["variants"][variant]
    if variant == "none":
        return "all"
    if variant in ("st", "embedkit"):
        value = timing.get(f"{variant}_rows", {}).get("without_negative")
        return "" if value is None else str(value)
    counts = [x["rows_short"] for refreshes in result.get("refreshes_all", []) for x in refreshes]
    return f"{min(counts)}-{max(counts)}" if counts else ""


def train_comparison(args, name: str, data: Path, work: Path, results: dict[str, Any], save) -> None:
    import statistics

    from embedkit.eval.runner import evaluate
    from embedkit.models import load_model

    k = args.num_negatives
    settings = TRAIN_MINING[name]
    definition = window_definition(settings["range"], settings["relative_margin"], k)
    work.mkdir(parents=True, exist_ok=True)
    dataset = load_scifact(data) if name == "scifact" else load_medquad(data, args.medquad_sample, args.seed)
    pool = train_pool(name, data, dataset)
    task = f"beir:{data / TEST_FOLDERS[name]}:test"
    if args.smoke:
        dataset, pool, task = smoke_cut(args.smoke, dataset, pool, data / TEST_FOLDERS[name], work)
    pairs = dataset["pairs"]
    row: dict[str, Any] = results.setdefault(name, {})
    row.update({"pairs": len(pairs), "pool": len(pool), "num_negatives": k, "seeds": args.seed_list,
                "mining": {"range": settings["range"], "relative_margin": settings["relative_margin"],
                           "sampling": "top", "online_every": settings["online_every"]},
                "window_definition": definition, "task": task})
    print(f"\n== {name}: {len(pairs):,} training pairs, pool {len(pool):,} documents, {k} negative(s), "
          f"seeds {args.seed_list}\n[{name}] window (both miners): {definition}", flush=True)
    files = {"pairs": work / "pairs.jsonl", "pool": work / "pool.jsonl", "st": work / "st-train.jsonl",
             "embedkit": work / "embedkit-train.jsonl", "embedkit_mined": work / "embedkit-mined.jsonl"}
    _write_jsonl(files["pairs"], ({"query": q, "positive": p} for q, p in pairs))
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
    if not (timing.get("window_definition") == definition and timing.get("pairs") == len(pairs)
            and files["st"].is_file() and files["embedkit"].is_file()):
        st_times, ek_times = [], []
        for repeat in range(args.mine_repeats):
            st_rows, st_s, st_log, st_stats = mine_st_train(dataset, pool_texts, settings, k, args.batch_size)
            summary, ek_s = mine_embedkit_train(dataset, pool, settings, k, args.batch_size, files["embedkit_mined"])
            st_times.append(st_s)
            ek_times.append(ek_s)
            print(f"[{name}] mining round {repeat + 1}: ST wall {st_s[0]:.1f} s / CPU {st_s[1]:.1f} s, embedkit wall "
                  f"{ek_s[0]:.1f} s / CPU {ek_s[1]:.1f} s", flush=True)
        ek_rows = rows_for_pairs(pairs, *per_query(_read_jsonl(files["embedkit_mined"])))
        if [(r["query"], r["positive"]) for r in st_rows] != [(r["query"], r["positive"]) for r in ek_rows]:
            raise SystemExit(f"[{name}] ST's and embedkit's training rows differ")
        for key, rows in (("st", st_rows), ("embedkit", ek_rows)):  # what the trainer reads: the same rows
            _write_jsonl(files[key], ({"query": r["query"], "positive": r["positive"], "negatives": r["negatives"]}
                                      for r in rows))
        stats = summary["stats"]
        # Wall and CPU seconds (CPU time of this process, threads included): on a shared machine whose other jobs
        # may pause or slow this one, CPU time is the comparable number.
        timing = {"window_definition": definition, "pairs": len(pairs), "st_s": st_times, "embedkit_s": ek_times,
                  "st_median_s": statistics.median(t[0] for t in st_times),
                  "embedkit_median_s": statistics.median(t[0] for t in ek_times),
                  "st_median_cpu_s": statistics.median(t[1] for t in st_times),
                  "embedkit_median_cpu_s": statistics.median(t[1] for t in ek_times),
                  "st_rows": without_negative(st_rows, k), "embedkit_rows": without_negative(ek_rows, k),
                  "rows_without_negative_on_both": sum(not a["negatives"] and not b["negatives"]
                                                       for a, b in zip(st_rows, ek_rows)),
                  "st_filter": st_stats, "embedkit_removed": stats["removed"],
                  "embedkit_positive_ranked_before_window": stats["positive_ranked_before_window"],
                  "st_log": [line for line in st_log.splitlines() if line.strip() and "it/s" not in line]}
        timing_path.write_text(json.dumps(timing, indent=2))
    row["mining_time"] = timing
    st_r, ek_r = timing["st_rows"], timing["embedkit_rows"]
    print(f"[{name}] mining (median of {len(timing['st_s'])}): ST wall {timing['st_median_s']:.1f} s, CPU "
          f"{timing['st_median_cpu_s']:.1f} s; embedkit wall {timing['embedkit_median_s']:.1f} s, CPU "
          f"{timing['embedkit_median_cpu_s']:.1f} s\n[{name}] rows: {st_r['rows']} on every variant; without a "
          f"negative: ST {st_r['without_negative']}, embedkit {ek_r['without_negative']} (both: "
          f"{timing['rows_without_negative_on_both']})"
          + (f"; short of {k}: ST {st_r['short']}, embedkit {ek_r['short']}" if k > 1 else ""), flush=True)
    save()

    recipe = {"scifact": "recipes/minilm-scifact.yaml", "medquad": "recipes/minilm-medquad.yaml"}[name]
    variants = [v for v in VARIANTS if v in {x.strip() for x in args.variants.split(",")}]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    reports: dict[str, list[dict]] = {v: [] for v in variants}
    started = time.perf_counter()
    for index, seed in enumerate(args.seed_list):
        for variant in (variants if index % 2 == 0 else variants[::-1]):  # no variant always first (warm caches)
            overrides = _variant_overrides(variant, files, k, settings, work / f"model-{variant}-s{seed}", seed)
            result, report = run_variant(name, variant, seed, recipe, overrides, task, work, args.reuse)
            runs[variant].append(result)
            reports[variant].append(report)
            print(f"[{name}] {variant:9s} seed {seed}: nDCG@10 {result['ndcg_at_10']:.4f}, {result['rows']} rows, "
                  f"train {result['train_s']:.0f} s, eval {result['eval_s']:.0f} s, peak RSS "
                  f"{result.get('child_peak_rss_gb', float('nan')):.2f} GB", flush=True)
    row["variants"] = {v: aggregate_variant(runs[v]) for v in variants}
    rows_trained = {v: sorted(set(r["rows_all"])) for v, r in row["variants"].items()}
    if len({tuple(x) for x in rows_trained.values()}) > 1:
        print(f"[{name}] WARNING: the variants trained on different numbers of rows: {rows_trained}", flush=True)
    for variant, r in row["variants"].items():
        print(f"[{name}] {variant:9s} nDCG@10 {r['ndcg_at_10']:.4f} +- {r['ndcg_at_10_sd']:.4f} over seeds "
              f"{r['seeds']} ({', '.join(f'{x:.4f}' for x in r['ndcg_at_10_all'])})", flush=True)
    print(f"[{name}] {time.perf_counter() - started:.0f} s for all variants and seeds", flush=True)
    from bench_train import seed_mean_report, verdict_between  # stdlib-only imports at its top

    means = {v: seed_mean_report(reports[v]) for v in variants}
    row["verdicts"] = {}
    for base, cand in VERDICTS:
        if base in means and cand in means:
            row["verdicts"][f"{cand}_vs_{base}"] = verdict_between(
                means[base], means[cand], VARIANT_NAMES[base], VARIANT_NAMES[cand], args.seed_list[0])
    save()


def print_train_table(results: dict[str, Any]) -> None:
    print(f"\n{describe_cpu(results['cpu'])}")
    print(f"{'dataset':<9}{'variant':<26}{'rows':>6}{'no neg':>8}{'nDCG@10 mean +- sd (n)':>26}{'vs a)':>9}"
          f"{'mine CPU s':>11}{'mine s':>8}{'train s':>9}{'RSS GB':>8}")
    for name in ("scifact", "medquad"):
        row = results.get(name)
        if not row or "variants" not in row:
            continue
        print(f"{name:<9}{'base MiniLM (untrained)':<26}{'':>6}{'':>8}{row['base_ndcg_at_10']:>26.4f}")
        base = row["variants"].get("none", {}).get("ndcg_at_10")
        timing = row.get("mining_time", {})
        for variant, r in row["variants"].items():
            mining = {"st": timing.get("st_median_s"), "embedkit": timing.get("embedkit_median_s")}.get(variant)
            cpu = {"st": timing.get("st_median_cpu_s"), "embedkit": timing.get("embedkit_median_cpu_s")}.get(variant)
            if variant == "online" and r.get("online_mining_s") is not None:
                mining = r["online_mining_s"]  # wall time of all refreshes, inside training (median over seeds)
            delta = f"{r['ndcg_at_10'] - base:+.4f}" if base is not None and variant != "none" else ""
            score = f"{r['ndcg_at_10']:.4f} +- {r['ndcg_at_10_sd']:.4f} ({len(r['seeds'])})"
            rss = r.get("child_peak_rss_gb")
            print(f"{name:<9}{VARIANT_NAMES[variant]:<26}{r.get('rows') or 0:>6}{no_negative_text(variant, row):>8}"
                  f"{score:>26}{delta:>9}{(f'{cpu:.1f}' if cpu is not None else ''):>11}"
                  f"{(f'{mining:.1f}' if mining is not None else ''):>8}{r['train_s']:>9.0f}"
                  f"{(f'{rss:.2f}' if rss is not None else ''):>8}")
        for key, v in row.get("verdicts", {}).items():
            print(f"{name:<9}{key}: {v['difference']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}], "
                  f"p(improvement) {v['p_improvement']:.3f}, gate {v['verdict']} (per-query nDCG@10 averaged over "
                  f"the seeds)")
        print(f"{name:<9}window: {row.get('window_definition', '')}")


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
    parser.add_argument("--seeds", default=DEFAULT_SEEDS,
                        help=f"--train: comma-separated training seeds, every variant trains once per seed (default "
                             f"{DEFAULT_SEEDS}); the mining is deterministic and runs once")
    parser.add_argument("--reuse", action="store_true",
                        help="--train: reuse mined files and finished variant/seed runs found in --out (resume a run)")
    parser.add_argument("--smoke", type=int, default=0, metavar="N",
                        help="--train: test the benchmark itself on N pairs, a small pool and a small test task "
                             "(use with BENCH_MAX_STEPS=1; results default to --out)")
    parser.add_argument("--child-train", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_train:
        child_train(Path(args.child_train))
        return
    cpu = int8_instructions()
    print(describe_cpu(cpu), flush=True)
    if args.train:
        import torch

        try:
            args.seed_list = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--seeds: not a comma-separated list of integers: {args.seeds!r}")
        if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
            parser.error("--seeds: give at least one seed, each once")
        unknown = {v.strip() for v in args.variants.split(",") if v.strip()} - set(VARIANTS)
        if unknown:
            parser.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
        torch.set_num_threads(2)
        out = Path(args.out or "/tmp/embedkit-bench-mine-train")
        default_json = out / "result.json" if args.smoke else REPO / "bench" / "results" / "mine_train.json"
        json_path = Path(args.json or default_json)
        results: dict[str, Any] = {"settings": {**TRAIN_SETTINGS, "seeds": args.seed_list}, "mining": TRAIN_MINING,
                                   "cpu": cpu, "smoke": args.smoke or None,
                                   "max_steps": os.environ.get("BENCH_MAX_STEPS") or None,
                                   "command": " ".join(sys.argv), "load_average_start": os.getloadavg()}
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
                               "cpu": cpu, "load_average_start": os.getloadavg()}
    mined_files: dict[str, dict[str, Path]] = {}
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        dataset = load_scifact(data) if name == "scifact" else load_medquad(data, args.medquad_sample, args.seed)
        pool = len(dataset["corpus"]) if dataset["corpus"] else len({p for _, p in dataset["pairs"]})
        print(f"\n== {name}: {len(dataset['pairs']):,} pairs, pool {pool:,} documents", flush=True)
        print(f"window (both miners): {window_definition(WINDOW, RELATIVE_MARGIN, NUM_NEGATIVES)}", flush=True)
        st_rows, st_seconds, st_log, st_stats = run_st(dataset, args.batch_size)
        print(f"sentence-transformers mine_hard_negatives (raw ranking to rank {st_stats['ranking_depth']}, "
              f"post-filtered): wall {st_seconds[0]:.1f} s, CPU {st_seconds[1]:.1f} s, {len(st_rows):,} rows, "
              f"{st_stats['queries_without_negative']:,} of {st_stats['queries']:,} queries without a negative; "
              f"removed in the window: {st_stats['removed']}")
        print("  ST's log (statistics of the raw ranking it returned, not of the chosen negatives):\n  "
              + "\n  ".join(line for line in st_log.splitlines() if line.strip() and "it/s" not in line))
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
        empty = rows_without_negatives(st_rows, ek_rows)
        print(f"rows (= pairs, the same on both sides): {empty['rows']:,}; without a negative: ST "
              f"{empty['st']['count']:,}, embedkit {empty['embedkit']['count']:,} (both {empty['both']:,}); their "
              f"positive's score (embedkit's): ST {empty['st']['positive_score_without']}, embedkit "
              f"{empty['embedkit']['positive_score_without']}; rows with a negative: "
              f"{empty['embedkit']['positive_score_with']}")
        results[name] = {"pairs": len(dataset["pairs"]), "pool": pool, "rows_without_negative": empty,
                         "window_definition": window_definition(WINDOW, RELATIVE_MARGIN, NUM_NEGATIVES),
                         "st": {"wall_s": round(st_seconds[0], 2), "cpu_s": round(st_seconds[1], 2),
                                "rows": len(st_rows), "log": st_log, "filter": st_stats,
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
    print(f"\n{describe_cpu(cpu)}\nmined files in {out}; load average {results['load_average_start']} -> "
          f"{results['load_average_end']}")


if __name__ == "__main__":
    main()
