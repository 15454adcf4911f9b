"""Rerankers (issue #31): the cross-encoder model and its saved format, the reranker losses, training through the
engine (`task: rerank`), mining negatives with the first stage, two-stage evaluation, and the kind errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embedkit.errors import ConfigError, DataError, ModelError
from embedkit.models.reranker import RERANK_PROBES_NAME, Reranker, check_rerank_probes, load_reranker
from embedkit.train.config import parse_recipe
from test_train_trainer import PAIRS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONG = "the quick brown fox jumps over the lazy dog " * 40  # far beyond max_length: the pair is cut


def _pairs_file(path: Path, *, k: int = 3, scores: bool = False) -> Path:
    rows = []
    for i, (q, p) in enumerate(PAIRS):
        negatives = [PAIRS[(i + j) % len(PAIRS)][1] for j in range(1, k + 1)]
        row = {"query": q, "positive": p, "negatives": negatives}
        if scores:
            row["scores"] = [4.0] + [1.0 - 0.1 * j for j in range(k)]
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(model_name, train, out, **sections):
    raw = {"task": "rerank", "model": {"name": str(model_name), "max_length": 48},
           "data": {"train": str(train)}, "loss": {"hard_negatives": 3},
           "training": {"output_dir": str(out), "batch_size": 5, "lr": 5e-3, "epochs": 30, "seed": 3,
                        "progress": False, "log_every": 1, "threads": 1, "warmup_ratio": 0.0}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return parse_recipe(raw)


# ---------------------------------------------------------------------------------------------------- the model
def test_saved_reranker_scores_the_same_in_sentence_transformers(tiny_reranker):
    """Bug caught: a folder CrossEncoder loads with another max length (it reads the tokenizer's model_max_length,
    not max_seq_length), another activation or another pair template: the scores a user gets from
    sentence-transformers would differ from embedkit's, the long pair first."""
    from sentence_transformers import CrossEncoder

    ours = load_reranker(tiny_reranker)
    queries = ["what is diabetes", "who is playing a guitar", "asthma in children"]
    documents = ["diabetes is a disease of high blood sugar", LONG, "how is asthma treated in children"]
    theirs = CrossEncoder(str(tiny_reranker), device="cpu").predict(list(zip(queries, documents)))
    assert np.allclose(ours.score(queries, documents), np.asarray(theirs), atol=1e-5)
    assert len(ours.pair_ids(["q"], [LONG])[0][0]) == 48  # cut to max_length, query kept
    assert ours.describe()["kind"] == "cross-encoder"
    check = check_rerank_probes(lambda q, d: ours.score(q, d, logits=True), tiny_reranker)
    assert check["ok"] and check["n"] == 12


def test_probe_scores_catch_other_weights(tiny_reranker, tmp_path, tiny_bert_dir):
    """Bug caught: a folder whose weights changed after it was written passes its probe check."""
    torch.manual_seed(1)
    other = Reranker.from_pretrained(tiny_bert_dir, max_length=48, start=True)  # another head
    assert not check_rerank_probes(lambda q, d: other.score(q, d, logits=True), tiny_reranker)["ok"]


def test_a_pair_scores_the_same_alone_and_in_a_batch(tiny_reranker):
    """Bug caught: padding leaks into the logit (wrong mask, left padding with absolute positions)."""
    reranker = load_reranker(tiny_reranker)
    documents = ["a", "diabetes is a disease of high blood sugar", LONG, "insulin lowers glucose"]
    together = reranker.score(["what is diabetes"] * 4, documents, batch_size=4)
    alone = np.array([reranker.score(["what is diabetes"], [d])[0] for d in documents])
    assert np.allclose(together, alone, atol=1e-5)
    order = reranker.rerank("what is diabetes", documents, top_n=2)
    assert [i for i, _ in order] == sorted(range(4), key=lambda i: (-together[i], i))[:2]


def test_the_wrong_kind_of_model_is_one_line_naming_both(tiny_reranker, st_bert):
    """Bug caught: a bi-encoder given as --rerank loads silently with a random head (or a cross-encoder given as
    the model embeds with mean pooling over its classifier's encoder)."""
    from embedkit.models import load_model

    with pytest.raises(ModelError) as info:
        load_reranker(st_bert)
    assert "embedding model" in str(info.value) and "not a reranker" in str(info.value)
    with pytest.raises(ModelError) as info:
        load_model(tiny_reranker)
    assert "is a reranker" in str(info.value) and "not an embedding model" in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------- losses
