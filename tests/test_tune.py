"""`embedkit tune` on tiny models: the dev split, seeded trials, the budget, the written recipe, mining that adapts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from embedkit.errors import ConfigError
from embedkit.train.config import load_recipe
from embedkit.tune.budget import parse_budget
from embedkit.tune.run import tune
from embedkit.tune.split import carve_dev_split

# 14 query texts (one of them with two positives) over the tiny models' vocabulary.
PAIRS = [
    ("what causes a fever and a cough", "the patient has a fever and a cough"),
    ("what is diabetes", "diabetes is a disease of high blood sugar"),
    ("what is diabetes", "insulin lowers the level of glucose in the blood"),
    ("what does insulin do", "insulin lowers the level of glucose in the blood"),
    ("who is playing a guitar", "a man is playing a guitar on the stage"),
    ("what did the court rule", "the court ruled that the contract was void"),
    ("did interest rates rise", "interest rates rose by half a percent this quarter"),
    ("high blood pressure causes", "what causes high blood pressure in adults"),
    ("asthma in children", "how is asthma treated in children"),
    ("the fox and the dog", "the quick brown fox jumps over the lazy dog"),
    ("flu symptoms", "symptoms of flu include fever, aches and fatigue"),
    ("fever and aches", "symptoms of flu include fever, aches and fatigue"),
    ("a void contract", "the court ruled that the contract was void"),
    ("glucose in the blood", "insulin lowers the level of glucose in the blood"),
    ("a man on the stage", "a man is playing a guitar on the stage"),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_pairs(path: Path) -> Path:
    path.write_text("".join(json.dumps({"q": q, "p": p}) + "\n" for q, p in PAIRS))
    return path


def write_beir(folder: Path, split: str = "train", graded: bool = True) -> Path:
    """A BEIR folder: the pairs' documents as the corpus, one query id per pair row, and a repeated query text
    under a second id; graded qrels (3 for the first positive of a query, 1 for later ones)."""
    docs = list(dict.fromkeys(p for _, p in PAIRS))
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                                 for i, t in enumerate(docs)))
    texts = list(dict.fromkeys(q for q, _ in PAIRS)) + ["what is diabetes"]  # q14 repeats q1's text
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                                                  for i, t in enumerate(texts)))
    rows, seen = [], set()
    for q, p in PAIRS:
        qid = texts.index(q)
        rows.append(f"q{qid}\td{docs.index(p)}\t{1 if (qid in seen or not graded) else 3}\n")
        seen.add(qid)
    rows.append(f"q14\td{docs.index(PAIRS[3][1])}\t2\n")
    (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(rows))
    return folder


# Questions none of which is a training query (PAIRS), over the same documents: a genuine test split.
HELD_OUT = [
    ("why does the patient cough", "the patient has a fever and a cough"),
    ("what lowers blood sugar", "insulin lowers the level of glucose in the blood"),
    ("what did the judge decide", "the court ruled that the contract was void"),
    ("who plays music on the stage", "a man is playing a guitar on the stage"),
    ("how are children with asthma treated", "how is asthma treated in children"),
]


def write_held_out(folder: Path, split: str = "test", pairs=HELD_OUT, id_prefix: str = "t") -> Path:
    """A BEIR split of `pairs` (ids `t0`, `t1`, ...) over the training pairs' documents."""
    docs = list(dict.fromkeys(p for _, p in PAIRS))
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                                 for i, t in enumerate(docs)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"{id_prefix}{i}", "text": q}) + "\n"
                                                  for i, (q, _) in enumerate(pairs)))
    (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{id_prefix}{i}\td{docs.index(p)}\t1\n" for i, (_, p) in enumerate(pairs)))
    return folder


def write_recipe(path: Path, model_dir: Path, train: str, out: Path, **sections) -> Path:
    raw = {"model": {"name": str(model_dir), "max_length": 32},
           "data": {"train": train, "columns": {"query": "q", "positive": "p"}},
           "loss": {"temperature": 0.05},
           "training": {"output_dir": str(out), "batch_size": 4, "lr": 1e-3, "epochs": 1, "seed": 7,
                        "progress": False, "threads": 1}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedkit.cli", *args], capture_output=True, text=True)


# ---------------------------------------------------------------------------------------------------- the budget
def test_budget_forms_and_errors():
    assert parse_budget("30m").seconds == 1800 and parse_budget("2h").seconds == 7200
    assert parse_budget("90s").seconds == 90 and parse_budget("1.5h").seconds == 5400
    assert parse_budget("20").trials == 20 and parse_budget("20").seconds is None
    for bad in ("", "0", "30x", "-5", "1.5", "m", "0m", "ten"):
        with pytest.raises(ConfigError) as info:
            parse_budget(bad)
        assert info.value.field == "--budget" and "\n" not in str(info.value)


def test_bad_budget_is_a_one_line_error_with_exit_code_2(tmp_path):
    result = run_cli("tune", str(tmp_path / "missing.yaml"), "--budget", "30x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: field '--budget': expected a time such as 30m, 2h or 90s, or a number of trials such as 20; "
        "got '30x'"]
    # a good budget, then a missing recipe: named, one line
    result = run_cli("tune", str(tmp_path / "missing.yaml"), "--budget", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.yaml'}: recipe file not found"]


def test_help_teaches_with_examples():
    out = run_cli("tune", "--help").stdout
    assert "Examples" in out and "--budget 2h" in out and "tuned_recipe.yaml" in out
    assert "margin-grade" in run_cli("mine", "--help").stdout


# ---------------------------------------------------------------------------------------------------- the dev split
def test_dev_split_of_a_pairs_file_never_shares_a_query(tmp_path, tiny_bert_dir):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                                      tmp_path / "out"))
    split = carve_dev_split(recipe, tmp_path / "split", fraction=0.3, seed=3)
    train_q = {json.loads(line)["query"] for line in (tmp_path / "split" / "train.jsonl").read_text().splitlines()}
    dev_q = {json.loads(line)["text"] for line in
             (tmp_path / "split" / "dev" / "queries.jsonl").read_text().splitlines()}
    assert train_q and dev_q and not train_q & dev_q
    assert train_q | dev_q == {q for q, _ in PAIRS}
    assert split.dev_queries == len(dev_q) == 4 and split.train_pairs + split.dev_pairs == len(PAIRS)
    # every dev judgment points at a document of the dev corpus; same seed, same split; another seed, another one
    doc_ids = {json.loads(line)["_id"] for line in (tmp_path / "split" / "dev" / "corpus.jsonl").read_text().splitlines()}
    qrels = (tmp_path / "split" / "dev" / "qrels" / "dev.tsv").read_text().splitlines()[1:]
    assert qrels and all(line.split("\t")[1] in doc_ids for line in qrels)
    again = carve_dev_split(recipe, tmp_path / "split2", fraction=0.3, seed=3)
    assert again.dev_query_texts == split.dev_query_texts
    assert carve_dev_split(recipe, tmp_path / "split3", fraction=0.3, seed=4).dev_query_texts != split.dev_query_texts


def test_dev_split_of_a_beir_set_keeps_repeated_query_texts_together_and_grades(tmp_path, tiny_bert_dir):
    beir = write_beir(tmp_path / "beir")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_bert_dir, f"beir:{beir}:train", tmp_path / "out"))
    for seed in range(6):
        folder = tmp_path / f"split{seed}"
        split = carve_dev_split(recipe, folder, fraction=0.3, dev_docs=8, seed=seed)
        queries = {json.loads(line)["_id"]: json.loads(line)["text"]
                   for line in (beir / "queries.jsonl").read_text().splitlines()}
        train_rows = [line.split("\t") for line in
                      (folder / "train" / "qrels" / "tune-train.tsv").read_text().splitlines()[1:]]
        dev_rows = [line.split("\t") for line in (folder / "dev" / "qrels" / "dev.tsv").read_text().splitlines()[1:]]
        train_texts = {queries[q] for q, _, _ in train_rows}
        dev_texts = {queries[q] for q, _, _ in dev_rows}
        assert not train_texts & dev_texts and dev_texts == set(split.dev_query_texts)
        assert len(train_rows) + len(dev_rows) == len(PAIRS) + 1  # every judgment on exactly one side
        original = {tuple(line.split("\t")[:2]): line.split("\t")[2]
                    for line in (beir / "qrels" / "train.tsv").read_text().splitlines()[1:]}
        assert all(original[(q, d)] == g for q, d, g in train_rows + dev_rows)  # grades kept
        dev_docs = {json.loads(line)["_id"] for line in (folder / "dev" / "corpus.jsonl").read_text().splitlines()}
        assert {d for _, d, _ in dev_rows} <= dev_docs and len(dev_docs) <= max(8, len({d for _, d, _ in dev_rows}))


