"""The generative path (embedkit.llm) on the tiny Llama: answer-only loss masking, DPO loss, joint weighting,
preference pairs, one folder with two heads, recipes and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from embedkit.errors import ConfigError
from embedkit.llm.data import IGNORE_INDEX, QAExample, encode_sft, preference_pairs, prompt_ids

TOPICS = {
    "asthma": ["asthma narrows the airways and causes wheezing", "asthma is treated with inhalers",
               "asthma runs in families"],
    "diabetes": ["diabetes is a disease of high blood sugar", "insulin lowers the level of glucose in the blood"],
    "flu": ["symptoms of flu include fever, aches and fatigue", "the flu spreads by coughing"],
    "gout": ["gout is a painful arthritis of the big toe"],
}
QUESTIONS = ["what is {t}?", "how is {t} treated?", "who gets {t}?"]


def _qa_rows() -> list[dict]:
    rows = []
    for topic, answers in TOPICS.items():
        for question, answer in zip(QUESTIONS, answers):
            rows.append({"query": question.format(t=topic), "positive": answer, "focus": topic})
    return rows


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qa") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _qa_rows()))
    return path


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    from embedkit.llm.model import load_causal_lm

    model, tokenizer, _, _ = load_causal_lm(tiny_llama_dir)
    return model, tokenizer


def _recipe(tmp_path, qa_file, model_dir, mode, **sections):
    from embedkit.llm.config import load_llm_recipe

    raw = {"model": {"name": str(model_dir), "max_length": 96},
           "adapter": {"type": "lora", "r": 4, "alpha": 8},
           "data": {"train": str(qa_file), "heldout": str(qa_file), "heldout_examples": 8},
           "training": {"output_dir": str(tmp_path / mode), "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3,
                        "max_steps": 2, "progress": False, "threads": 1}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    path = tmp_path / f"{mode}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return load_llm_recipe(path, mode=mode)


# ---------------------------------------------------------------------------------------------------- masking
def test_sft_labels_mask_exactly_the_prompt(tiny_lm):
    _, tok = tiny_lm
    feature = encode_sft(tok, "what is asthma?", "asthma narrows the airways", max_length=200)
    prompt = prompt_ids(tok, [{"role": "user", "content": "what is asthma?"}])
    n = len(prompt)
    assert feature["input_ids"][:n] == prompt  # the ids generation continues from
    assert feature["labels"][:n] == [IGNORE_INDEX] * n
    assert feature["labels"][n:] == feature["input_ids"][n:]
    assert feature["input_ids"][-1] == tok.eos_token_id  # trained to end its turn
    assert tok.decode(feature["input_ids"][n:], skip_special_tokens=True).strip() == "asthma narrows the airways"
    cut = encode_sft(tok, "what is asthma?", "asthma narrows the airways " * 20, max_length=n + 5)
    assert len(cut["input_ids"]) == n + 5 and cut["labels"][:n] == [IGNORE_INDEX] * n
    assert encode_sft(tok, "what is asthma? " * 40, "x", max_length=n + 5) is None  # prompt alone does not fit


def test_loss_ignores_prompt_and_padding_logits(tiny_lm):
    from embedkit.llm.sft import collate_sft, sft_loss_from_logits, sft_loss_sum

    model, tok = tiny_lm
    features = [encode_sft(tok, "what is asthma?", "asthma narrows the airways", max_length=200),
                encode_sft(tok, "how is flu treated?", "rest", max_length=200)]
    batch = collate_sft(features, tok.pad_token_id)
    labels = batch["labels"]
    assert (labels[batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    logits = torch.randn(*labels.shape, len(tok), requires_grad=True)
    loss = sft_loss_from_logits(logits, labels)
    loss.backward()
    # Position t predicts token t+1: logits whose target is a prompt (or padding) token carry no loss and no gradient.
    predicts_prompt = torch.zeros_like(labels, dtype=torch.bool)
    predicts_prompt[:, :-1] = labels[:, 1:] == IGNORE_INDEX
    predicts_prompt[:, -1] = True
    assert logits.grad[predicts_prompt].abs().max() == 0
    assert logits.grad[~predicts_prompt].abs().sum() > 0
    changed = logits.detach().clone()
    changed[predicts_prompt] = torch.randn_like(changed[predicts_prompt]) * 50
    assert torch.equal(sft_loss_from_logits(changed, labels), loss.detach())
    answer_pos = (~predicts_prompt).nonzero()[0]
    changed[answer_pos[0], answer_pos[1]] += 5 * torch.randn(len(tok))
    assert not torch.equal(sft_loss_from_logits(changed, labels), loss.detach())
    # The answer-positions-only path equals the full-logits loss of the model.
    with torch.no_grad():
        full = sft_loss_from_logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    labels)
        total, n = sft_loss_sum(model, batch)
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert torch.allclose(total / n, full, atol=1e-5)


def test_micro_batches_do_not_change_the_sft_gradient(tiny_llama_dir, tiny_lm):
    from embedkit.llm.model import TwoHeads, load_causal_lm
    from embedkit.llm.sft import sft_backward
    from embedkit.train.gradcache import DirectRunner

    _, tok = tiny_lm
    features = [encode_sft(tok, r["query"], r["positive"], max_length=96) for r in _qa_rows()[:5]]
    grads = []
    for micro in (None, 2):
        model, _, _, _ = load_causal_lm(tiny_llama_dir)
        loss = sft_backward(DirectRunner(TwoHeads(model)), features, tok.pad_token_id, micro_batch=micro)
        grads.append((loss, model.lm_head.weight.grad.clone()))
    assert math.isclose(grads[0][0], grads[1][0], rel_tol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


# ---------------------------------------------------------------------------------------------------- DPO
def test_dpo_loss_equals_hand_computed_value():
    from embedkit.llm.dpo import dpo_loss

    # pair 1: policy prefers chosen by 2 nats more than the reference does; pair 2: by -1 nat.
    pc, pr = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -21.0])
    rc, rr = torch.tensor([-11.0, -19.0]), torch.tensor([-11.0, -21.0])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # pair 1: 0.1*((-10+11) - (-12+11)) = 0.2; pair 2: 0.1*((-20+19) - (-21+21)) = -0.1
    by_hand = (math.log(1 + math.exp(-0.2)) + math.log(1 + math.exp(0.1))) / 2
    assert math.isclose(float(loss), by_hand, rel_tol=1e-6)
    assert math.isclose(by_hand, 0.671268, abs_tol=1e-5)  # (0.598139 + 0.744397) / 2
    assert torch.allclose(chosen, torch.tensor([0.1, -0.1])) and torch.allclose(rejected, torch.tensor([-0.1, 0.0]))


def test_dpo_reference_scores_are_the_starting_models(tmp_path, qa_file, sft_folder):
    """The reference log-probs DPO trains against are the model's own before its first update (an adapter starts at
    zero, so they equal the adapter-disabled model's), and training moves the policy away from them."""
    from embedkit.llm.dpo import DPOStep, score_pairs
    from embedkit.llm.model import load_causal_lm
    from embedkit.llm.training import run_llm

    folder, _ = sft_folder
    seen = {}

    class Spy(DPOStep):
        def start(self, engine, resumed):
            super().start(engine, resumed)
            seen["reference"] = self.reference
            seen["pairs"] = self.encoded
            seen["pad"] = self.ctx.pad_id

    run_llm(_recipe(tmp_path, qa_file, folder, "dpo"), "dpo", Spy)
    start, tok, _, _ = load_causal_lm(folder)
    expected = score_pairs(start, seen["pairs"], seen["pad"])
    assert torch.allclose(seen["reference"]["chosen"], expected["chosen"], atol=1e-4)
    assert torch.allclose(seen["reference"]["rejected"], expected["rejected"], atol=1e-4)
    trained, _, _, _ = load_causal_lm(tmp_path / "dpo")
    after = score_pairs(trained, seen["pairs"], seen["pad"])
    assert not torch.allclose(after["chosen"], expected["chosen"], atol=1e-3)