def _loss(kind: str, **loss):
    from embedkit.train.losses import build_loss

    recipe = _recipe("minilm", "x.jsonl", "out", loss={"type": kind, **loss}) if kind else None
    return build_loss(recipe.loss, task="rerank")


def test_listwise_is_cross_entropy_over_the_real_slots():
    """Bug caught: a padded slot (a row short of negatives) takes part in the softmax."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 9.0], [0.0, 1.0, -1.0, 3.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    out = _loss("listwise")(logits, valid)
    expected = (-torch.log_softmax(logits[0, :3], 0)[0] - torch.log_softmax(logits[1], 0)[0]) / 2
    assert torch.isclose(out.loss, expected, atol=1e-6) and out.padded == 1
    changed = logits.clone()
    changed[0, 3] = -50.0
    assert torch.isclose(_loss("listwise")(changed, valid).loss, out.loss, atol=1e-6)


def test_bce_weighs_the_positive_like_its_negatives():
    """Bug caught: k negatives outweigh the one positive, so the head learns to say "no" to everything."""
    logits = torch.zeros(1, 4)
    valid = torch.ones(1, 4, dtype=torch.bool)
    out = _loss("bce")(logits, valid)
    assert torch.isclose(out.loss, torch.tensor(np.log(2.0), dtype=torch.float32), atol=1e-6)
    logits = torch.tensor([[3.0, -3.0, -3.0, -3.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    manual = (3 * bce(logits[0, 0], torch.tensor(1.0)) + 3 * bce(logits[0, 1], torch.tensor(0.0))) / 6
    assert torch.isclose(_loss("bce")(logits, valid).loss, manual, atol=1e-6)


def test_margin_mse_distillation_is_zero_when_margins_agree():
    """Bug caught: the student's margins are compared with the teacher's scores rather than its margins."""
    loss = _loss("listwise", distillation="margin_mse", contrastive_weight=0.0)
    student = torch.tensor([[5.0, 2.0, 1.0]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    assert float(loss(student, valid, student - 10.0).loss) == pytest.approx(0.0, abs=1e-7)
    assert float(loss(student, valid, torch.tensor([[5.0, 5.0, 1.0]])).loss) > 1.0


# ---------------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("sections, message", [
    ({"loss": {"type": "infonce"}}, "reranker loss"),
    ({"loss": {"hard_negatives": 0}}, "hard_negatives >= 1"),
    ({"model": {"pooling": "mean"}}, "model.pooling"),
    ({"data": {"dev": "beir:somewhere:dev"}}, "rerank.first_stage"),
])
def test_rerank_recipes_refuse_what_they_cannot_train(sections, message):
    with pytest.raises(ConfigError) as info:
        _recipe("minilm", "x.jsonl", "out", **sections)
    assert message in str(info.value)


def test_rerank_defaults_and_embedding_recipes_keep_their_losses():
    assert _recipe("minilm", "x.jsonl", "out").loss.type == "listwise"
    with pytest.raises(ConfigError) as info:
        parse_recipe({"model": {"name": "minilm"}, "data": {"train": "x.jsonl"}, "loss": {"type": "bce"},
                      "training": {"output_dir": "o"}})
    assert "task: rerank" in str(info.value)
    with pytest.raises(ConfigError) as info:
        _recipe("minilm", "beir:somewhere", "out")
    assert "rerank.first_stage" in str(info.value)


# ---------------------------------------------------------------------------------------------------- training
def _margin(reranker: Reranker, rows: list[dict]) -> float:
    """Mean (positive score - best negative score) over the rows."""
    margins = []
    for row in rows:
        scores = reranker.score([row["query"]] * (1 + len(row["negatives"])), [row["positive"], *row["negatives"]],
                                logits=True)
        margins.append(float(scores[0] - scores[1:].max()))
    return float(np.mean(margins))


def test_training_orders_positives_first_and_saves_a_cross_encoder(tmp_path, tiny_bert_dir):
    """Bug caught: the loss's positive column is not the positive (the model learns the reverse), or the output
    is not the folder CrossEncoder loads."""
    from sentence_transformers import CrossEncoder

    from embedkit.train.rerank import train_reranker

    train = _pairs_file(tmp_path / "rows.jsonl")
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    torch.manual_seed(3)
    before = _margin(Reranker.from_pretrained(tiny_bert_dir, max_length=48, start=True), rows)
    result = train_reranker(_recipe(tiny_bert_dir, train, tmp_path / "out"))
    trained = load_reranker(result.output_dir)
    after = _margin(trained, rows)
    assert after > before + 1.0, (before, after)
    assert result.final_loss < result.first_loss
    manifest = json.loads((result.output_dir / "embedkit_manifest.json").read_text())
    assert manifest["kind"] == "reranker" and manifest["training"]["data"]["sha256"]
    assert manifest["training"]["seed"] == 3 and manifest["model"]["fingerprint"] == trained.fingerprint
    assert (result.output_dir / "train_log.jsonl").is_file() and (result.output_dir / RERANK_PROBES_NAME).is_file()
    queries, documents = [r["query"] for r in rows], [r["negatives"][0] for r in rows]
    theirs = CrossEncoder(str(result.output_dir), device="cpu").predict(list(zip(queries, documents)))
    assert np.allclose(trained.score(queries, documents), theirs, atol=1e-5)


def test_training_is_deterministic_and_resumes_exactly(tmp_path, tiny_bert_dir):
    """Bug caught: the new head or the batch order is drawn from an unseeded RNG, or a resumed run loses the
    optimizer / position (its weights would differ from the uninterrupted run's)."""
    from embedkit.train.rerank import train_reranker

    train = _pairs_file(tmp_path / "rows.jsonl")
    full = train_reranker(_recipe(tiny_bert_dir, train, tmp_path / "a", training={"epochs": 2}))

    class Killed(Exception):
        pass

    def kill_at_3(step, record):
        if step == 3:
            raise Killed

    interrupted = _recipe(tiny_bert_dir, train, tmp_path / "b", training={"epochs": 2, "checkpoint_every": 2})
    with pytest.raises(Killed):
        train_reranker(interrupted, on_step=kill_at_3)
    resumed = train_reranker(interrupted, resume=True)
    assert resumed.resumed_from == 2
    a = load_reranker(full.output_dir).fingerprint
    assert a == load_reranker(resumed.output_dir).fingerprint


def test_rows_without_negatives_are_mined_with_the_first_stage(tmp_path, tiny_bert_dir, st_bert):
    """Bug caught: a beir: training set trains a reranker with no negatives at all, or its negatives include the
    query's own positives."""
    from embedkit.train.rerank import train_reranker
    from test_tune import write_beir

    beir = write_beir(tmp_path / "beir")
    recipe = _recipe(tiny_bert_dir, f"beir:{beir}:train", tmp_path / "out", rerank={"first_stage": str(st_bert)},
                     mining={"range": "0:8", "relative_margin": None}, loss={"hard_negatives": 2},
                     training={"epochs": 1})
    result = train_reranker(recipe)
    mined = json.loads((result.output_dir / "embedkit_manifest.json").read_text())["training"]["data"]["mined"]
    assert mined["first_stage"] == str(st_bert) and mined["rows_short"] == 0
    assert result.steps >= 1

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in PAIRS))
    with pytest.raises(DataError) as info:
        train_reranker(_recipe(tiny_bert_dir, pairs, tmp_path / "none"))
    assert "no row has negatives" in str(info.value) and "rerank.first_stage" in str(info.value)


