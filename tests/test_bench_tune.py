"""bench/bench_tune.py's matching of its peers (issue #28 item 6) and its --resume rule: what makes its table a fair
comparison, so it is tested like product code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_tune  # noqa: E402


@pytest.fixture
def recipe(tmp_path) -> Path:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"d{i}"}) + "\n" for i in range(8)))
    path = tmp_path / "tuned.yaml"
    path.write_text(f"""
model: {{name: minilm, max_length: 64, attention_dropout: 0.0}}
data: {{train: {pairs}}}
loss: {{temperature: 0.02, hard_negatives: 2}}
mining: {{online: true, range: "10:100", relative_margin: 0.05, sampling: random}}
training: {{output_dir: {tmp_path / 'out'}, epochs: 5, batch_size: 32, lr: 7.7e-5}}
""")
    return path


def test_st_arms_take_the_recipes_dropout_and_the_tuned_schedule(recipe):
    # Bugs caught: sentence-transformers keeping MiniLM's attention dropout 0.1 while the recipes train with 0 (the
    # unmatched peer of issue #28), and the compute-matched peer training ST's default 3 epochs or mining another
    # window / count / margin than the tuned recipe it is matched to.
    st = bench_tune.st_settings("st", str(recipe), [])
    assert st["attention_dropout"] == 0.0 and st["num_train_epochs"] == 3 and "mining" not in st
    mined = bench_tune.st_settings("st-mined", str(recipe), [])
    assert mined["attention_dropout"] == 0.0 and mined["num_train_epochs"] == 5 and mined["batch_size"] == 32
    assert mined["mining"] == {"num_negatives": 2, "range_min": 10, "range_max": 100, "sampling_strategy": "random",
                               "relative_margin": 0.05, "output_format": "n-tuple", "use_faiss": True}
    assert mined["batch_sampler"] == "no_duplicates"


def test_only_the_sentence_transformers_arms_train_with_sentence_transformers():
    # Bug caught: arms picked by `startswith("st")` sent embedkit's candidate arm "steps" to sentence-transformers.
    assert bench_tune.ST_ARMS == ("st", "st-mined")
    assert "steps" in bench_tune.CANDIDATE_ARMS and "steps" not in bench_tune.ST_ARMS


def test_resume_reuses_a_run_recorded_before_the_recipe_gained_fields(recipe, tmp_path):
    # Bugs caught: --resume retraining every earlier run because the recipe format gained fields since (task, rerank,
    # training.min_steps at their defaults), or reusing a run whose recorded settings really differ.
    from embedkit.train.config import load_recipe

    ran = load_recipe(str(recipe), ["training.seed=42"]).model_dump(mode="json")
    ran.pop("task"), ran.pop("rerank"), ran["training"].pop("min_steps")
    done = tmp_path / "run.result.json"
    done.write_text(json.dumps({"recipe": ran}))
    assert not bench_tune.trained_another_recipe(done, "tuned", str(recipe), [], 42)
    assert bench_tune.trained_another_recipe(done, "tuned", str(recipe), ["training.min_steps=150"], 42)
    ran["training"]["lr"] = 2e-5
    done.write_text(json.dumps({"recipe": ran}))
    assert bench_tune.trained_another_recipe(done, "tuned", str(recipe), [], 42)


def test_candidate_recipes_load_and_change_what_their_labels_say(tmp_path):
    # Bug caught: a candidate arm's override with a misspelt key or value (silently the recipe as written, or a
    # recipe error after hours of other arms), or the `schedule` arm not mining (its label says it does).
    from embedkit.train.config import load_recipe

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"d{i}"}) + "\n" for i in range(8)))
    written = tmp_path / "recipe.yaml"
    written.write_text(f"model: {{name: minilm}}\ndata: {{train: {pairs}}}\n"
                       f"training: {{output_dir: {tmp_path / 'out'}, lr: 2.0e-5, epochs: 1}}\n")
    assert set(bench_tune.CANDIDATE_SETS) == set(bench_tune.CANDIDATE_ARMS)
    assert not set(bench_tune.CANDIDATE_ARMS) & set(bench_tune.ST_ARMS)
    steps = load_recipe(str(written), bench_tune.CANDIDATE_SETS["steps"])
    assert steps.training.min_steps == bench_tune.CANDIDATE_MIN_STEPS and steps.training.lr == 2e-5
    schedule = load_recipe(str(written), bench_tune.CANDIDATE_SETS["schedule"])
    assert (schedule.training.lr, schedule.training.epochs) == (5e-5, 3)
    assert schedule.loss.hard_negatives == 1 and schedule.mining.online
    plain = load_recipe(str(written), bench_tune.CANDIDATE_SETS["st-schedule"])
    assert (plain.training.lr, plain.training.epochs, plain.training.warmup_ratio, plain.training.weight_decay) == (
        5e-5, 3, 0.0, 0.0) and not plain.loss.hard_negatives
    former = load_recipe(str(written), bench_tune.CANDIDATE_SETS["former"])
    assert (former.training.lr, former.training.epochs, former.training.warmup_ratio,
            former.training.weight_decay) == (2e-5, 1, 0.1, 0.01)


def test_arms_that_train_the_same_recipe_share_one_run(recipe, tmp_path):
    # Bug caught: the `default` arm retrained (and re-evaluated: 3 x 7 min on SciFact) what `tuned` had trained when
    # the search changed nothing, or two arms that differ in one setting being taken for one.
    copy = tmp_path / "copy.yaml"
    copy.write_text(recipe.read_text().replace(str(tmp_path / "out"), str(tmp_path / "elsewhere")))
    same = bench_tune.resolved_training(str(recipe), [], 42)
    assert bench_tune.resolved_training(str(copy), [], 42) == same
    assert bench_tune.resolved_training(str(recipe), ["training.lr=5e-5"], 42) != same
    assert bench_tune.resolved_training(str(recipe), [], 43) != same


def test_st_seeds_draw_batch_orders_of_their_own(recipe):
    # Bug caught: ST's samplers seed epoch e with the trainer's seed + e, and seed 42, 43, 44 gave the runs two of
    # their three epoch orders in common, so the ST arm's "3 seeds" were not 3 draws (its spread looked small and
    # its mean rode on two orders). Every epoch of every bench seed must get its own order seed.
    epochs = 50
    drawn = [bench_tune.st_settings("st", str(recipe), [f"training.seed={seed}"])["seed"] + e
             for seed in (42, 43, 44) for e in range(epochs)]
    assert len(set(drawn)) == len(drawn)



def test_the_record_keeps_every_seed_and_verdict_but_not_the_recipes():
    # Bugs caught: a record holding only means (the README quotes per-seed spreads and intervals), or carrying the
    # runs' full recipes and logs (megabytes of provenance that --json already keeps).
    run = {"ndcg_at_10": 0.85, "steps": 12, "recipe": {"model": {"name": "minilm"}}}
    results = {"budget": "15m", "seeds": [1, 2], "arms": ["st", "st-schedule"], "queries": 100, "smoke": False,
               "max_steps": None, "datasets": {"medquad-q100-sub1": {
                   "tune": {"tuned_recipe": None, "trial_states": [], "skipped": True}, "base": {"ndcg_at_10": 0.8},
                   "verdicts": {"st-schedule_vs_st": {"difference": -0.01, "over_seeds": {"ci_low": -0.02}}},
                   "st": {"runs": [{**run, "settings": {"seed": 1000}}, {**run, "ndcg_at_10": 0.86,
                                                                         "settings": {"seed": 2000}}],
                          "ndcg_at_10": 0.855, "ndcg_at_10_sd": 0.007},
                   "st-schedule": {"runs": [run, {**run, "ndcg_at_10": 0.84}], "ndcg_at_10": 0.845,
                                   "ndcg_at_10_sd": 0.007}}}}
    values = bench_tune.record_values(results)
    row = values["datasets"]["medquad-q100-sub1"]
    assert row["st"]["per_seed"] == [0.85, 0.86] and row["st-schedule"]["steps"] == [12, 12]
    assert row["verdicts"]["st-schedule_vs_st"]["over_seeds"]["ci_low"] == -0.02 and row["base"] == 0.8
    assert "recipe" not in json.dumps(values)


@pytest.mark.parametrize("dataset", ["scifact", "medquad"])
def test_shipped_recipes_train_the_schedule_that_was_measured(dataset):
    # Bug caught: a MiniLM recipe drifting from the schedule whose records made it the default (docs/tune.md, "The
    # default recipe"), e.g. a warm-up or decay left in, which would make the README's "the recipe now" rows false;
    # or the `former` arm no longer training what the recipes trained before the change.
    recipe = str(Path(__file__).resolve().parents[1] / bench_tune.DATASETS[dataset]["recipe"])
    now = bench_tune.resolved_training(recipe, [], 42)
    assert bench_tune.resolved_training(recipe, bench_tune.CANDIDATE_SETS["st-schedule"], 42) == now
    assert bench_tune.resolved_training(recipe, bench_tune.CANDIDATE_SETS["former"], 42) != now