# ---------------------------------------------------------------------------------------------------- pairs
def test_preference_pairs_take_rejected_from_the_same_topic_never_the_own_answer():
    examples = [QAExample(r["query"], r["positive"], r["focus"]) for r in _qa_rows()]
    examples.append(QAExample("why asthma?", "asthma narrows the airways and causes wheezing", "asthma"))  # duplicate
    by_answer_topic = {ex.answer: ex.topic for ex in examples}
    for seed in range(5):
        pairs, skipped = preference_pairs(examples, seed=seed)
        assert skipped == 1  # gout has one question only
        assert len(pairs) == len(examples) - 1
        for pair, ex in zip(pairs, [e for e in examples if e.topic != "gout"]):
            assert pair.question == ex.question and pair.chosen == ex.answer
            assert pair.rejected != pair.chosen
            assert by_answer_topic[pair.rejected] == ex.topic


# ---------------------------------------------------------------------------------------------------- joint
def test_joint_step_is_contrastive_plus_weighted_sft_exactly(tiny_llama_dir, tiny_lm):
    from embedkit.llm.config import LLMAdapterSection, LLMModelSection
    from embedkit.llm.joint import joint_step
    from embedkit.llm.model import TwoHeads, attach_adapter, embedding_settings, load_causal_lm, make_embedder
    from embedkit.llm.sft import collate_sft, sft_loss_from_logits
    from embedkit.train.gradcache import DirectRunner
    from embedkit.train.losses import InfoNCE

    _, tok = tiny_lm
    rows = _qa_rows()[:4]
    weight = 0.37

    def fresh():
        torch.manual_seed(0)
        model = attach_adapter(load_causal_lm(tiny_llama_dir)[0], LLMAdapterSection(type="lora", r=4, alpha=8))
        settings = embedding_settings(LLMModelSection(name="x", max_length=64), {})
        return model, make_embedder(model, tok, settings, name="x")

    features = [encode_sft(tok, r["query"], r["positive"], max_length=96) for r in rows]
    model, emb = fresh()
    q_ids = emb.token_ids([r["query"] for r in rows], "query")
    d_ids = emb.token_ids([r["positive"] for r in rows], "document")
    loss_fn = InfoNCE(temperature=0.05)
    out = joint_step(emb, DirectRunner(TwoHeads(model, emb)), loss_fn, q_ids, d_ids, features, pad_id=tok.pad_token_id,
                     weight=weight)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model2, emb2 = fresh()
    contrastive = loss_fn(emb2(emb2.collate(q_ids)), emb2(emb2.collate(d_ids))).loss
    batch = collate_sft(features, tok.pad_token_id)
    sft = sft_loss_from_logits(model2(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               batch["labels"])
    (contrastive + weight * sft).backward()
    assert math.isclose(out["contrastive"], float(contrastive), rel_tol=1e-5)
    assert math.isclose(out["sft"], float(sft), rel_tol=1e-5)
    assert out["loss"] == pytest.approx(out["contrastive"] + weight * out["sft"], rel=1e-6)
    for name, p in model2.named_parameters():
        if p.requires_grad:
            assert torch.allclose(got[name], p.grad, atol=1e-5), name
    # weight 0 is the embedding-only run: no answer-loss gradient at all
    model3, emb3 = fresh()
    out0 = joint_step(emb3, DirectRunner(TwoHeads(model3, emb3)), loss_fn, q_ids, d_ids, features,
                      pad_id=tok.pad_token_id, weight=0.0)
    assert out0["sft"] == 0.0 and out0["loss"] == out0["contrastive"]


def test_bidirectional_embedding_attention_sees_later_tokens(tiny_llama_dir):
    from embedkit.models import load_model

    causal = load_model(tiny_llama_dir, pooling="mean")
    both = load_model(tiny_llama_dir, pooling="mean")
    both.attention = "bidirectional"
    texts = ["the patient has a fever", "the patient has a cough and a fever"]
    a, b = causal.encode(texts), both.encode(texts)
    assert not torch.allclose(torch.from_numpy(a), torch.from_numpy(b), atol=1e-4)
    # padding side must not matter under the bidirectional mask either
    both.padding_side = "right"
    assert torch.allclose(torch.from_numpy(both.encode(texts)), torch.from_numpy(b), atol=1e-5)
    # the first token's state depends on later tokens only with bidirectional attention
    def first_state(enc, text):
        feats = enc.tokenize([text])
        kwargs = {"attention_mask": feats["attention_mask"]}
        with torch.no_grad():
            if enc.attention == "bidirectional":
                from transformers.masking_utils import create_bidirectional_mask

                emb = enc.backbone.get_input_embeddings()(feats["input_ids"])
                kwargs["attention_mask"] = create_bidirectional_mask(config=enc.backbone.config, inputs_embeds=emb,
                                                                     attention_mask=feats["attention_mask"],
                                                                     allow_is_bidirectional_skip=False)
                return enc.backbone(inputs_embeds=emb, **kwargs).last_hidden_state[0, 0]
            return enc.backbone(input_ids=feats["input_ids"], **kwargs).last_hidden_state[0, 0]
    assert torch.allclose(first_state(causal, "fever now"), first_state(causal, "fever then"))
    assert not torch.allclose(first_state(both, "fever now"), first_state(both, "fever then"))


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def sft_folder(tmp_path_factory, qa_file, tiny_llama_dir):
    from embedkit.llm.sft import train_sft

    tmp = tmp_path_factory.mktemp("sft")
    result = train_sft(_recipe(tmp, qa_file, tiny_llama_dir, "sft"))
    return Path(result["output_dir"]), result


def test_sft_output_is_one_folder_with_both_heads(sft_folder, tiny_llama_dir):
    from embedkit.models.probes import check_probes
    from embedkit.llm.generate import load_generator
    from embedkit.llm.model import has_generative_head
    from embedkit.models import load_model

    folder, result = sft_folder
    assert result["steps"] == 2 and "heldout_answer_loss" in result and "heldout_answer_loss_before" in result
    assert has_generative_head(folder) and has_generative_head(tiny_llama_dir)
    encoder = load_model(folder)
    assert encoder.pooling == "lasttoken" and encoder.prompts.get("query", "").startswith("Instruct:")
    assert check_probes(lambda texts, kind: encoder.encode(list(texts), kind=kind), folder).ok
    manifest = json.loads((folder / "embedkit_manifest.json").read_text())
    assert manifest["llm"]["mode"] == "sft" and manifest["model"]["generative_head"] is True
    generator = load_generator(folder)
    # the generative side has the trained weights: its decoder equals the embedding side's backbone
    for (name, a), (_, b) in zip(sorted(generator.model.model.state_dict().items()),
                                 sorted(encoder.backbone.state_dict().items())):
        assert torch.equal(a, b), name
    text = generator.answer("what is asthma?", ["asthma narrows the airways", "the flu spreads"], max_new_tokens=8)
    assert isinstance(text, str)
    messages = generator.rag_messages("what is asthma?", ["first passage", "second passage"])
    assert "[1] first passage" in messages[-1]["content"] and "[2] second passage" in messages[-1]["content"]


def test_embedding_only_folder_has_no_generative_head(tmp_path, tiny_llama_dir, st_bert):
    from embedkit.errors import ModelError
    from embedkit.llm.generate import load_generator
    from embedkit.llm.model import has_generative_head
    from embedkit.models import load_model

    load_model(tiny_llama_dir).save(tmp_path / "emb")
    assert not has_generative_head(tmp_path / "emb") and not has_generative_head(st_bert)
    with pytest.raises(ModelError, match="no generative head"):
        load_generator(tmp_path / "emb")


def _answer_logprob(model, feature) -> float:
    """Summed log-prob of the answer tokens of one encoded example, by hand: one unpadded forward, log-softmax,
    position t scoring token t+1 (independent of collate_sft / sequence_logprobs / score_pairs)."""
    ids = torch.tensor([feature["input_ids"]])
    targets = torch.tensor(feature["labels"][1:])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    keep = targets != IGNORE_INDEX
    return float(logp[keep].gather(1, targets[keep, None]).sum())


def _pair_margins(model, encoded) -> list[float]:
    """log p(chosen) - log p(rejected) per encoded pair."""
    return [_answer_logprob(model, c) - _answer_logprob(model, r) for c, r in encoded]


def test_dpo_trains_towards_chosen_and_reports_heldout_accuracy_of_saved_model(tmp_path, qa_file, sft_folder):
    """DPO moves the policy towards the chosen answers on its training pairs, and the reported held-out preference
    accuracy / margin (after and before) equal those computed by hand from the saved and the starting folder.

    Plausible bugs caught: chosen and rejected swapped in training (pair_logprobs returning them the other way round:
    the margin gain on the training pairs turns negative); the accuracy counting the wrong direction (`<` for `>`)
    or reporting the starting model's scores as the trained model's."""
    from embedkit.llm.data import encode_pairs, read_qa, subsample
    from embedkit.llm.dpo import train_dpo
    from embedkit.llm.model import load_causal_lm
    from embedkit.models import load_model

    folder, _ = sft_folder
    recipe = _recipe(tmp_path, qa_file, folder, "dpo")
    dpo = train_dpo(recipe)
    assert dpo["steps"] == 2
    assert load_model(dpo["output_dir"]).pooling == "lasttoken"
    start, tok, _, _ = load_causal_lm(folder)
    trained, _, _, _ = load_causal_lm(dpo["output_dir"])
    seed = recipe.training.seed
    examples, _ = read_qa(str(qa_file))

    # Training pairs (every pair is trained on: 7 pairs, batches of 4 and 3): DPO's objective is the gain of the
    # policy's margin over the reference's; 2 small steps raise it on average (DPO loss below log 2).
    train_pairs, _ = encode_pairs(tok, preference_pairs(examples, seed=seed)[0], max_length=recipe.model.max_length)
    gains = [a - b for a, b in zip(_pair_margins(trained, train_pairs), _pair_margins(start, train_pairs))]
    assert sum(gains) / len(gains) > 1e-3, gains  # ~ +0.008 nats; the swapped-pairs bug gives ~ -0.008

    # Held-out pairs, drawn as DPOStep draws them (rejected with seed + 1, a seeded random subsample).
    held = subsample(preference_pairs(examples, seed=seed + 1)[0], recipe.data.heldout_examples, "random", seed)
    held, _ = encode_pairs(tok, held, max_length=recipe.model.max_length)
    assert dpo["heldout_preference"]["pairs"] == len(held) == 7
    assert dpo["heldout_preference_accuracy"] == dpo["heldout_preference"]["accuracy_logprob"]
    assert dpo["heldout_preference_accuracy_before"] == dpo["heldout_preference_before"]["accuracy_logprob"]
    for model, key in ((trained, "heldout_preference"), (start, "heldout_preference_before")):
        margins = _pair_margins(model, held)
        accuracy = sum(m > 0 for m in margins) / len(margins)
        assert 0 < accuracy < 1  # both directions occur, so a flipped comparison changes the number
        assert dpo[key]["accuracy_logprob"] == pytest.approx(accuracy, abs=1e-6), key
        assert dpo[key]["margin_logprob"] == pytest.approx(sum(margins) / len(margins), abs=1e-4), key


def test_joint_trains_and_reports_the_dev_ndcg_of_the_saved_folder(tmp_path, qa_file, tiny_llama64_dir):
    """Joint training (QLoRA on the 64-d model: bitsandbytes' CPU 4-bit path; bidirectional embedding attention)
    reports as `dev` the nDCG@10 of the saved folder, which is recomputed here by hand: encode, cosine-rank the
    8 documents, 1 / log2(1 + rank of the one relevant document), averaged.

    Plausible bugs caught: the dev evaluation of the starting model instead of the saved folder (the starting model
    scores differently on this set), queries encoded without their instruction / as documents, or another
    metric reported as the main one (recall@10 is 1.0 here: only 8 documents)."""
    import numpy as np

    from embedkit.llm.joint import train_joint
    from embedkit.models import load_model

    dev = tmp_path / "beir"
    (dev / "qrels").mkdir(parents=True)
    rows = _qa_rows()
    (dev / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": r["focus"], "text": r["positive"]})
                                              + "\n" for i, r in enumerate(rows)))
    (dev / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": r["query"]}) + "\n"
                                               for i, r in enumerate(rows)))
    (dev / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                            "".join(f"q{i}\td{i}\t1\n" for i in range(len(rows))))
    recipe = _recipe(tmp_path, qa_file, tiny_llama64_dir, "joint", adapter={"type": "qlora"},
                     model={"embedding_attention": "bidirectional"}, joint={"sft_weight": 0.5},
                     data={"dev": f"beir:{dev}:test"})
    joint = train_joint(recipe)
    assert joint["steps"] == 2
    encoder = load_model(joint["output_dir"])
    assert encoder.attention == "bidirectional"

    def ndcg_at_10(enc) -> float:
        q = enc.encode([r["query"] for r in rows], kind="query")
        d = enc.encode([f"{r['focus']} {r['positive']}" for r in rows], kind="document")
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        d = d / np.linalg.norm(d, axis=1, keepdims=True)
        sims = q @ d.T
        ranks = [1 + int((sims[i] > sims[i, i]).sum()) for i in range(len(rows))]
        return float(np.mean([1 / math.log2(1 + r) if r <= 10 else 0.0 for r in ranks]))

    expected = ndcg_at_10(encoder)
    assert joint["dev"]["metric"] == "ndcg_at_10"
    assert joint["dev"]["score"] == pytest.approx(expected, abs=1e-4)
    # the starting folder (as a dev evaluation of `model.name` would load it) scores differently: the check can tell
    assert abs(ndcg_at_10(load_model(tiny_llama64_dir)) - expected) > 1e-2