# ---------------------------------------------------------------------------------------------------- two stages
class KnownReranker:
    """Scores a pair 10 when the document is the query's judged positive, else 0: the ideal second stage."""

    def __init__(self, positives: dict[str, set[str]]) -> None:
        self.positives = positives

    def score(self, queries, documents, *, batch_size=32, logits=False):
        return np.array([10.0 if d in self.positives.get(q, set()) else 0.0 for q, d in zip(queries, documents)],
                        dtype=np.float32)

    def describe(self):
        return {"name": "known", "fingerprint": "0" * 16, "kind": "cross-encoder"}


def test_rerank_run_orders_the_head_and_keeps_the_tail():
    """Bug caught: documents below the reranked head jump above it, or the head keeps the first-stage order."""
    from embedkit.eval.metrics import trec_order
    from embedkit.eval.runner import rerank_run

    run = {"q": {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6, "e": 0.5}}
    reranked = rerank_run(KnownReranker({"query text": {"c text"}}), {"q": "query text"},
                          {x: f"{x} text" for x in "abcde"}, run, top=3)
    # a and b tie at 0: trec_eval's order (document id descending), as every run embedkit scores
    assert [d for d, _ in trec_order(reranked["q"])] == ["c", "b", "a", "d", "e"]


def test_eval_with_a_reranker_reports_both_stages(tmp_path, st_bert):
    """Bug caught: the report keeps the first stage's per-query values (so `embedkit compare` would gate the
    bi-encoder, not the two stages), or forgets which reranker produced it."""
    from embedkit.data.beir import load_beir
    from embedkit.eval.runner import evaluate
    from embedkit.models import load_model
    from test_tune import write_beir

    beir = write_beir(tmp_path / "beir", split="test")
    data = load_beir(beir, "test")
    positives = {data.queries[q]: {data.document_texts([d])[0] for d in docs} for q, docs in data.qrels.items()}
    report = evaluate(load_model(st_bert), [f"beir:{beir}:test"], reranker=KnownReranker(positives), rerank_top=14,
                      use_cache=False)
    result = next(iter(report["results"].values()))
    assert result["first_stage"]["metrics"]["ndcg_at_10"] < result["metrics"]["ndcg_at_10"]
    # every query whose text is its own gets its positives first (q1 and q14 share a text, hence positives)
    shared = {q for q, text in data.queries.items() if list(data.queries.values()).count(text) > 1}
    assert shared and all(v["ndcg_at_10"] == pytest.approx(1.0) for q, v in result["per_query"].items()
                          if q not in shared)
    assert report["manifest"]["reranker"]["name"] == "known" and report["manifest"]["settings"]["rerank_top"] == 14