def test_dev_corpus_holds_the_base_models_nearest_documents_from_all_the_rows(tmp_path, tiny_bert_dir):
    """With a ranker, the dev corpus is the dev positives, then each dev query's nearest non-positive documents
    (round robin), drawn from every row of the file (also those data.max_examples leaves out), then random ones."""
    fillers = [(f"filler question {i}", f"filler answer number {i} about the weather") for i in range(30)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"q": q, "p": p}) + "\n" for q, p in PAIRS + fillers))
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(path), tmp_path / "out",
                                      data={"max_examples": 25, "sample": "random"}))
    seen: dict[str, list] = {}

    def words(text):
        return set(text.replace(",", "").split())

    def rank(queries, documents, k):  # word overlap, ties by position: a stand-in for the base model
        seen["documents"] = list(documents)
        return [sorted(range(len(documents)), key=lambda i: (-len(words(q) & words(documents[i])), i))[:k]
                for q in queries]

    split = carve_dev_split(recipe, tmp_path / "split", fraction=0.3, dev_docs=20, seed=1, rank=rank)
    corpus = [json.loads(line)["text"] for line in (tmp_path / "split" / "dev" / "corpus.jsonl").read_text().splitlines()]
    dev_queries = [json.loads(line)["text"] for line in
                   (tmp_path / "split" / "dev" / "queries.jsonl").read_text().splitlines()]
    positives = {p for q, p in PAIRS + fillers if q in dev_queries}
    assert len(corpus) == split.dev_documents == 20 and positives <= set(corpus)
    # the ranker saw every document of the file (the 5 left-out rows' too), the dev positives excepted
    assert set(seen["documents"]) == {p for _, p in PAIRS + fillers} - positives
    hard_slots = int(0.75 * (20 - len(positives)))
    assert split.hard_documents == hard_slots
    # each dev query's nearest non-positive is in (one pass of the round robin fits in the slots here)
    assert len(dev_queries) <= hard_slots
    for q in dev_queries:
        nearest = min((d for d in seen["documents"]), key=lambda d: (-len(words(q) & words(d)),
                                                                      seen["documents"].index(d)))
        assert nearest in corpus
    # without a ranker: the old sample (positives plus random documents of the used rows only)
    plain = carve_dev_split(recipe, tmp_path / "plain", fraction=0.3, dev_docs=16, seed=1)
    assert plain.hard_documents == 0 and plain.dev_query_texts == split.dev_query_texts


def test_base_model_ranker_ranks_by_the_base_model_and_caches_the_documents(tmp_path, tiny_bert_dir, monkeypatch):
    """The ranking is the base model's exact top-k (checked against numpy); the documents' embeddings go to the
    embedding cache, so a second ranking of the same documents encodes only the queries."""
    from embedkit.models.encoder import Encoder, load_model
    from embedkit.tune.prepare import base_model_ranker

    monkeypatch.setenv("EMBEDKIT_HOME", str(tmp_path / "home"))
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                                      tmp_path / "out", training={"threads": 2}))
    queries = list(dict.fromkeys(q for q, _ in PAIRS))[:4]
    documents = list(dict.fromkeys(p for _, p in PAIRS))
    model = load_model(str(tiny_bert_dir), max_length=32)
    scores = model.encode(queries, kind="query", normalize=True) @ model.encode(documents, kind="document",
                                                                                 normalize=True).T
    expected = [list(np.argsort(-row, kind="stable")[:3]) for row in scores]
    kinds: list[str] = []
    encode = Encoder.encode

    def counting(self, texts, *args, kind="document", **kwargs):
        kinds.append(kind)
        return encode(self, texts, *args, kind=kind, **kwargs)

    monkeypatch.setattr(Encoder, "encode", counting)
    rank = base_model_ranker(recipe, "cpu")
    first = rank(queries, documents, 3)
    assert first == expected and kinds == ["query", "document"]
    kinds.clear()
    assert rank(queries, documents, 3) == first and kinds == ["query"]
    assert list((tmp_path / "home" / "embeddings").glob("*.npy"))
    assert torch.get_num_threads() == 1  # the recipe's 2 threads were for the ranking only


