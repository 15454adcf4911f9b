"""bench/bench_label_free.py (issue #32): its arms, the guard that keeps every training query and qrel away from the
label-free arms, the Kendall tau it reports, and the shipped label-free recipe. Seconds, no training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_label_free as lf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- arms
def test_arm_plan(tmp_path):
    plan = lf.arm_plan(["title", "ict", "crop"], "ict")
    assert list(plan) == ["style-title", "style-ict", "style-crop", "label-free", "label-free-pseudo", "q100",
                          "q100+label-free"]
    # each style alone without the round-trip filter; the label-free arms: the main style with it
    assert plan["style-crop"]["synth"] == [("crop", 0, None)]
    assert plan["label-free"]["synth"] == [("ict", lf.ROUND_TRIP_K, None)]
    # style-ict vs label-free differ in the round-trip filter only
    assert plan["style-ict"]["overrides"] == plan["label-free"]["overrides"] == []
    # pseudo labels: the same rows (no teacher: the base bi-encoder's scores), margin-MSE on their scores
    assert plan["label-free-pseudo"]["synth"] == plan["label-free"]["synth"]
    assert "loss.distillation=margin_mse" in plan["label-free-pseudo"]["overrides"]
    # the supervised sample: alone, and with the label-free rows added
    assert (plan["q100"]["few"], plan["q100"]["synth"]) == (True, [])
    assert plan["q100+label-free"]["few"] and plan["q100+label-free"]["synth"] == plan["label-free"]["synth"]
    # both few-label arms train the supervised recipes' schedule, not the label-free recipe's one epoch at 2e-5
    # (bug caught: 100 pairs made 4 optimizer steps, mostly warm-up, a baseline no team trains)
    from embedkit.train.config import load_recipe
    supervised = load_recipe(Path(lf.REPO) / "recipes" / "minilm-medquad.yaml", [], check_environment=False).training
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "q", "positive": "p", "negatives": ["n"]}) + "\n")
    for arm in ("q100", "q100+label-free"):
        sets = [f"data.train={pairs}", *plan[arm]["overrides"]]
        few = load_recipe(Path(lf.REPO) / lf.RECIPE, sets, check_environment=False).training
        assert (few.lr, few.epochs, few.warmup_ratio, few.weight_decay) == (
            supervised.lr, supervised.epochs, supervised.warmup_ratio, supervised.weight_decay)
    assert not any(plan[a]["few"] for a in ("style-title", "style-ict", "style-crop", "label-free",
                                             "label-free-pseudo"))


def test_arm_plan_teacher_mines_apart():
    plan = lf.arm_plan(["ict"], "ict", teacher="runs/reranker")
    assert plan["label-free-pseudo"]["synth"] == [("ict", lf.ROUND_TRIP_K, "runs/reranker")]
    assert plan["label-free"]["synth"] == [("ict", lf.ROUND_TRIP_K, None)]  # the contrastive arm: no teacher
    assert lf.mined_name("ict", 10, "x") != lf.mined_name("ict", 10, None)


def test_arm_plan_main_style_must_be_listed():
    with pytest.raises(ValueError, match="main-style"):
        lf.arm_plan(["title", "crop"], "ict")


# ---------------------------------------------------------------------------------------------------- guard
@pytest.fixture
def corpus_folder(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "", "text": "a b c"}) + "\n")
    return folder


def test_guard_accepts_synthetic_rows(corpus_folder):
    rows = [{"query": "one synthetic query", "positive": "p"}, {"query": "two", "positive": "p"}]
    kept, counts = lf.check_label_free(rows, {"one synthetic query", "two"}, {"a human question"},
                                       corpus_folder=corpus_folder)
    assert kept == rows and counts == {"synthetic_rows": 2, "human_rows": 0, "removed_equal_to_human": 0}


def test_guard_refuses_a_query_synth_did_not_write(corpus_folder):
    rows = [{"query": "What is (are) Leukemia ?", "positive": "p"}]
    with pytest.raises(lf.LabelLeak, match="synth did not write"):
        lf.check_label_free(rows, {"something else"}, set(), corpus_folder=corpus_folder)


def test_guard_removes_a_synthetic_query_equal_to_a_human_one(corpus_folder):
    human = {lf.normalise("0-dimensional biomaterials show inductive properties.")}
    rows = [{"query": "0-dimensional  biomaterials show Inductive properties.", "positive": "p"},
            {"query": "another sentence", "positive": "p"}]
    kept, counts = lf.check_label_free(rows, {r["query"] for r in rows}, human, corpus_folder=corpus_folder)
    assert kept == rows[1:]
    assert counts == {"synthetic_rows": 1, "human_rows": 0, "removed_equal_to_human": 1}


def test_guard_allows_the_sampled_human_queries_only_where_asked(corpus_folder):
    rows = [{"query": "a labelled question", "positive": "p"}, {"query": "synthetic", "positive": "p"}]
    human = {"a labelled question"}
    kept, counts = lf.check_label_free(rows, {"synthetic"}, human, allowed={"a labelled question"})
    assert kept == rows and counts == {"synthetic_rows": 1, "human_rows": 1, "removed_equal_to_human": 0}
    with pytest.raises(lf.LabelLeak):
        lf.check_label_free(rows, {"synthetic"}, human)


def test_guard_refuses_a_corpus_folder_with_queries_or_qrels(corpus_folder):
    (corpus_folder / "qrels").mkdir()
    with pytest.raises(lf.LabelLeak, match="more than corpus.jsonl"):
        lf.check_label_free([], set(), set(), corpus_folder=corpus_folder)


def test_medquad_corpus_holds_answers_without_questions(tmp_path):
    root = tmp_path / "data"
    (root / "medquad").mkdir(parents=True)
    pairs = [("What is A ?", "answer a"), ("What causes A ?", "answer a"), ("What is B ?", "answer b")]
    (root / "medquad" / "train_pairs.jsonl").write_text(
        "".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in pairs))
    folder = lf.label_free_corpus("medquad", str(root), tmp_path / "work")
    assert sorted(p.name for p in folder.iterdir()) == ["corpus.jsonl"]
    docs = lf.read_jsonl(folder / "corpus.jsonl")
    assert [(d["_id"], d["text"]) for d in docs] == [("a0", "answer a"), ("a1", "answer b")]
    assert "What" not in (folder / "corpus.jsonl").read_text()


# ---------------------------------------------------------------------------------------------------- statistics
def test_kendall_tau():
    assert lf.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert lf.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert lf.kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert lf.kendall_tau([0.5], [0.7]) is None
    assert lf.kendall_tau([1, 1, 1], [1, 2, 3]) is None


def test_kendall_tau_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    a, b = [0.61, 0.64, 0.64, 0.70, 0.55, 0.66], [0.80, 0.83, 0.81, 0.81, 0.70, 0.90]
    assert lf.kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b).statistic)


def test_acceptance_bar():
    assert lf.acceptance({"difference": 0.025, "ci_low": 0.004})
    assert not lf.acceptance({"difference": 0.019, "ci_low": 0.004})  # too small a gain
    assert not lf.acceptance({"difference": 0.03, "ci_low": -0.001})  # interval reaches 0


# ---------------------------------------------------------------------------------------------------- the recipe
def test_label_free_recipe_trains_on_mined_rows_with_and_without_pseudo_labels(tmp_path):
    from embedkit.train.config import load_recipe

    mined = tmp_path / "mined.jsonl"
    mined.write_text(json.dumps({"query": "q", "positive": "p", "negatives": ["n"], "scores": [0.9, 0.4]}) + "\n")
    recipe = load_recipe(REPO / lf.RECIPE, [f"data.train={mined}"], check_environment=False)
    assert recipe.loss.hard_negatives == lf.NEGATIVES and recipe.loss.distillation == "none"
    assert recipe.data.dev is None  # no dev set, least of all a test split
    pseudo = load_recipe(REPO / lf.RECIPE, [f"data.train={mined}", *lf.DISTILL], check_environment=False)
    assert pseudo.loss.distillation == "margin_mse" and pseudo.data.columns.scores == "scores"


def test_resume_reuses_a_run_of_the_same_recipe_and_data_only(tmp_path):
    """--resume's rule: the recipe as parsed and the training file's content, not where they lie."""
    row = json.dumps({"query": "q", "positive": "p", "negatives": ["n"], "scores": [0.9, 0.4]}) + "\n"
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(row)
    b.write_text(row)
    same = lf.trained_settings(a, [f"data.train={a}", "training.seed=42", "training.output_dir=/x"])
    assert same == lf.trained_settings(b, [f"data.train={b}", "training.seed=42", "training.output_dir=/y"])
    assert same != lf.trained_settings(a, [f"data.train={a}", "training.seed=43"])
    assert same != lf.trained_settings(a, [f"data.train={a}", "training.seed=42", *lf.DISTILL])
    b.write_text(row + row)
    assert same != lf.trained_settings(b, [f"data.train={b}", "training.seed=42"])


def test_a_style_the_corpus_cannot_give_is_skipped_not_run(tmp_path):
    """MedQuAD's answers have no titles: synth would stop with "no document can give a title query"."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    text = "First sentence of the answer. Second sentence of the answer, long enough for a crop."
    (folder / "corpus.jsonl").write_text(json.dumps({"_id": "a0", "title": "", "text": text}) + "\n")
    assert not lf.style_possible(folder, "title")
    assert lf.style_possible(folder, "ict") and lf.style_possible(folder, "crop")
    assert lf.style_possible(folder, "question")  # a generator can always try