def test_eval_cli_refuses_an_embedding_model_as_reranker(tmp_path, st_bert):
    from typer.testing import CliRunner

    from embedkit.cli import app

    result = CliRunner().invoke(app, ["eval", "-m", str(st_bert), "--rerank", str(st_bert), "-t", "stsb",
                                      "-o", str(tmp_path / "r.json")])
    assert result.exit_code == 2
    assert "not a reranker" in result.output and not (tmp_path / "r.json").exists()


def _step_and_pairs(tmp_path, tiny_bert_dir, length_chunk):
    """A RerankStep over the tiny rows (3 negatives each), its reranker in eval mode, and the pairs' ids and types."""
    from embedkit.data.tuples import read_examples
    from embedkit.train import rerank

    recipe = _recipe(tiny_bert_dir, "x.jsonl", tmp_path / "o", training={"length_chunk": length_chunk})
    torch.manual_seed(0)
    reranker = Reranker.from_pretrained(tiny_bert_dir, max_length=48, start=True).eval()
    examples = list(read_examples(_pairs_file(tmp_path / "rows.jsonl")))
    pairs = rerank.prepare_pairs(reranker, examples, 3, False)
    step = rerank.RerankStep(recipe, reranker, None, pairs)
    return (step, reranker, [i for row in pairs.ids for i in row], [t for row in pairs.type_ids for t in row])


def test_length_sorted_chunks_give_the_logits_of_one_forward_in_pair_order(tmp_path, tiny_bert_dir, monkeypatch):
    """Bug caught: the chunked forward returns the logits in length order, not the pairs' order, so positives and
    negatives swap columns in the loss."""
    from embedkit.train import gradcache, rerank
    from embedkit.train.gradcache import DirectRunner

    monkeypatch.setattr(gradcache, "CHUNK_MIN_SAVED_TOKENS", 0)  # tiny pairs save few tokens: chunk anyway
    used = []
    monkeypatch.setattr(rerank, "chunking_saves", lambda ids, size: used.append(gradcache.chunking_saves(ids, size))
                        or used[-1])
    step, reranker, ids, types = _step_and_pairs(tmp_path, tiny_bert_dir, length_chunk=1)
    with torch.no_grad():
        chunked = step._logits(DirectRunner(reranker), ids, types)
        whole = reranker(reranker.collate(ids, types))
    assert used and used[-1]
    assert torch.allclose(chunked, whole, atol=1e-5)