# ---------------------------------------------------------------------------------------------------- the search
def test_a_fixed_seed_gives_the_same_trials(tmp_path, tiny_bert_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                          tmp_path / "out")
    a = tune(recipe, budget="3", output=tmp_path / "a", seed=5, final=False, folds=1, isolate=False)
    b = tune(recipe, budget="3", output=tmp_path / "b", seed=5, final=False, folds=1, isolate=False)
    assert len(a.trials) == len(b.trials) == 3  # the trial budget, exactly
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    assert [t.value for t in a.trials] == [t.value for t in b.trials]
    # trial 0: the recipe as written (no mined negatives, so no mining window either)
    assert a.trials[0].params == {"lr": 1e-3, "epochs": 1, "temperature": 0.05, "mined_negatives": 0}
    # trial 1: the same recipe trained longer at twice the lr, with one mined negative (its window as written);
    # longer means the search's first epoch cap (3), not the epochs' bound (10 here: 3 steps per epoch)
    assert a.trials[1].params == {"lr": 2e-3, "epochs": 3, "temperature": 0.05, "mined_negatives": 1,
                                  "mining_range": "10:100"}
    assert [t.number for t in a.trials] == [0, 1, 2]
    assert len({json.dumps(t.params, sort_keys=True) for t in a.trials}) == 3
    report = json.loads((tmp_path / "a" / "tune_report.json").read_text())
    assert [t["params"] for t in report["trials"]] == [t.params for t in a.trials]
    assert (tmp_path / "a" / "dev_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "a" / "trials").exists()  # trial models are removed


def test_a_time_budget_stops_starting_new_trials(tmp_path, tiny_bert_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                          tmp_path / "out")
    now = [0.0]
    started_at = []

    def trial_hook(number):  # every trial "takes" 10 s on this clock
        started_at.append(now[0])
        now[0] += 10.0

    result = tune(recipe, budget="20s", output=tmp_path / "t", final=False, clock=lambda: now[0],
                  trial_hook=trial_hook, folds=1, isolate=False)
    # trial 0 ran 3 steps (1 epoch, 2 texts each) in 10 s; trial 1 (3 epochs of 3 steps, 3 texts each: ~45 s) would
    # end after the 20 s budget, and so would its shortest form (1 epoch: ~15 s)
    assert len(result.trials) == 1 and started_at == [0.0]
    assert "epochs=3" in result.report["stop_reason"]
    assert "would end after the 20 s budget" in result.report["stop_reason"]


def tune_on_a_fake_clock(tmp_path, tiny_bert_dir, monkeypatch, budget, *, seconds_per_text, round_seconds=None,
                         preparation_seconds=0.0, **kwargs):
    """`tune` with its training faked on a clock: a step "takes" seconds_per_text x the texts of an example (query,
    positive, negatives), a round of online mining round_seconds (also the probe's estimate, when given), carving the
    dev split preparation_seconds; the dev score grows with the epochs. Returns the result and the clock at the end."""
    from types import SimpleNamespace

    import embedkit.train.contrastive as contrastive
    import embedkit.tune.run as run

    now = [0.0]

    def fake_train(recipe, on_eval=None, **_):
        total = recipe.training.epochs * 3  # 11 training pairs at batch 4
        rounds = recipe.training.epochs - 1 if recipe.mining.online else 0
        now[0] += total * (2 + (recipe.loss.hard_negatives or 0)) * seconds_per_text + (round_seconds or 0) * rounds
        on_eval(total, {"score": 0.5 + 0.01 * recipe.training.epochs}, total)
        return SimpleNamespace(dev=None, steps=total)

    monkeypatch.setattr(contrastive, "train", fake_train)
    carve = run.carve_dev_splits

    def slow_carve(*args, **kw):
        now[0] += preparation_seconds
        return carve(*args, **kw)

    monkeypatch.setattr(run, "carve_dev_splits", slow_carve)
    if round_seconds is not None:
        import embedkit.tune.prepare as prepare

        monkeypatch.setattr(prepare, "mining_round_seconds", lambda *a, **k: round_seconds)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                          tmp_path / "out")
    result = tune(recipe, budget=budget, output=tmp_path / "t", final=False, clock=lambda: now[0], folds=1,
                  isolate=False, **kwargs)
    return result, now[0]


def test_a_time_budget_weighs_the_next_trial_by_its_steps(tmp_path, tiny_bert_dir, monkeypatch):
    """Each step "takes" 1 s: trial 0 (1 epoch, 3 steps) and trial 1 (3 epochs, 9 steps) use 12 s of 50. A trial
    starts only when its own steps fit in what is left; a median trial length would start long trials late and end
    them after the budget."""
    import re

    result, end = tune_on_a_fake_clock(tmp_path, tiny_bert_dir, monkeypatch, "50s", seconds_per_text=0.5,
                                       params=["lr", "epochs"])
    assert [t.params["epochs"] for t in result.trials[:2]] == [1, 3]
    assert sum(t.seconds for t in result.trials) <= 50  # every trial that started ended in time
    assert [t.number for t in result.trials] == list(range(len(result.trials)))  # no gaps
    reason = result.report["stop_reason"]
    refused = re.search(r"epochs=(\d+)\] \(~\d+ s: (\d+) steps", reason)
    assert refused, reason  # it stopped because the proposed trial's steps did not fit
    assert int(refused.group(2)) == 3 * int(refused.group(1)) and end + 3 > 50  # not even 1 epoch fits


def test_the_epochs_grow_only_when_the_best_trial_ran_at_the_cap(tmp_path, tiny_bert_dir, monkeypatch):
    """Short trials first: proposals run with at most the epoch cap (3 here), which doubles each time the best trial
    is one that ran at it (the fake dev score grows with the epochs, so the longest trial is always best). Bug this
    catches: a search that spends its budget on a few trials at the epochs' bound (a held-out search ran one 8-epoch
    trial for 23 of its 40 minutes), or a cap that never grows so longer schedules are never tried."""
    result, _ = tune_on_a_fake_clock(tmp_path, tiny_bert_dir, monkeypatch, "10", seconds_per_text=0.01,
                                     params=["lr", "epochs"])
    cap, caps = 3, []
    for t in result.trials:
        caps.append(cap)
        assert t.params["epochs"] <= cap, [(r.number, r.params, r.note) for r in result.trials]
        best = max((r for r in result.trials[: t.number + 1] if r.state == "complete"), key=lambda r: r.value)
        if best.params["epochs"] >= cap:
            cap = min(10, 2 * cap)
    assert max(t.params["epochs"] for t in result.trials) > 3 and caps[-1] > 3
    capped = [t for t in result.trials if "the epochs' cap" in t.note]
    assert all(t.params["epochs"] == caps[t.number] for t in capped)


def test_a_proposal_that_does_not_fit_runs_with_the_epochs_that_do(tmp_path, tiny_bert_dir, monkeypatch):
    """Each step "takes" 1 s. Trial 0 (1 epoch, 3 steps) leaves 7 s of 10; trial 1 as proposed (3 epochs, 9 s) would
    end late, so it runs with the most epochs that fit (2: 6 s), its other values unchanged; then not even 1 epoch
    fits in the 1 s left and the search stops. Stopping at the first proposal that did not fit left 24 of SciFact's
    60 minutes unused. The shortened trial keeps the next number (the sampler's refused proposal left a gap)."""
    result, end = tune_on_a_fake_clock(tmp_path, tiny_bert_dir, monkeypatch, "10s", seconds_per_text=0.5,
                                       params=["lr", "epochs"])
    assert [t.params for t in result.trials] == [{"lr": 1e-3, "epochs": 1}, {"lr": 2e-3, "epochs": 2}]
    assert [t.number for t in result.trials] == [0, 1]
    assert [t.seconds for t in result.trials] == [3.0, 6.0] and end <= 10
    assert result.trials[1].state == "complete"
    assert result.trials[1].note == "proposed with epochs=3 (~9 s), shortened to 2 to end within the budget (7 s left)"
    assert "epochs=" in result.report["stop_reason"] and "would end after the 10 s budget" in result.report["stop_reason"]
    report = json.loads((tmp_path / "t" / "tune_report.json").read_text())
    assert "shortened to 2" in report["trials"][1]["note"] and report["trials"][1]["number"] == 1
    assert "shortened to 2" in (tmp_path / "t" / "tune_report.md").read_text()