# ---------------------------------------------------------------------------------------------------- config / CLI
def test_recipes_validate_and_errors_name_the_field(tmp_path, qa_file, tiny_llama_dir):
    from embedkit.llm.config import load_llm_recipe

    root = Path(__file__).resolve().parents[1]
    for name, mode in (("smollm2-sft", "sft"), ("smollm2-dpo", "dpo"), ("smollm2-joint", "joint"),
                       ("qwen3-0.6b-joint", "joint")):
        assert load_llm_recipe(root / "recipes" / "llm" / f"{name}.yaml", mode=mode, validate=False).training.output_dir
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model:\n  name: {tiny_llama_dir}\n  max_lenght: 10\ndata:\n  train: {qa_file}\n"
                   f"training:\n  output_dir: {tmp_path}/o\n")
    with pytest.raises(ConfigError) as info:
        load_llm_recipe(bad, mode="sft")
    assert info.value.field == "model.max_lenght" and info.value.line == 3
    good = tmp_path / "good.yaml"
    good.write_text(bad.read_text().replace("  max_lenght: 10\n", ""))
    assert load_llm_recipe(good, mode="sft").model.max_length == 256
    with pytest.raises(ConfigError, match="generative head"):
        load_llm_recipe(good, ["model.name=minilm"], mode="sft")
    with pytest.raises(ConfigError, match="llm joint"):
        load_llm_recipe(good, ["model.embedding_attention=bidirectional"], mode="sft")