def test_a_cpu_batch_goes_in_forwards_of_at_most_the_token_cap_in_pair_order(tmp_path, tiny_bert_dir, monkeypatch):
    """Bug caught: a CPU training step ran every pair of its batch in one forward, 0.85x sentence-transformers'
    rows/s (its loss runs one forward per column of pairs); and chunks returned out of the pairs' order."""
    from embedkit.train import rerank
    from embedkit.train.gradcache import DirectRunner

    step, reranker, ids, types = _step_and_pairs(tmp_path, tiny_bert_dir, length_chunk=None)
    longest = max(len(x) for x in ids)
    monkeypatch.setattr(rerank, "CPU_FORWARD_TOKENS", 2 * longest)  # two pairs a forward
    widths = []

    def counting(features):
        widths.append(features["input_ids"].shape[0])
        return reranker(features)

    with torch.no_grad():
        chunked = step._logits(DirectRunner(counting), ids, types)
        whole = reranker(reranker.collate(ids, types))
    assert len(ids) > 2 and max(widths) <= 2 and sum(widths) == len(ids)
    assert torch.allclose(chunked, whole, atol=1e-5)
    monkeypatch.setattr(rerank, "CPU_FORWARD_TOKENS", len(ids) * longest)  # all fit: one forward
    widths.clear()
    with torch.no_grad():
        step._logits(DirectRunner(counting), ids, types)
    assert widths == [len(ids)]


# ---------------------------------------------------------------------------------------------------- training.head_lr
HEAD = {"backbone.classifier.weight", "backbone.classifier.bias"}


def _groups_of(optimizer, reranker) -> dict[str, float]:
    """Parameter name -> its group's lr, every parameter in exactly one group."""
    names = {id(p): n for n, p in reranker.named_parameters()}
    lrs = [(names[id(p)], g["lr"]) for g in optimizer.param_groups for p in g["params"]]
    assert len(lrs) == len({n for n, _ in lrs}) == len(names)
    return dict(lrs)


def test_the_new_head_is_what_the_start_did_not_train(tiny_bert_dir, st_bert, tiny_reranker, minilm_dir):
    """Bug caught: the head is named wrongly: a plain transformer's pooler (its checkpoint holds it, trained with the
    model) counted as new; an embedding model's pooler (sentence-transformers pools token states, so its training
    never ran the pooler; all-MiniLM-L6-v2's checkpoint still holds it) left at the encoder's lr; or a trained
    cross-encoder's loaded head counted as new."""
    pooler = {"backbone.bert.pooler.dense.weight", "backbone.bert.pooler.dense.bias"}
    assert Reranker.from_pretrained(tiny_bert_dir, max_length=48, start=True).new_parameter_names == HEAD
    for start in (st_bert, minilm_dir):
        assert Reranker.from_pretrained(start, max_length=48, start=True).new_parameter_names == HEAD | pooler, start
    assert Reranker.from_pretrained(tiny_reranker).new_parameter_names == frozenset()


def test_head_lr_puts_exactly_the_new_head_at_head_lr_and_keeps_the_ratio_through_the_schedule(tmp_path,
                                                                                                 tiny_bert_dir):
    """Bug caught: head_lr reaches the wrong weights (the encoder, or not the bias), or the schedule (its restart at
    each phase, its warm-up) sets every group back to one lr."""
    from embedkit.train.backends import make_adamw, param_groups, restart_optimizer
    from embedkit.train.rerank import build_reranker

    recipe = _recipe(tiny_bert_dir, "x.jsonl", tmp_path / "o", training={"lr": 2e-5, "head_lr": 1e-3})
    torch.manual_seed(0)
    reranker = build_reranker(recipe)
    optimizer = make_adamw(param_groups(reranker, recipe.training), 2e-5)
    lrs = _groups_of(optimizer, reranker)
    assert {n for n, lr in lrs.items() if lr == 1e-3} == HEAD
    assert {lr for n, lr in lrs.items() if n not in HEAD} == {2e-5}
    schedule = restart_optimizer(optimizer, 4e-5, warmup=2, total=10)  # a phase at another lr: head x 50 too
    assert {n for n, lr in _groups_of(optimizer, reranker).items() if lr == pytest.approx(4e-5 * 50 / 3)} == HEAD
    ids, types = reranker.pair_ids(["what is diabetes"] * 2, ["high blood sugar", "a fever"])
    reranker(reranker.collate(ids, types)).sum().backward()
    optimizer.step()
    schedule.step()  # warm-up: 2/3 of the phase's lr
    lrs = _groups_of(optimizer, reranker)
    assert lrs["backbone.classifier.bias"] == pytest.approx(4e-5 * 50 * 2 / 3)
    assert all(lr == pytest.approx(4e-5 * 2 / 3) for n, lr in lrs.items() if n not in HEAD)