def test_a_time_budget_counts_the_preparation(tmp_path, tiny_bert_dir, monkeypatch):
    """Carving the dev split "takes" 5 s of the 15 s budget (on MedQuAD, ranking the dev corpus took 4 of 60 minutes
    before the first trial), then each step 1 s: trial 0 (3 steps) leaves 7 s, so trial 1 (3 epochs, 9 s) runs with
    2 (6 s), where it would run whole if the budget started with the search, and the whole run, preparation
    included, ends within the 15 s."""
    result, end = tune_on_a_fake_clock(tmp_path, tiny_bert_dir, monkeypatch, "15s", seconds_per_text=0.5,
                                       preparation_seconds=5.0, params=["lr", "epochs"])
    assert [t.params["epochs"] for t in result.trials] == [1, 2] and end == 14.0
    assert result.report["preparation_seconds"] == 5.0 and result.report["search_seconds"] == 14.0
    assert "(7 s left)" in result.trials[1].note
    assert "(5 s of it preparing the dev split" in (tmp_path / "t" / "tune_report.md").read_text()


def test_a_time_budget_counts_the_texts_per_example_and_the_rounds_of_mining(tmp_path, tiny_bert_dir, monkeypatch):
    """Each text of an example "takes" 1 s per step and a round of online mining 20 s (the probe's estimate). Trial 1
    (3 epochs of 3 steps, a mined negative: 9 x 3 texts + 2 paid rounds x 20 s = 67 s) does not fit in what trial
    0 (3 steps x 2 texts = 6 s) leaves of 50 s; it runs with 2 epochs (6 x 3 + 1 x 20 = 38 s). Counted in plain
    steps (9 x 2 s) the 3 epochs would start and end 23 s late."""
    result, _ = tune_on_a_fake_clock(tmp_path, tiny_bert_dir, monkeypatch, "50s", seconds_per_text=1.0,
                                     round_seconds=20.0)
    assert [t.seconds for t in result.trials] == [6.0, 38.0]
    assert result.report["probe"]["round_seconds"] == 20.0
    assert result.trials[1].params["epochs"] == 2 and result.trials[1].params["mined_negatives"] == 1
    assert result.trials[1].note.startswith("proposed with epochs=3 (~67 s), shortened to 2 ")
    # the next proposal is weighed at the same rate (both trials ran at 1 s per text once the rounds are counted)
    assert "at the trials' median 1.00 s per text" in result.report["stop_reason"], result.report["stop_reason"]


def test_the_probe_estimates_a_mining_round_from_a_sample(tiny_bert_dir):
    """A round re-encodes the pool and the queries: the estimate scales a timed sample of each to its full size."""
    from types import SimpleNamespace

    from embedkit.models.encoder import load_model
    from embedkit.tune.prepare import mining_round_seconds

    encoder = load_model(str(tiny_bert_dir), max_length=32)
    sizes = []
    encode = encoder.encode

    def counting(texts, *args, **kwargs):
        sizes.append((len(texts), kwargs["kind"]))
        return encode(texts, *args, **kwargs)

    encoder.encode = counting
    task = SimpleNamespace(corpus_texts=[f"document number {i}" for i in range(1000)],
                           query_texts=[f"query {i}" for i in range(50)])
    seconds = mining_round_seconds(encoder, task, batch_size=16, sample=100)
    assert sizes == [(100, "document"), (50, "query")] and seconds > 0


def test_bad_trials_are_pruned_from_the_engines_dev_evaluations(tmp_path, tiny_bert_dir, monkeypatch):
    """The pruner sees every dev evaluation: a trial below the median of the finished ones at the same step stops
    there (a stand-in for the engine reports the evaluations, so the scores are known in advance)."""
    from types import SimpleNamespace

    import embedkit.train.contrastive as contrastive

    calls: dict[float, list[int]] = {}

    def fake_train(recipe, on_eval=None, **_):
        good = recipe.training.lr >= 1e-3  # trial 0 (the recipe) and half of the others
        steps = calls.setdefault(recipe.training.lr, [])
        for step in (2, 4, 6, 8):
            steps.append(step)
            on_eval(step, {"score": 0.8 if good else 0.2}, 8)
        return SimpleNamespace(dev=None, steps=8)

    monkeypatch.setattr(contrastive, "train", fake_train)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                          tmp_path / "out")
    result = tune(recipe, budget="8", output=tmp_path / "t", final=False, params=["lr"], folds=1, isolate=False)
    states = {t.number: t for t in result.trials}
    pruned = [t for t in result.trials if t.state == "pruned"]
    assert pruned, [(t.params, t.state) for t in result.trials]
    for t in pruned:
        assert t.params["lr"] < 1e-3 and t.pruned_at == 4  # never at the first evaluation (step 2), then at once
        assert calls[t.params["lr"]] == [2, 4]
        assert [(h["step"], h["score"]) for h in t.history] == [(2, 0.2), (4, 0.2)]
    assert states[0].state == "complete" and result.best.params["lr"] >= 1e-3
    markdown = (tmp_path / "t" / "tune_report.md").read_text()
    assert "pruned at step 4" in markdown


def test_a_longer_trial_is_judged_at_the_same_point_of_its_schedule_not_the_same_step(tmp_path, tiny_bert_dir,
                                                                                       monkeypatch):
    """A 1-epoch trial scores step / 10 (0.8 at its end, step 8); a longer trial climbs more slowly per step but is
    ahead at every fraction of its own schedule. Compared at the same step it would look worse (a 3-epoch trial:
    0.23 against 0.4 at step 4, its second evaluation) and be pruned; compared at the same fraction it is never below
    the median."""
    from types import SimpleNamespace

    import embedkit.train.contrastive as contrastive

    def fake_train(recipe, on_eval=None, **_):
        epochs = recipe.training.epochs
        total = 8 * epochs
        for step in range(2, total + 1, 2):
            score = step / 10 if epochs == 1 else round(0.1 + 0.8 * step / total, 9)  # equal at equal fractions
            on_eval(step, {"score": score}, total)
        return SimpleNamespace(dev=None, steps=total)

    monkeypatch.setattr(contrastive, "train", fake_train)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                          tmp_path / "out")
    result = tune(recipe, budget="8", output=tmp_path / "t", final=False, params=["lr", "epochs"], folds=1,
                  isolate=False)
    longer = [t for t in result.trials if t.params["epochs"] > 1 and t.number >= 2]  # the pruner was live
    assert any(t.params["epochs"] >= 3 for t in longer), [(t.params, t.state) for t in result.trials]
    assert all(t.state == "complete" for t in longer), [(t.params, t.state, t.pruned_at) for t in longer]
    assert result.best.params["epochs"] > 1


