"""Rows short of hard negatives (padded, masked out of the loss) and online re-mining inside the trainer."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from embedkit.errors import ConfigError
from embedkit.models.encoder import load_model
from embedkit.train.config import parse_recipe
from embedkit.train.gradcache import cached_step, plain_step
from embedkit.train.losses import Distillation, InfoNCE, text_keys
from embedkit.train.contrastive import load_examples, prepare_data, train

QUIET: dict = {}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------- the loss
def _batch(seed=0, b=3, k=2, dim=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, dim, generator=g)
    d = torch.randn(b * (1 + k), dim, generator=g)
    valid = torch.ones(b * (1 + k), dtype=torch.bool)
    valid[b + 1 * k + 1] = False  # query 1 has only its first negative
    valid[b + 2 * k:] = False  # query 2 has none
    return q, d, valid


def _by_hand(q, d, valid, scale):
    """Cross-entropy over the real documents only (the padded ones simply left out)."""
    qn, dn = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    real = valid.nonzero().squeeze(1).tolist()
    total = 0.0
    for i in range(q.shape[0]):
        logits = [scale * float(qn[i] @ dn[j]) for j in real]
        label = real.index(i)
        total += -logits[label] + math.log(sum(math.exp(x) for x in logits))
    return total / q.shape[0]


def test_short_rows_give_the_loss_without_the_missing_negatives():
    q, d, valid = _batch()
    d_garbage = d.clone()
    d_garbage[~valid] = 1e3  # whatever sits in a padded slot must not matter
    out = InfoNCE(temperature=0.5, mask_false_negatives=False)(q, d_garbage, document_valid=valid)
    assert out.loss.item() == pytest.approx(_by_hand(q, d, valid, 2.0), abs=1e-5)
    assert out.padded == 3 and out.masked == 0
    # Without the mask the padded slots would count (the test above is not vacuous).
    plain = InfoNCE(temperature=0.5, mask_false_negatives=False)(q, d_garbage)
    assert plain.loss.item() != pytest.approx(out.loss.item(), abs=1e-3)
    # All slots real: the mask changes nothing.
    full = torch.ones_like(valid)
    a = InfoNCE(temperature=0.5)(q, d, document_valid=full).loss.item()
    assert a == pytest.approx(InfoNCE(temperature=0.5)(q, d).loss.item(), abs=1e-7)


def test_padded_slots_get_no_gradient_and_positives_cannot_be_padding():
    q, d, valid = _batch(1)
    d = d.clone().requires_grad_(True)
    InfoNCE(temperature=0.1, symmetric=True)(q, d, document_valid=valid).loss.backward()
    assert torch.all(d.grad[~valid] == 0) and torch.all(d.grad[valid].abs().sum(-1) > 0)
    bad = valid.clone()
    bad[0] = False
    with pytest.raises(ValueError, match="positive"):
        InfoNCE()(q, d.detach(), document_valid=bad)


def test_distillation_ignores_padded_negatives():
    q, d, valid = _batch(2)
    b, k = 3, 2
    teacher = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.3, 99.0], [0.7, 99.0, 99.0]])  # 99 = padded, must not matter
    qn, dn = F.normalize(q, dim=-1), F.normalize(d, dim=-1)

    def student(i):  # own positive + real negatives
        cols = [i] + [b + i * k + j for j in range(k) if valid[b + i * k + j]]
        return torch.stack([qn[i] @ dn[c] for c in cols])

    real_teacher = [teacher[i, :len(student(i))] for i in range(b)]
    margin = Distillation(InfoNCE(), kind="margin_mse", contrastive_weight=0.0)
    out = margin(q, d, teacher_scores=teacher, document_valid=valid)
    errors = [((s[0] - s[1:]) - (t[0] - t[1:])) ** 2 for s, t in zip(map(student, range(b)), real_teacher)]
    expected = torch.cat(errors).mean()
    assert out.distillation == pytest.approx(float(expected), abs=1e-6)

    kl = Distillation(InfoNCE(temperature=0.5), kind="kl", contrastive_weight=0.0, temperature=0.2)
    out = kl(q, d, teacher_scores=teacher, document_valid=valid)
    expected = sum(float(F.kl_div(F.log_softmax(student(i) * 2.0, -1), F.log_softmax(real_teacher[i] / 0.2, -1),
                                  log_target=True, reduction="sum")) for i in range(b)) / b
    assert math.isfinite(out.distillation) and out.distillation == pytest.approx(expected, abs=1e-5)


QUERIES = ["what causes fever", "how is asthma treated", "insulin and blood sugar", "the guitar on stage"]
POSITIVES = ["the patient has a fever and a cough", "how is asthma treated in children",
             "insulin lowers the level of glucose in the blood", "a man is playing a guitar on the stage"]
NEGATIVES = [["diabetes is a disease of high blood sugar", "the court ruled that the contract was void"],
             ["what causes high blood pressure in adults"],  # short
             [],  # no negative at all
             ["symptoms of flu include fever, aches and fatigue", "the quick brown fox jumps over the lazy dog"]]


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcache_agrees_with_the_plain_step_on_short_rows(tiny_bert_dir, symmetric):
    encoder = load_model(tiny_bert_dir)
    encoder.eval()
    k = 2
    real_docs = POSITIVES + [n for negs in NEGATIVES for n in negs]
    valid = torch.tensor([True] * 4 + [j < len(negs) for negs in NEGATIVES for j in range(k)])
    keys = torch.full((len(valid),), -1, dtype=torch.long)
    keys[valid] = text_keys(real_docs)
    kwargs = {"query_keys": text_keys(QUERIES), "document_keys": keys, "document_valid": valid}
    q_ids = encoder.token_ids(QUERIES, "query")
    d_ids = encoder.token_ids(real_docs, "document")

    def run(step, **extra):
        encoder.zero_grad(set_to_none=True)
        out = step(encoder, InfoNCE(temperature=0.05, symmetric=symmetric), q_ids, d_ids, **kwargs, **extra)
        return out.loss.item(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}

    plain, cached = run(plain_step), run(cached_step, mini_batch=3)
    assert plain[0] == pytest.approx(cached[0], abs=1e-5)
    for name in plain[1]:
        assert torch.allclose(plain[1][name], cached[1][name], atol=1e-5), name
    # And the plain step's loss is the hand-computed one without the missing negatives.
    with torch.no_grad():
        qv, dv = encoder(encoder.collate(q_ids)), encoder(encoder.collate(d_ids))
    full = torch.zeros(len(valid), qv.shape[1])
    full[valid] = dv
    if not symmetric:
        assert plain[0] == pytest.approx(_by_hand(qv, full, valid, 20.0), abs=1e-4)


# ---------------------------------------------------------------------------------------------------- trainer
def _pairs_file(tmp_path: Path, rows) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(model_dir, train_spec, out, **sections):
    raw = {"model": {"name": str(model_dir), "max_length": 32, "attention_dropout": 0.0, "hidden_dropout": 0.0},
           "data": {"train": str(train_spec)},
           "loss": {"temperature": 0.1},
           "training": {"output_dir": str(out), "batch_size": 2, "lr": 1e-3, "epochs": 2, "seed": 7,
                        "progress": False, "log_every": 1, "threads": 1}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return parse_recipe(raw)


def test_trainer_accepts_short_rows_and_reports_them(tiny_bert_dir, tmp_path, caplog):
    rows = [{"query": q, "positive": p, "negatives": n, "scores": [1.0] + [0.5] * len(n)}
            for q, p, n in zip(QUERIES, POSITIVES, NEGATIVES)]
    data = _pairs_file(tmp_path, rows)
    with caplog.at_level(logging.INFO, logger="embedkit.train"):
        result = train(_recipe(tiny_bert_dir, data, tmp_path / "m", loss={"hard_negatives": 2}))
    assert "2 rows have fewer than 2 negatives (3 slots padded" in caplog.text
    log = [json.loads(line) for line in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    assert sum(r.get("padded", 0) for r in log if r["event"] == "train") == 3 * 2  # 3 padded slots, 2 epochs
    assert math.isfinite(result.final_loss)
    from embedkit.manifest import MANIFEST_NAME

    manifest = json.loads((tmp_path / "m" / MANIFEST_NAME).read_text())
    assert manifest["training"]["data"]["hard_negatives"] == {"wanted": 2, "short_rows": 2, "missing": 3}
    # GradCache and margin-MSE distillation train on the same short rows and agree with the plain step.
    for name, extra in (("plain", {}), ("cached", {"grad_cache": 3})):
        train(_recipe(tiny_bert_dir, data, tmp_path / name, loss={"hard_negatives": 2, "distillation": "margin_mse"},
                      training=extra), **QUIET)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(str(tmp_path / "cached" /
                                                                                      "model.safetensors"))
    assert all(torch.allclose(a[n], b[n], atol=1e-5) for n in a)


# ---------------------------------------------------------------------------------------------------- online mining
MINE_PAIRS = [
    ("what causes a fever and a cough", "the patient has a fever and a cough"),
    ("what is diabetes", "diabetes is a disease of high blood sugar"),
    ("what is diabetes", "insulin lowers the level of glucose in the blood"),  # a second positive of one query
    ("who is playing a guitar", "a man is playing a guitar on the stage"),
    ("what did the court rule", "the court ruled that the contract was void"),
    ("did interest rates rise", "interest rates rose by half a percent this quarter"),
    ("asthma in children", "how is asthma treated in children"),
    ("the fox and the dog", "the quick brown fox jumps over the lazy dog"),
]
EXTRA_DOCS = ["what causes high blood pressure in adults", "symptoms of flu include fever, aches and fatigue",
              "the bank raised its fees for savings accounts", "a woman sings a song with a piano",
              "the judge dismissed the appeal last week", "children with asthma use an inhaler",
              "glucose is a simple sugar", "the dog sleeps under the table"]


@pytest.fixture
def mine_data(tmp_path) -> tuple[Path, Path]:
    pairs = _pairs_file(tmp_path, [{"query": q, "positive": p} for q, p in MINE_PAIRS])
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"x{i}", "title": "", "text": t}) + "\n"
                              for i, t in enumerate(EXTRA_DOCS)))
    return pairs, corpus


def _mining_recipe(model_dir, pairs, corpus, out, **mining):
    section = {"online": True, "every": 2, "range": "0:10", "relative_margin": None, "duplicate_threshold": None,
               "corpus": str(corpus), **mining}
    return _recipe(model_dir, pairs, out, loss={"hard_negatives": 2}, mining=section,
                   training={"lr": 5e-3})


def test_online_mining_refreshes_negatives_and_logs_them(tiny_bert_dir, mine_data, tmp_path):
    pairs, corpus = mine_data
    recipe = _mining_recipe(tiny_bert_dir, pairs, corpus, tmp_path / "m")
    result = train(recipe, **QUIET)
    from embedkit.manifest import MANIFEST_NAME

    manifest = json.loads((tmp_path / "m" / MANIFEST_NAME).read_text())
    online = manifest["training"]["online_mining"]
    steps = [r["step"] for r in online["refreshes"]]
    assert steps == [0, 2, 4, 6] and result.steps == 8  # 4 batches x 2 epochs; at start + every 2 steps, not at 8
    from embedkit.train.remining import scheduled_rounds

    assert scheduled_rounds(2, True, 8, 4) == len(steps)  # what `tune` counts is what the loop did
    assert online["pool"]["pool_size"] == len(EXTRA_DOCS) + 8  # corpus + the 8 distinct positives
    first, later = online["refreshes"][0], online["refreshes"][1:]
    assert first["negatives_changed"] == 2 * len(MINE_PAIRS)  # from no negatives to 2 per row
    assert any(r["negatives_changed"] > 0 for r in later)  # new model + new seed: other negatives
    for r in online["refreshes"]:
        assert r["removed"]["known_positive"] >= 2  # "what is diabetes" sees its other positive in its window
        assert r["seconds"] >= 0 and r["queries"] == 7 and r["rows_short"] == 0
    log = [json.loads(line) for line in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "remine"] == steps


def test_online_mining_never_picks_a_known_positive_and_is_seeded(tiny_bert_dir, mine_data, tmp_path):
    from embedkit.train.remining import OnlineMiner

    pairs, corpus = mine_data
    recipe = _mining_recipe(tiny_bert_dir, pairs, corpus, tmp_path / "m")
    positives = {}
    for q, p in MINE_PAIRS:
        positives.setdefault(q, set()).add(p)

    def rounds():
        encoder = load_model(tiny_bert_dir, max_length=32)
        examples, source = load_examples(recipe)
        data = prepare_data(encoder, examples, source, recipe)
        miner = OnlineMiner(recipe, examples)
        seen = []
        for step in range(3):
            miner.refresh(encoder, data, step=step, epoch=0)
            seen.append([list(ex.negatives) for ex in data.examples])
            for ex in data.examples:
                assert len(ex.negatives) == 2 and not positives[ex.query] & set(ex.negatives)
            # the token ids follow the new negatives
            assert data.doc_ids[0][1] == encoder.token_ids([data.examples[0].negatives[0]], "document")[0]
        return seen

    a, b = rounds(), rounds()
    assert a == b  # same seed, same model: the same negatives, round by round
    assert a[0] != a[1] or a[1] != a[2]  # rounds draw with seed + round


def test_online_mining_training_is_deterministic(tiny_bert_dir, mine_data, tmp_path):
    pairs, corpus = mine_data
    from safetensors.torch import load_file

    for name in ("a", "b"):
        train(_mining_recipe(tiny_bert_dir, pairs, corpus, tmp_path / name, every="epoch"), **QUIET)
    wa, wb = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("a", "b"))
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    from embedkit.manifest import MANIFEST_NAME

    ra, rb = (json.loads((tmp_path / n / MANIFEST_NAME).read_text())["training"]["online_mining"]["refreshes"]
              for n in ("a", "b"))
    assert [r["step"] for r in ra] == [0, 4]  # each epoch
    from embedkit.train.remining import scheduled_rounds

    assert scheduled_rounds("epoch", True, 8, 4) == 2 and scheduled_rounds("epoch", False, 8, 4) == 1
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]  # noqa: E731
    assert strip(ra) == strip(rb)


def test_online_mining_resume_restores_the_negatives(tiny_bert_dir, mine_data, tmp_path):
    pairs, corpus = mine_data
    from safetensors.torch import load_file

    train(_mining_recipe(tiny_bert_dir, pairs, corpus, tmp_path / "whole"), **QUIET)
    recipe = _mining_recipe(tiny_bert_dir, pairs, corpus, tmp_path / "killed")
    recipe.training.checkpoint_every = 3

    def kill(step, record):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(recipe, on_step=kill, **QUIET)
    train(recipe, resume=True, **QUIET)
    wa, wb = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("whole", "killed"))
    assert all(torch.allclose(wa[n], wb[n], atol=1e-6) for n in wa)


def test_online_mining_recipe_checks():
    base = {"model": {"name": "minilm"}, "data": {"train": "x.jsonl"}, "training": {"output_dir": "o"}}
    with pytest.raises(ConfigError, match="hard_negatives"):
        parse_recipe({**base, "mining": {"online": True}})
    with pytest.raises(ConfigError, match="distillation"):
        parse_recipe({**base, "loss": {"hard_negatives": 1, "distillation": "kl"}, "mining": {"online": True}})
    with pytest.raises(ConfigError, match="window"):
        parse_recipe({**base, "loss": {"hard_negatives": 5}, "mining": {"online": True, "range": "0:3"}})
    with pytest.raises(ConfigError) as err:
        parse_recipe({**base, "loss": {"hard_negatives": 1}, "mining": {"online": True, "every": 0}})
    assert err.value.field == "mining.every"
    recipe = parse_recipe({**base, "loss": {"hard_negatives": 3}, "mining": {"online": True, "range": "5:50"}})
    settings = recipe.mining_settings()
    assert (settings.range_min, settings.range_max, settings.num_negatives, settings.seed) == (5, 50, 3, 42)
