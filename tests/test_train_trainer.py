"""The training loop on tiny models: outputs, determinism, resume, dev selection, GradCache, LoRA / QLoRA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embedkit.models.encoder import load_model
from embedkit.train.config import parse_recipe
from embedkit.models.probes import PROBES_NAME as PROBE_FILE, check_probes
from embedkit.train.contrastive import epoch_batches, load_examples, prepare_data, train
from embedkit.train.engine import work_dir

PAIRS = [
    ("what causes a fever and a cough", "the patient has a fever and a cough"),
    ("what is diabetes", "diabetes is a disease of high blood sugar"),
    ("what does insulin do", "insulin lowers the level of glucose in the blood"),
    ("who is playing a guitar", "a man is playing a guitar on the stage"),
    ("what did the court rule", "the court ruled that the contract was void"),
    ("did interest rates rise", "interest rates rose by half a percent this quarter"),
    ("high blood pressure causes", "what causes high blood pressure in adults"),
    ("asthma in children", "how is asthma treated in children"),
    ("the fox and the dog", "the quick brown fox jumps over the lazy dog"),
    ("flu symptoms", "symptoms of flu include fever, aches and fatigue"),
]


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    rows = []
    for i, (q, p) in enumerate(PAIRS):
        negs = [PAIRS[(i + 1) % len(PAIRS)][1], PAIRS[(i + 3) % len(PAIRS)][1]]
        rows.append({"query": q, "positive": p, "negatives": negs, "scores": [5.0, 1.0, 0.5]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def dev_dir(tmp_path) -> Path:
    folder = tmp_path / "dev"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": p}) + "\n"
                                                 for i, (_, p) in enumerate(PAIRS)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n"
                                                  for i, (q, _) in enumerate(PAIRS)))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                               "".join(f"q{i}\td{i}\t1\n" for i in range(len(PAIRS))))
    return folder


def _recipe(model_dir, pairs_file, out, **sections):
    raw = {"model": {"name": str(model_dir), "max_length": 32},
           "data": {"train": str(pairs_file)},
           "loss": {"temperature": 0.1},
           "training": {"output_dir": str(out), "batch_size": 4, "lr": 1e-3, "epochs": 2, "seed": 7,
                        "progress": False, "log_every": 1,
                        "threads": 1}}  # tiny models: more threads only spin-wait on a busy machine
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return parse_recipe(raw)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_weights_close(a: Path, b: Path, atol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=atol, rtol=0), key


QUIET: dict = {}


def test_train_writes_a_complete_model_folder(tiny_bert_dir, pairs_file, dev_dir, tmp_path):
    out = tmp_path / "model"
    recipe = _recipe(tiny_bert_dir, pairs_file, out, data={"dev": f"beir:{dev_dir}:test"})
    result = train(recipe, **QUIET)
    assert result.steps == 6 and result.samples == 20  # 10 examples, batch 4 -> 3 steps per epoch, 2 epochs
    assert {"modules.json", "model.safetensors", "embedkit_manifest.json", "README.md", PROBE_FILE,
            "train_log.jsonl", "1_Pooling"} <= {p.name for p in out.iterdir()}
    manifest = json.loads((out / "embedkit_manifest.json").read_text())
    assert manifest["training"]["recipe"]["training"]["seed"] == 7
    assert len(manifest["training"]["data"]["sha256"]) == 64
    assert manifest["base_model"]["fingerprint"] and manifest["library_versions"]["torch"]
    assert manifest["model"]["path"] == str(out) and manifest["command_line"]
    assert manifest["dev_eval"]["metrics"]["ndcg_at_10"] == pytest.approx(result.dev["metrics"]["ndcg_at_10"])
    card = (out / "README.md").read_text()
    assert "ndcg_at_10" in card
    assert "- loss: InfoNCE (temperature 0.1, false negatives masked); 0 hard negatives per query" in card
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) for r in log if r["event"] == "train")
    # The saved model reproduces its probe vectors, and it differs from the base model.
    reloaded = load_model(out)
    assert reloaded.fingerprint == manifest["model"]["fingerprint"]
    assert check_probes(lambda texts, kind: reloaded.encode(texts, kind=kind), out).ok
    base = load_model(tiny_bert_dir)
    assert not check_probes(lambda texts, kind: base.encode(texts, kind=kind), out).ok
    assert not (work_dir(out) / "checkpoints").exists()


def test_two_runs_with_the_same_seed_give_identical_weights(tiny_bert_dir, pairs_file, tmp_path):
    train(_recipe(tiny_bert_dir, pairs_file, tmp_path / "a"), **QUIET)
    train(_recipe(tiny_bert_dir, pairs_file, tmp_path / "b"), **QUIET)
    _assert_weights_close(tmp_path / "a", tmp_path / "b", atol=0)
    train(_recipe(tiny_bert_dir, pairs_file, tmp_path / "c", training={"seed": 8}), **QUIET)
    with pytest.raises(AssertionError):
        _assert_weights_close(tmp_path / "a", tmp_path / "c", atol=1e-6)


def test_min_steps_raises_the_epochs_to_whole_passes_and_never_lowers_them(tiny_bert_dir, pairs_file, tmp_path):
    # Bug caught: a small data set's schedule stays at its epochs' handful of steps (min_steps ignored), the floor
    # ends mid-epoch (examples seen unequally often), or it shortens a recipe whose epochs already give more steps.
    raised = train(_recipe(tiny_bert_dir, pairs_file, tmp_path / "raised", training={"epochs": 1, "min_steps": 7}),
                   **QUIET)
    assert raised.steps == 9 and raised.samples == 30  # 3 steps per epoch: 7 steps need 3 whole passes
    log = [json.loads(line) for line in (tmp_path / "raised" / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["event"] == "train"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert "(min_steps 7)" in (tmp_path / "raised" / "README.md").read_text()
    kept = train(_recipe(tiny_bert_dir, pairs_file, tmp_path / "kept", training={"epochs": 2, "min_steps": 2}),
                 **QUIET)
    assert kept.steps == 6
    capped = train(_recipe(tiny_bert_dir, pairs_file, tmp_path / "capped",
                           training={"epochs": 1, "min_steps": 7, "max_steps": 5}), **QUIET)
    assert capped.steps == 5


class Killed(Exception):
    pass


def test_resume_after_a_kill_ends_with_the_same_weights(tiny_bert_dir, pairs_file, tmp_path):
    settings = {"checkpoint_every": 2, "group_by_length": True}
    train(_recipe(tiny_bert_dir, pairs_file, tmp_path / "full", training=settings), **QUIET)

    out = tmp_path / "killed"
    recipe = _recipe(tiny_bert_dir, pairs_file, out, training=settings)

    def kill(step, record):
        if step == 5:  # after the step-4 checkpoint, in the second epoch, mid-epoch
            raise Killed

    with pytest.raises(Killed):
        train(recipe, on_step=kill, **QUIET)
    assert not out.exists()  # nothing half-written where the model goes
    checkpoint = work_dir(out) / "checkpoints" / "step-4"
    for name in ("state.pt", "engine.pt", "rng-0.pt"):
        torch.load(checkpoint / name, weights_only=True)  # plain tensors and dicts only
    payload = torch.load(checkpoint / "engine.pt", weights_only=True)
    assert payload["position"]["step"] == 4 and payload["position"]["epoch"] == 1
    result = train(recipe, resume=True, **QUIET)
    assert result.steps == 6
    _assert_weights_close(tmp_path / "full", out, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 5, 6]  # the killed run logged 1-5; the resumed one redid 5, then 6


def test_resume_refuses_a_changed_recipe(tiny_bert_dir, pairs_file, tmp_path):
    from embedkit.errors import ConfigError

    out = tmp_path / "m"

    def kill(step, record):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train(_recipe(tiny_bert_dir, pairs_file, out, training={"checkpoint_every": 2}), on_step=kill, **QUIET)
    changed = _recipe(tiny_bert_dir, pairs_file, out, training={"checkpoint_every": 2, "lr": 5e-4})
    with pytest.raises(ConfigError, match="recipe changed"):
        train(changed, resume=True, **QUIET)


def test_dev_evaluation_selects_the_best_checkpoint(tiny_bert_dir, pairs_file, dev_dir, tmp_path):
    out = tmp_path / "m"
    # A learning rate this large makes later steps worse on dev, so the best step is an early one.
    recipe = _recipe(tiny_bert_dir, pairs_file, out, data={"dev": f"beir:{dev_dir}:test"},
                     training={"eval_every": 1, "lr": 0.05, "warmup_ratio": 0.0})
    result = train(recipe, **QUIET)
    history = json.loads((out / "embedkit_manifest.json").read_text())["training"]["stats"]["history"]
    scores = {h["step"]: h["score"] for h in history}
    assert sorted(scores) == [1, 2, 3, 4, 5, 6]
    best = max(scores, key=lambda s: (scores[s], -s))
    assert result.best_step == best
    assert result.dev["metrics"]["ndcg_at_10"] == pytest.approx(scores[best], abs=1e-9)


def test_grad_cache_training_equals_plain_training(tiny_bert_dir, pairs_file, tmp_path):
    no_dropout = {"attention_dropout": 0.0, "hidden_dropout": 0.0, "name": str(tiny_bert_dir), "max_length": 32}
    train(_recipe(tiny_bert_dir, pairs_file, tmp_path / "plain", model=no_dropout, loss={"hard_negatives": 2}), **QUIET)
    train(_recipe(tiny_bert_dir, pairs_file, tmp_path / "cached", model=no_dropout, loss={"hard_negatives": 2},
                  training={"grad_cache": 3}), **QUIET)
    _assert_weights_close(tmp_path / "plain", tmp_path / "cached", atol=1e-5)


def test_batches_are_deterministic_and_cover_every_example(tiny_bert_dir, pairs_file, tmp_path):
    recipe = _recipe(tiny_bert_dir, pairs_file, tmp_path / "m", training={"group_by_length": True, "batch_size": 3})
    examples, source = load_examples(recipe)
    data = prepare_data(load_model(tiny_bert_dir, max_length=32), examples, source, recipe)
    first = epoch_batches(data, recipe, 0)
    assert first == epoch_batches(data, recipe, 0)
    assert sorted(i for b in first for i in b) == list(range(10))
    assert first != epoch_batches(data, recipe, 1)


def test_hard_negatives_distillation_matryoshka_and_learned_temperature(tiny_bert_dir, pairs_file, tmp_path):
    recipe = _recipe(tiny_bert_dir, pairs_file, tmp_path / "m",
                     loss={"hard_negatives": 2, "distillation": "margin_mse", "matryoshka_dims": [32, 16],
                           "learn_temperature": True, "symmetric": True, "margin": 0.2})
    result = train(recipe, **QUIET)
    log = [json.loads(line) for line in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    train_rows = [r for r in log if r["event"] == "train"]
    assert all("distillation" in r for r in train_rows)
    assert train_rows[-1]["scale"] != pytest.approx(10.0)  # the learned temperature moved
    assert np.isfinite(result.final_loss)


def test_rows_short_of_negatives_are_padded_not_refused(tiny_bert_dir, pairs_file, tmp_path):
    # Every row has 2 negatives; asking for 3 pads one slot per row (tests/test_train_mining.py checks the loss).
    result = train(_recipe(tiny_bert_dir, pairs_file, tmp_path / "m", loss={"hard_negatives": 3}), **QUIET)
    log = [json.loads(line) for line in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    assert [r["padded"] for r in log if r["event"] == "train"][:3] == [4, 4, 2]  # batches of 4, 4, 2 rows
    assert np.isfinite(result.final_loss)


@pytest.mark.parametrize("variant", [{}, {"dora": True, "rslora": True}], ids=["lora", "dora+rslora"])
def test_lora_saves_adapter_and_merged_model(tiny_bert_dir, pairs_file, tmp_path, variant):
    out = tmp_path / "m"
    recipe = _recipe(tiny_bert_dir, pairs_file, out, adapter={"type": "lora", "r": 4, "alpha": 8, "save": "both",
                                                              **variant},
                     training={"lr": 1e-2})
    train(recipe, **QUIET)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] == variant.get("dora", False) and config["use_rslora"] == variant.get("rslora", False)
    merged = load_model(out)
    with_adapter = load_model(tiny_bert_dir, adapter=out / "adapter", max_length=32)
    texts = [q for q, _ in PAIRS]
    assert np.allclose(merged.encode(texts), with_adapter.encode(texts), atol=1e-5)
    assert not np.allclose(merged.encode(texts), load_model(tiny_bert_dir).encode(texts), atol=1e-3)


def test_qlora_trains_a_4bit_causal_encoder(tiny_llama64_dir, pairs_file, tmp_path):
    out = tmp_path / "m"
    recipe = _recipe(tiny_llama64_dir, pairs_file, out, model={"pooling": "lasttoken", "padding_side": "left",
                                                               "name": str(tiny_llama64_dir), "max_length": 32},
                     adapter={"type": "qlora", "r": 4, "alpha": 8, "save": "both"},
                     training={"grad_cache": 2, "epochs": 1, "lr": 1e-2})
    result = train(recipe, **QUIET)
    assert result.steps == 3 and np.isfinite(result.final_loss)
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = load_model(out)
    assert merged.pooling == "lasttoken" and merged.quantization is None
    assert check_probes(lambda texts, kind: merged.encode(texts, kind=kind), out, atol=1e-4).ok


def test_tensorboard_events_hold_loss_lr_temperature_and_dev_metrics(tiny_bert_dir, pairs_file, dev_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(_recipe(tiny_bert_dir, pairs_file, out, data={"dev": f"beir:{dev_dir}:test"},
                  loss={"learn_temperature": True}, training={"eval_every": 3}))
    assert list((out / "tensorboard" / "train").glob("events.out.tfevents.*")), "no TensorBoard event file"
    acc = EventAccumulator(str(out / "tensorboard" / "train"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/temperature", "train/grad_norm", "eval/score",
            "final_eval/score"} <= tags, tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("eval/score")] == [3, 6]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["event"] == "train"]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    # A learned temperature moves, and the logged temperature is 1 / scale of the loss.
    temperatures = [e.value for e in acc.Scalars("train/temperature")]
    assert temperatures[0] != temperatures[-1]
    assert temperatures[0] == pytest.approx(1 / [r["scale"] for r in log if r["event"] == "train"][0], rel=1e-5)
    # report_to: [] switches trackers off.
    train(_recipe(tiny_bert_dir, pairs_file, tmp_path / "quiet", training={"report_to": []}))
    assert not (tmp_path / "quiet" / "tensorboard").exists()


def test_bf16_mixed_precision_trains_and_saves_full_precision_probes(tiny_bert_dir, pairs_file, dev_dir, tmp_path):
    """Autocast during training only: the saved model's probe vectors (fp32) must be what it computes when reloaded,
    and the final dev evaluation is of that fp32 model (it equals `embedkit eval` of the saved folder)."""
    from embedkit.eval.runner import evaluate

    out = tmp_path / "bf16"
    result = train(_recipe(tiny_bert_dir, pairs_file, out, data={"dev": f"beir:{dev_dir}:test"},
                           training={"mixed_precision": "bf16"}))
    reloaded = load_model(out)
    assert check_probes(lambda texts, kind: reloaded.encode(texts, kind=kind), out).ok
    report = evaluate(reloaded, [f"beir:{dev_dir}:test"], use_cache=False)
    name = next(iter(report["results"]))
    assert result.dev["score"] == pytest.approx(report["results"][name]["metrics"]["ndcg_at_10"], abs=1e-6)
    fp32 = train(_recipe(tiny_bert_dir, pairs_file, tmp_path / "fp32"))
    assert fp32.final_loss != pytest.approx(result.final_loss, abs=1e-7)  # bf16 autocast really ran


def test_a_sharding_backend_without_a_model_builder_fails_before_training(tiny_bert_dir, pairs_file, tmp_path,
                                                                          monkeypatch):
    """Bug: a step that never called Engine.set_model_builder trained a whole DeepSpeed / FSDP run and failed only
    when the sharded model was to be rebuilt for saving; a backend that shards the parameters now refuses to start."""
    from embedkit.train import engine as engine_module
    from embedkit.train.backends import DataParallelBackend

    class ShardingBackend(DataParallelBackend):  # stands in for DeepSpeed / FSDP, which need several processes
        kind = "sharding-for-test"
        shards_parameters = True

        def wrap(self, model, extra):
            raise AssertionError("wrapped the model before checking for a builder")

    class OneBatch(engine_module.StepBase):
        def batches(self, epoch, batch_size):
            return [[0]]

    monkeypatch.setattr(engine_module, "backend_class", lambda recipe: ShardingBackend)
    engine = engine_module.Engine(_recipe(tiny_bert_dir, pairs_file, tmp_path / "out"), tmp_path / "out")
    with pytest.raises(RuntimeError, match="must register a model builder"):
        engine.fit(OneBatch(), torch.nn.Linear(2, 2), n_examples=1)


def test_attention_and_hidden_dropout_are_set_apart(tiny_bert_dir):
    """Bug caught: BERT's attention nn.Dropout was visited again as a plain Dropout after its attention module and
    took the hidden rate, so `attention_dropout: 0.0, hidden_dropout: 0.2` trained with attention dropout 0.2."""
    from embedkit.train.contrastive import set_dropout

    encoder = load_model(tiny_bert_dir, max_length=32)
    set_dropout(encoder, attention=0.0, hidden=0.2)
    rates = {name: m.p for name, m in encoder.backbone.named_modules() if isinstance(m, torch.nn.Dropout)}
    attention = {n: p for n, p in rates.items() if ".attention.self." in n}
    hidden = {n: p for n, p in rates.items() if n not in attention}
    assert attention and set(attention.values()) == {0.0}
    assert hidden and set(hidden.values()) == {0.2}