def test_the_engine_reports_every_dev_evaluation_and_stops_when_told(tmp_path, tiny_bert_dir):
    from embedkit.train.contrastive import train
    from embedkit.train.engine import work_dir

    dev = write_beir(tmp_path / "dev", split="dev")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                                      tmp_path / "out", data={"dev": f"beir:{dev}:dev"},
                                      training={"eval_every": 2, "epochs": 2}))
    seen = []

    class Stop(Exception):
        pass

    def on_eval(step, result, total):
        seen.append((step, total))
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        train(recipe, on_eval=on_eval)
    assert seen == [(2, 8), (4, 8)] and not (tmp_path / "out").exists()  # nothing saved
    log = (work_dir(tmp_path / "out") / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log if json.loads(line)["event"] == "eval"] == [2, 4]
    seen.clear()
    result = train(recipe, on_eval=lambda step, r, total: seen.append(step))
    assert seen == [2, 4, 6, 8] and result.steps == 8  # the next run is unaffected
    assert result.dev["score"] == max(h["score"] for h in result.history)  # the best step's result, not re-encoded


def test_tune_writes_a_recipe_that_reproduces_the_model_and_compares_on_test(tmp_path, tiny_bert_dir):
    from safetensors.torch import load_file

    from embedkit.train.contrastive import train

    beir = write_beir(tmp_path / "beir", graded=False)
    write_held_out(tmp_path / "test")  # questions the training data does not hold, ids t0..t4
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, f"beir:{beir}:train", tmp_path / "out")
    out = tmp_path / "tuned"
    result = run_cli("tune", str(recipe), "--budget", "2", "-o", str(out), "--seed", "1", "--test",
                     f"beir:{tmp_path / 'test'}:test", "--json", "--folds", "2")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["trials"] == 2 and set(summary["test"]) == {"tuned_vs_base", "tuned_vs_default"}
    assert "embedkit tune: trial 0 (your recipe)" in result.stderr and "dev split" in result.stderr
    for name in ("tuned_recipe.yaml", "tune_report.md", "tune_report.json", "dev_curve.png",
                 "model/model.safetensors", "test/base.json", "test/tuned.json", "test/default.json"):
        assert (out / name).is_file(), name
    # Bug this catches: the comparison scored on another set than --test (the carved dev split, or the training
    # split, as this test's old "test" copy of the training pairs could not show): every report holds exactly
    # the held-out queries, and the compared difference is the mean of their per-query differences.
    per_query = {}
    for name in ("base", "default", "tuned"):
        (task,) = json.loads((out / "test" / f"{name}.json").read_text())["results"].values()
        per_query[name] = {q: s["ndcg_at_10"] for q, s in task["per_query"].items()}
        assert set(per_query[name]) == {f"t{i}" for i in range(len(HELD_OUT))}, name
    difference = np.mean([per_query["tuned"][q] - per_query["base"][q] for q in per_query["base"]])
    assert summary["test"]["tuned_vs_base"]["difference"] == pytest.approx(difference, abs=1e-6)
    report = json.loads((out / "tune_report.json").read_text())
    trial_rows = [t for t in report["trials"]]
    assert all(t["state"] in ("complete", "pruned") and t["seconds"] >= 0 for t in trial_rows)
    markdown = (out / "tune_report.md").read_text()
    for text in ("## Trials", "## Dev curve", "## Search space", "## Test:", "tuned vs base", "p(improvement)"):
        assert text in markdown, text
    # The recipe: the user's with the chosen values, output beside it; training it again gives the same weights.
    tuned = yaml.safe_load((out / "tuned_recipe.yaml").read_text())
    assert tuned["data"]["train"] == f"beir:{beir}:train" and "dev" not in tuned["data"]
    assert tuned["training"]["output_dir"] == str(out / "model")
    chosen = report["chosen"]
    assert tuned["training"]["lr"] == chosen["lr"] and tuned["loss"]["temperature"] == chosen["temperature"]
    again = train(load_recipe(out / "tuned_recipe.yaml", [f"training.output_dir={tmp_path / 'again'}"]))
    first, second = load_file(str(out / "model" / "model.safetensors")), load_file(str(again.output_dir / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_recipe_with_its_own_dev_set_is_scored_on_it(tmp_path, tiny_bert_dir):
    dev = write_held_out(tmp_path / "dev", split="dev")  # its own queries: a dev of training queries is refused
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                          tmp_path / "out", data={"dev": f"beir:{dev}:dev"}, training={"eval_every": 2})
    result = tune(recipe, budget="1", output=tmp_path / "t", final=False, isolate=False)
    assert not result.split.carved and not (tmp_path / "t" / "split").exists()
    assert result.report["objective"].startswith("dev-best") and result.report["eval_every"] == 2
    tuned = yaml.safe_load(result.recipe_path.read_text())
    assert tuned["data"]["dev"] == f"beir:{dev}:dev" and tuned["training"]["eval_every"] == 2


def test_online_mining_recipe_searches_mining_and_the_margin_when_it_removes_most(tmp_path, tiny_bert_dir):
    beir = write_beir(tmp_path / "beir")
    # A margin this large (95% of the positive's score) removes nearly every candidate: the probe must say so.
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, f"beir:{beir}:train", tmp_path / "out",
                          loss={"hard_negatives": 1},
                          mining={"online": True, "range": "0:10", "relative_margin": 0.95})
    result = tune(recipe, budget="1", output=tmp_path / "t", final=False, folds=1, isolate=False)
    report = result.report
    assert report["probe"]["warning"]["code"] == "margin_removes_most"
    names = [p["name"] for p in report["space"]]
    assert {"hard_negatives", "mining_range", "relative_margin", "margin_from"} <= set(names)
    assert "Mining with the base model" in (tmp_path / "t" / "tune_report.md").read_text()