def test_without_head_lr_the_groups_are_the_decay_rule_alone(tmp_path, tiny_bert_dir):
    """Bug caught (regression guard): a recipe without head_lr trains differently than before it existed (the head
    split off, or a group carrying an lr of its own)."""
    from embedkit.train.backends import param_groups
    from embedkit.train.rerank import build_reranker

    recipe = _recipe(tiny_bert_dir, "x.jsonl", tmp_path / "o", training={"weight_decay": 0.01})
    torch.manual_seed(0)
    reranker = build_reranker(recipe)
    groups = param_groups(reranker, recipe.training)
    named = list(reranker.named_parameters())
    no_decay = [p for n, p in named if p.ndim < 2 or "norm" in n.lower()]
    decay = [p for n, p in named if not (p.ndim < 2 or "norm" in n.lower())]
    assert [sorted(g) for g in groups] == [["params", "weight_decay"]] * 2
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert [list(map(id, g["params"])) for g in groups] == [list(map(id, decay)), list(map(id, no_decay))]


def test_head_lr_moves_the_new_head_in_a_short_run(tmp_path, tiny_bert_dir, monkeypatch):
    """Bug caught: a new head at the encoder's lr does not learn in a short run (docs/rerank.md: the listwise loss
    stayed at ln 8, 2.0777 -> 2.0741 in 52 steps at 2e-5 from MiniLM), because head_lr never reaches the optimizer.
    With head_lr the head moves ~head_lr / lr times further while the encoder moves as before."""
    from embedkit.train import rerank

    starts = []
    build = rerank.build_reranker

    def recording(recipe, device="cpu"):
        reranker = build(recipe, device)
        starts.append({n: p.detach().clone() for n, p in reranker.named_parameters()})
        return reranker

    monkeypatch.setattr(rerank, "build_reranker", recording)
    train = _pairs_file(tmp_path / "rows.jsonl")
    moved = []
    for name, head_lr in (("plain", None), ("head", 2e-3)):
        training = {"lr": 2e-5, "max_steps": 3, "weight_decay": 0.0, "head_lr": head_lr}
        first = len(starts)
        result = rerank.train_reranker(_recipe(tiny_bert_dir, train, tmp_path / name, training=training))
        start = starts[first]
        after = dict(load_reranker(result.output_dir).named_parameters())
        moved.append({n: float((after[n].detach() - start[n]).abs().max()) for n in
                      ("backbone.classifier.weight", "backbone.bert.encoder.layer.0.output.dense.weight")})
    plain, head = moved
    assert head["backbone.classifier.weight"] > 20 * plain["backbone.classifier.weight"], moved
    encoder = "backbone.bert.encoder.layer.0.output.dense.weight"
    assert plain[encoder] / 3 < head[encoder] < plain[encoder] * 3, moved


def test_head_lr_is_refused_where_nothing_is_new(tmp_path, tiny_llama_dir, tiny_reranker):
    """A bi-encoder recipe, a yes/no LLM reranker (its logit is the LM head's yes minus no) and a trained
    cross-encoder have no new head: head_lr would change nothing, so it is one line naming the field."""
    from embedkit.train.rerank import build_reranker

    with pytest.raises(ConfigError) as info:
        parse_recipe({"model": {"name": "minilm"}, "data": {"train": "x.jsonl"},
                      "training": {"output_dir": "o", "head_lr": 1e-3}})
    assert "training.head_lr" in str(info.value) and "task: rerank" in str(info.value)
    for start, what in ((tiny_llama_dir, "yes/no reranker"), (tiny_reranker, "trained cross-encoder")):
        with pytest.raises(ConfigError) as info:
            build_reranker(_recipe(start, "x.jsonl", tmp_path / "o", training={"head_lr": 1e-3}))
        assert info.value.field == "training.head_lr" and what in str(info.value)