def test_cli_pairs_and_check(tmp_path, qa_file, tiny_llama_dir):
    from typer.testing import CliRunner

    from embedkit.cli import app

    runner = CliRunner()
    out = tmp_path / "prefs.jsonl"
    result = runner.invoke(app, ["llm", "pairs", "-i", str(qa_file), "-o", str(out)])
    assert result.exit_code == 0, result.output
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(pairs) == len(_qa_rows()) - 1 and all(p["chosen"] != p["rejected"] for p in pairs)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {tiny_llama_dir}}}\ndata: {{train: {qa_file}}}\n"
                      f"training: {{output_dir: {tmp_path}/o}}\n")
    result = runner.invoke(app, ["llm", "joint", str(recipe), "--check"])
    assert result.exit_code == 0 and "ok (joint" in result.output
    help_text = runner.invoke(app, ["llm", "dpo", "--help"]).output
    assert "same topic" in help_text and "Example" in help_text


def test_export_chat_folder_tokenizes_prompts_without_the_pooling_eos(sft_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from embedkit.llm.generate import export_chat_folder, load_generator

    folder, _ = sft_folder
    out = export_chat_folder(folder, tmp_path / "chat")
    saved = AutoTokenizer.from_pretrained(folder)
    plain = AutoTokenizer.from_pretrained(out)
    assert saved("fever")["input_ids"][-1] == saved.eos_token_id  # the embedding side's tokenizer appends EOS
    assert plain("fever")["input_ids"] == plain("fever", add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "what is asthma?"}]
    text = plain.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert plain(text)["input_ids"] == load_generator(folder).prompt_ids(messages)
    model = AutoModelForCausalLM.from_pretrained(out)
    reference = load_generator(folder).model
    for (name, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(reference.state_dict().items())):
        assert torch.equal(a, b), name