def test_lora_rank_is_searched_and_trained(tmp_path, tiny_bert_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                          tmp_path / "out", adapter={"type": "lora", "r": 4, "alpha": 8})
    result = tune(recipe, budget="2", output=tmp_path / "t", final=False, params=["lora_r"], folds=1, isolate=False)
    assert [t.state for t in result.trials] == ["complete", "complete"]
    assert result.trials[0].params == {"lora_r": 4} and result.trials[1].params["lora_r"] != 4
    tuned = yaml.safe_load(result.recipe_path.read_text())
    assert tuned["adapter"]["alpha"] == 2 * tuned["adapter"]["r"]  # alpha / r kept
    capped = write_recipe(tmp_path / "c.yaml", tiny_bert_dir, str(tmp_path / "p.jsonl"), tmp_path / "out",
                          training={"max_steps": 3})
    with pytest.raises(ConfigError, match="cannot search") as info:  # a step count fixes the length: no epochs
        tune(capped, budget="1", output=tmp_path / "u", final=False, params=["epochs"], isolate=False)
    assert info.value.field == "--params"


# ---------------------------------------------------------------------------------------------------- mining
def test_margin_from_the_top_grade_and_the_warning():
    from embedkit.mine.core import MiningStats, margin_warning, mine_embeddings
    from embedkit.mine.filters import margin_reference
    from embedkit.mine.settings import MiningSettings
    from embedkit.mine.vectors import ArraySource

    scores = np.array([0.9, 0.3, 0.2, 0.8], dtype=np.float32)  # query 0: 3 positives, query 1: 1
    ptr, grades = np.array([0, 3, 4]), np.array([2, 1, 1, 1])
    ref = lambda **kw: margin_reference(scores, ptr, grades, MiningSettings(**kw)).tolist()  # noqa: E731
    assert ref() == pytest.approx([0.9, 0.8])  # top grade: the grade-2 positive only
    assert ref(margin_grade="all") == pytest.approx([0.2, 0.8])  # the weakest of all
    assert ref(margin_grade="all", margin_from="strongest") == pytest.approx([0.9, 0.8])
    assert ref(margin_grade=3) == pytest.approx([0.2, 0.8])  # nobody has grade 3: all positives
    assert margin_reference(scores, ptr, None, MiningSettings()).tolist() == pytest.approx([0.2, 0.8])
    with pytest.raises(ConfigError, match="margin_grade"):
        MiningSettings(margin_grade="best")

    # 20 queries, each with one strong positive and 6 weak ones scored below most of the pool.
    rng = np.random.default_rng(0)
    dim, n_docs, nq = 16, 200, 20
    docs = rng.normal(size=(n_docs, dim)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[:nq] + 0.05 * rng.normal(size=(nq, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    weak = [np.argsort(docs @ q)[:6] for q in queries]  # the 6 least similar documents: "weak positives"
    pos = [np.concatenate([[i], w]) for i, w in enumerate(weak)]
    ptr = np.concatenate([[0], np.cumsum([len(p) for p in pos])])
    idx = np.concatenate(pos)
    grades = np.concatenate([[3] + [1] * 6 for _ in pos])

    def mine(grade_arg, **kw):
        settings = MiningSettings(range_min=0, range_max=40, num_negatives=1, duplicate_threshold=None, **kw)
        stats = MiningStats()
        for _ in mine_embeddings(queries, nq, ArraySource(docs), ptr, idx, settings, pos_grade=grade_arg, stats=stats):
            pass
        return stats.to_dict(), settings.to_dict()

    stats, settings = mine(None)  # ungraded: the weakest positive sets the margin, it removes almost everything
    warning = margin_warning(stats, settings)
    assert warning is not None and stats["rows_short"] > 0.5 * stats["pairs"]
    assert warning["message"].count("\n") == 0 and "--margin-from strongest" in warning["message"]
    assert margin_warning(*mine(grades)) is None  # graded: the grade-3 positive sets it
    assert margin_warning(*mine(None, margin_from="strongest")) is None



def test_mine_says_so_in_one_line_when_the_margin_removes_most(tmp_path, st_bert):
    from typer.testing import CliRunner

    from embedkit.cli import app

    beir = write_beir(tmp_path / "beir")
    out = tmp_path / "mined.jsonl"
    result = CliRunner().invoke(app, ["mine", "-m", str(st_bert), "-d", str(beir), "-o", str(out), "--range", "0:10",
                                      "-n", "1", "--relative-margin", "0.95", "--no-cache", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    text = result.output + (getattr(result, "stderr", "") or "")  # click >= 8.2 also mixes stderr into output
    warnings = sorted({line for line in text.splitlines() if "warning:" in line})
    assert len(warnings) == 1 and "margin" in warnings[0] and "short of negatives" in warnings[0]
    summary = json.loads((tmp_path / "mined.summary.json").read_text())
    assert summary["warnings"][0]["code"] == "margin_removes_most"
    assert summary["stats"]["rows_short"] > summary["stats"]["pairs"] / 2
    assert summary["settings"]["margin_grade"] == "top" and summary["settings"]["margin_from"] == "weakest"


def test_a_recipe_without_negatives_can_turn_mining_on_with_its_window_as_a_dependent_parameter(tiny_bert_dir,
                                                                                              tmp_path):
    import optuna

    from embedkit.tune.space import build_space, defaults, in_space, recipe_overrides, suggest

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                                      tmp_path / "out"))
    space = build_space(recipe)
    by_name = {p.name: p for p in space}
    assert by_name["mined_negatives"].bounds() == "0 .. 3" and by_name["mining_range"].needs == "mined_negatives"
    assert defaults(space) == {"lr": 1e-3, "epochs": 1, "temperature": 0.05, "mined_negatives": 0}  # as written
    off = suggest(space, optuna.trial.FixedTrial({"lr": 1e-3, "epochs": 2, "temperature": 0.02, "mined_negatives": 0}))
    assert "mining_range" not in off and in_space(space, off)
    assert not any(k.startswith("mining.") or k == "loss.hard_negatives" for k in recipe_overrides(space, off))
    on = suggest(space, optuna.trial.FixedTrial({"lr": 1e-3, "epochs": 1, "temperature": 0.05, "mined_negatives": 2,
                                                 "mining_range": "3:50"}))
    assert recipe_overrides(space, on) == {"training.lr": 1e-3, "training.epochs": 1, "loss.temperature": 0.05,
                                           "loss.hard_negatives": 2, "mining.online": True, "mining.range": "3:50"}
    # A recipe that already mines, or whose data carries negatives, or that distils, is not offered the switch.
    mining = load_recipe(write_recipe(tmp_path / "m.yaml", tiny_bert_dir, str(tmp_path / "p.jsonl"), tmp_path / "o",
                                      loss={"hard_negatives": 1}, mining={"online": True}))
    assert "mined_negatives" not in {p.name for p in build_space(mining)}
    assert "mined_negatives" not in {p.name for p in build_space(recipe, negatives_in_data=2)}
    with pytest.raises(ConfigError, match="needs mined_negatives"):  # a window without the switch would do nothing
        build_space(recipe, only=["mining_range"])


def test_tune_turns_mining_on_in_trials_and_the_written_recipe_mines(tmp_path, tiny_bert_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                          tmp_path / "out", training={"epochs": 1, "batch_size": 4, "lr": 1e-3, "seed": 7,
                                                      "progress": False, "threads": 1, "output_dir": str(tmp_path)})
    result = tune(recipe, budget="4", output=tmp_path / "t", final=False, seed=3,
                  params=["mined_negatives", "mining_range"], folds=1, isolate=False)
    report = result.report
    assert report["probe"] is not None and report["probe"]["settings"]  # the base model mined once, default settings
    trials = report["trials"]
    assert trials[0]["params"] == {"mined_negatives": 0}  # trial 0: the recipe as written, no window
    mined = [t for t in trials if t["params"]["mined_negatives"] > 0]
    assert mined and all("mining_range" in t["params"] and t["state"] == "complete" for t in mined)
    # Force the written recipe through a mined choice: the tuned recipe must be a valid mining recipe.
    from embedkit.train.config import read_recipe_file
    from embedkit.tune.space import build_space, recipe_overrides

    raw, _text = read_recipe_file(recipe)
    space = build_space(load_recipe(recipe), only=["mined_negatives", "mining_range"])
    overrides = [f"{k}={v}" for k, v in recipe_overrides(space, mined[0]["params"]).items()]
    parsed = load_recipe(recipe, overrides)
    assert parsed.mining.online and parsed.loss.hard_negatives == mined[0]["params"]["mined_negatives"]
    assert raw["loss"] == {"temperature": 0.05}
    if result.best.params["mined_negatives"]:
        tuned = load_recipe(result.recipe_path)
        assert tuned.mining.online and tuned.mining.range == result.best.params["mining_range"]


# ---------------------------------------------------------------------------------------------------- few labels
def test_dev_folds_score_every_training_query_once_out_of_fold(tmp_path, tiny_bert_dir):
    """Bug this catches: a fold whose trial trains on a query it scores, a query scored twice or never, or folds
    scored against different corpora (their pooled score would mix scales)."""
    from embedkit.tune.split import carve_dev_splits

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                                      tmp_path / "out"))
    splits = carve_dev_splits(recipe, tmp_path / "split", folds=3, dev_docs=8, seed=4)
    texts = set(q for q, _ in PAIRS)
    scored = [set(s.dev_query_texts) for s in splits]
    assert set().union(*scored) == texts and sum(len(s) for s in scored) == len(texts)  # each once
    corpora = set()
    for split in splits:
        train_queries = {json.loads(line)["query"] for line in Path(split.train_spec).read_text().splitlines()}
        assert not train_queries & set(split.dev_query_texts) and train_queries | set(split.dev_query_texts) == texts
        corpora.add((Path(split.dev_spec.split(":")[1]) / "corpus.jsonl").read_text())
        assert split.folds == 3 and split.fold in (0, 1, 2)
    assert len(corpora) == 1  # one dev corpus for all folds


def test_few_queries_are_tuned_on_folds_with_a_score_and_its_spread(tmp_path, tiny_bert_dir):
    """With 14 training queries the default is folds (DEV_QUERIES_NEEDED): every trial trains once per fold and its
    score pools every query's out-of-fold score, with a standard error. Bug this catches: a trial judged on a
    fifth of a hundred queries (the held-out domain's 23 dev queries) with no spread to say how little that is."""
    from embedkit.tune.run import DEV_QUERIES_NEEDED, dev_folds

    assert dev_folds(14, 0.2) == 5 and dev_folds(5 * DEV_QUERIES_NEEDED, 0.2) == 1
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                          tmp_path / "out")
    result = tune(recipe, budget="2", output=tmp_path / "t", final=False, folds=3, isolate=False,
                  params=["lr", "epochs"])
    assert result.report["folds"] == 3 and result.report["objective"] == "pooled out-of-fold score"
    for trial in result.trials:
        assert trial.state == "complete" and len(trial.fold_scores) == 3
        assert trial.queries == len(set(q for q, _ in PAIRS)) and trial.spread is not None and trial.spread > 0
        assert trial.value == pytest.approx(np.mean(list(trial.per_query.values())))
        assert [h["fold"] for h in trial.history] == [0, 1, 2]
    state = json.loads((tmp_path / "t" / "search_state.json").read_text())
    assert len(state["trials"]) == 2 and state["trials"][0]["per_query"]


def _record(number, value, per_query, epochs=1):
    from embedkit.tune.search import TrialRecord

    return TrialRecord(number, {"epochs": epochs}, "complete", value, 1.0, per_query=per_query)


def test_the_recipe_stays_unless_a_trial_beats_it_beyond_the_noise(tmp_path):
    """The best dev score wins only by more than NOISE_Z standard errors of the paired difference over the same
    queries. Bug this catches: a search that picks the luckiest of its trials (with ~20 dev queries, a trial equal
    to the recipe beats it by chance about half the time) and ships a recipe no better than the user's."""
    from types import SimpleNamespace

    from embedkit.tune.search import NOISE_Z, Search

    rng = np.random.default_rng(0)
    base = {f"q{i}": float(v) for i, v in enumerate(rng.uniform(0.3, 0.9, 100))}
    noise = rng.normal(0, 0.1, 100)
    noise += 0.01 - noise.mean()  # 0.01 better on average, the standard error of that ~0.01
    noisy = {q: v + float(e) for (q, v), e in zip(base.items(), noise)}
    better = {q: v + 0.05 + float(rng.normal(0, 0.02)) for q, v in base.items()}
    search = SimpleNamespace(records=[])
    search.best = lambda: max(search.records, key=lambda r: r.value)
    choose = Search.choice.__get__(search)
    search.records = [_record(0, np.mean(list(base.values())), base), _record(1, np.mean(list(noisy.values())), noisy)]
    assert search.records[1].value > search.records[0].value  # the noisy trial has the best dev score ...
    chosen, why = choose()
    assert chosen.number == 0 and "within the noise" in why  # ... and the recipe stays
    search.records.append(_record(2, np.mean(list(better.values())), better))
    chosen, why = choose()
    assert chosen.number == 2 and f"more than {NOISE_Z:g} standard errors" in why


def test_an_interrupted_search_resumes_where_it_stopped(tmp_path, tiny_bert_dir, monkeypatch):
    """Killed during trial 2, `--resume` keeps trials 0 and 1 (not trained again), counts the time they used, and
    numbers on from 2. Settings that differ are refused in one line. Bug this catches: an interrupted 40-minute
    search that must start over, or a resume that silently mixes two searches' trials."""
    from types import SimpleNamespace

    import embedkit.train.contrastive as contrastive

    trained = []

    def fake_train(recipe, on_eval=None, **_):
        trained.append(recipe.training.lr)
        on_eval(3, {"score": 0.5 + recipe.training.lr}, 3)
        return SimpleNamespace(dev=None, steps=3)

    monkeypatch.setattr(contrastive, "train", fake_train)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                          tmp_path / "out")

    def stop_at_two(number):
        if number == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(recipe, budget="4", output=tmp_path / "t", final=False, folds=1, isolate=False, params=["lr"],
             trial_hook=stop_at_two)
    first_two = list(trained)
    assert len(first_two) == 2
    trained.clear()
    result = tune(recipe, budget="4", output=tmp_path / "t", final=False, folds=1, isolate=False, params=["lr"],
                  resume=True)
    assert [t.number for t in result.trials] == [0, 1, 2, 3] and len(trained) == 2  # only trials 2 and 3 trained
    assert [t.params["lr"] for t in result.trials[:2]] == first_two
    with pytest.raises(ConfigError, match="ran with other budget") as info:
        tune(recipe, budget="5", output=tmp_path / "t", final=False, folds=1, isolate=False, params=["lr"],
             resume=True)
    assert info.value.field == "--resume"


def test_trials_train_in_processes_of_their_own(tmp_path, tiny_bert_dir, monkeypatch):
    """The search process never trains: a training in it fails this test (the stand-in raises), the trials still
    complete in their child processes, and the dev evaluations come back to the pruner. Bug this catches: every
    trial's model, the final and the default model in one process (a held-out run peaked at 8.7 GB, three times one
    training run)."""
    import embedkit.train.contrastive as contrastive

    def no_training_here(*args, **kwargs):
        raise AssertionError("the tune process trained a model")

    monkeypatch.setattr(contrastive, "train", no_training_here)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                          tmp_path / "out")
    result = tune(recipe, budget="2", output=tmp_path / "t", final=False, folds=1, params=["lr"])
    assert [t.state for t in result.trials] == ["complete", "complete"]
    assert all(t.history and t.per_query for t in result.trials)


def test_progress_lines_come_per_evaluation_and_at_least_once_a_minute(tmp_path, tiny_bert_dir, monkeypatch,
                                                                       caplog):
    """A trial whose steps "take" 30 s each on the clock logs a line per dev evaluation (epoch, step, score, ETA of
    the trial and of the search) and a heartbeat in between. Bug this catches: a 23-minute trial that printed
    nothing."""
    import logging
    from types import SimpleNamespace

    import embedkit.train.contrastive as contrastive

    now = [0.0]

    def fake_train(recipe, on_eval=None, on_step=None, **_):
        for step in range(1, 7):
            now[0] += 30.0
            on_step(step, {"epoch": (step - 1) // 3})
            if step % 3 == 0:
                on_eval(step, {"score": 0.5 + step / 100, "per_query": {"a": 0.4, "b": 0.6}}, 6)
        return SimpleNamespace(dev=None, steps=6)

    monkeypatch.setattr(contrastive, "train", fake_train)
    monkeypatch.setattr("embedkit.tune.jobs.STEP_EVENT_SECONDS", 0.0)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                          tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="embedkit.tune"):
        tune(recipe, budget="1h", output=tmp_path / "t", final=False, folds=1, isolate=False, params=["lr"],
             clock=lambda: now[0], trial_hook=lambda n: None)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trial 0:")]
    evals = [line for line in lines if ": dev " in line and "step" in line]
    assert len(evals) == 2 and "epoch 1, step 3/6: dev 0.5300" in evals[0]
    assert "90 s in, trial ~90 s to go" in evals[0] and "search" in evals[0] and "left" in evals[0]
    assert any("step 2/" in line and ": dev" not in line for line in lines)  # the heartbeat between evaluations (60 s after the start)


def test_the_dev_corpus_draws_on_the_teams_documents_in_mining_corpus(tmp_path, tiny_bert_dir):
    """A team with a few labelled pairs and a document collection (`mining.corpus`): the dev corpus's nearest
    documents come from the collection too. Bug this catches: a dev corpus of the labelled positives alone (100
    pairs: 98 documents, every trial near the ceiling), unlike the collection the final model searches."""
    from embedkit.tune.split import carve_dev_splits

    extra = [f"an unrelated document about topic number {i}" for i in range(40)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"c{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(extra)))
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                                      tmp_path / "out", mining={"corpus": str(corpus)}))
    ranked_over = []

    def rank(queries, documents, k):  # a stand-in for the base model: the collection's documents first
        ranked_over.append(list(documents))
        order = sorted(range(len(documents)), key=lambda i: documents[i] not in extra)
        return [order[:k] for _ in queries]

    (split,) = carve_dev_splits(recipe, tmp_path / "split", folds=1, dev_docs=20, seed=3, rank=rank)
    assert set(extra) <= set(ranked_over[0])
    dev_texts = {json.loads(line)["text"] for line in
                 (Path(split.dev_spec.split(":")[1]) / "corpus.jsonl").read_text().splitlines()}
    assert dev_texts & set(extra) and split.pool_documents > len({p for _, p in PAIRS})


def test_the_budget_counts_evaluations_and_start_up_apart_from_the_steps(tmp_path, tiny_bert_dir, monkeypatch):
    """Each fold "takes" 50 s outside its steps (process start, loading, the dev evaluation) and 0.5 s per text and
    step. Trial 0 (3 folds of 3 steps, 2 texts) takes 159 s; trial 1 (3 epochs and a mined negative: 9 steps x 3
    texts per fold) 190.5 s, which fits in the 241 s the 400 s budget leaves. Bug this catches: the start-up and
    evaluation folded into a per-step rate (8.8 s per text here), which priced trial 1 at ~12 minutes and ended a
    20-minute few-label search after its first trial."""
    from types import SimpleNamespace

    import embedkit.train.contrastive as contrastive
    import embedkit.tune.prepare as prepare

    now = [0.0]

    def fake_train(recipe, on_eval=None, **_):
        total = recipe.training.epochs * 3
        step_seconds = total * (2 + (recipe.loss.hard_negatives or 0)) * 0.5
        now[0] += step_seconds + 50.0
        score = 0.5 + 0.01 * recipe.training.epochs
        return SimpleNamespace(steps=total, train_seconds=step_seconds,
                               dev={"score": score, "per_query": {"a": score, "b": score}})

    monkeypatch.setattr(contrastive, "train", fake_train)
    monkeypatch.setattr(prepare, "mining_round_seconds", lambda *a, **k: 0.0)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, str(write_pairs(tmp_path / "p.jsonl")),
                          tmp_path / "out")
    result = tune(recipe, budget="400s", output=tmp_path / "t", final=False, clock=lambda: now[0], folds=3,
                  isolate=False)
    assert [t.seconds for t in result.trials[:2]] == [159.0, 190.5]
    assert result.trials[1].params["epochs"] == 3 and not result.trials[1].note  # run as proposed
    assert result.trials[0].evaluations == 3 and result.trials[0].train_seconds == 9.0
    assert "dev evaluations (with their start-up) of ~50 s" in result.report["stop_reason"]
