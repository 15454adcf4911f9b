"""The yes/no LLM reranker (Qwen3-Reranker's formulation, issue #31): its prompt, document-side truncation, left
padding, the score as the two-way softmax of the causal LM, LoRA training through the engine, the saved folder
(embedkit and sentence-transformers' CrossEncoder give the same scores) and the wrong-kind errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embedkit.errors import ConfigError, ModelError
from embedkit.models.rerank_template import (DEFAULT_INSTRUCTION, EMPTY_THINK, SYSTEM_PROMPT, build_template,
                                             pair_token_ids)
from embedkit.models.reranker import RERANK_PROBES_NAME, Reranker, YesNoReranker, check_rerank_probes, load_reranker
from embedkit.train.config import parse_recipe
from test_train_trainer import PAIRS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# SmolLM2's chat template (ChatML, a default system turn when none is given): the chat-template path of the prompt
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen3-Reranker's own code (its model card): the prompt it writes by hand around the pair
QWEN3_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
                "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
MAX_LENGTH = 128
LONG = "the quick brown fox jumps over the lazy dog " * 20  # far beyond MAX_LENGTH: the document is cut
# Negatives unlike every positive: a 2-layer, 32-d random Llama learns to tell them apart in a few steps (it cannot
# learn query-document matching that fast; the bugs below show either way)
NOISE = ["the train to the coast leaves at noon", "she painted the kitchen door green", "a cat slept on the warm roof",
         "the market sells bread and cheese on sunday", "he lost his keys in the snow"]


@pytest.fixture(scope="module")
def yesno_lm(tmp_path_factory) -> Path:
    """A tiny Llama (2 layers, 32-d) whose BPE vocabulary also learnt the reranker prompt's words, "yes" and "no"
    among them (so the prompt is ~80 tokens, not ~230 letters), with SmolLM2's ChatML chat template."""
    from transformers import AutoTokenizer

    from conftest import build_tiny_llama

    folder = tmp_path_factory.mktemp("yesno_lm") / "lm"
    prompt = QWEN3_PREFIX + f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: \n<Document>: " + QWEN3_SUFFIX
    build_tiny_llama(folder, vocab_size=600, extra_texts=(prompt,) * 3)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def yesno(yesno_lm) -> YesNoReranker:
    """The untrained yes/no reranker of the tiny Llama (its logits hardly depend on the pair)."""
    return Reranker.from_pretrained(yesno_lm, max_length=MAX_LENGTH, start=True)


@pytest.fixture(scope="module")
def trained(yesno_lm, tmp_path_factory):
    """`embedkit train`'s yes/no reranker (LoRA r 8, gradient checkpointing) of the tiny Llama: its logits move with
    the document, so padding, prompt or position mistakes show in them."""
    from embedkit.train.rerank import train_reranker

    root = tmp_path_factory.mktemp("trained_yesno")
    recipe = _recipe(yesno_lm, _rows_file(root / "rows.jsonl"), root / "out",
                     adapter={"type": "lora", "r": 8, "alpha": 16}, model={"gradient_checkpointing": True})
    return train_reranker(recipe)


def _rows_file(path: Path, k: int = 3) -> Path:
    rows = [{"query": q, "positive": p, "negatives": [NOISE[(i + j) % len(NOISE)] for j in range(k)]}
            for i, (q, p) in enumerate(PAIRS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(model_name, train, out, **sections):
    raw = {"task": "rerank", "model": {"name": str(model_name), "max_length": MAX_LENGTH},
           "data": {"train": str(train)}, "loss": {"hard_negatives": 3},
           "training": {"output_dir": str(out), "batch_size": 5, "lr": 5e-3, "epochs": 12, "seed": 3,
                        "progress": False, "log_every": 1, "threads": 1, "warmup_ratio": 0.0}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return parse_recipe(raw)


# ---------------------------------------------------------------------------------------------------- the prompt
def test_the_prompt_is_qwen3_rerankers_with_or_without_a_chat_template(yesno):
    """Bug caught: the prompt drifts from Qwen3-Reranker's (a system turn the template adds, the empty think block
    missing or written twice, another label), so a Qwen3-Reranker checkpoint would be scored out of its format."""
    user = f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: q?\n<Document>: d."
    assert yesno.template.source == "chat_template"
    assert yesno.template.text("q?", "d.") == QWEN3_PREFIX + user + QWEN3_SUFFIX
    yesno.tokenizer.chat_template, saved = None, yesno.tokenizer.chat_template
    try:
        fallback = build_template(yesno.tokenizer)
    finally:
        yesno.tokenizer.chat_template = saved
    assert fallback.source == "fallback" and fallback.text("q?", "d.") == yesno.template.text("q?", "d.")
    assert SYSTEM_PROMPT in fallback.head and fallback.tail.endswith(EMPTY_THINK)
    assert yesno.template.with_instruction("Find the law").text("q", "d").count("<Instruct>: Find the law\n") == 1


def test_training_and_scoring_feed_the_model_the_same_ids(yesno):
    """Bug caught: the training step tokenizes pairs another way than score() (the template applied twice, special
    tokens added on one side, another truncation), so the model is evaluated and served on inputs it never saw."""
    from embedkit.data.tuples import TrainingExample
    from embedkit.train.rerank import prepare_pairs

    examples = [TrainingExample(query=q, positive=p, negatives=[LONG, "a"]) for q, p in PAIRS[:3]]
    trained = prepare_pairs(yesno, examples, 2, False)
    seen: list[list[int]] = []
    collate = yesno.collate

    def recording(ids, type_ids=None):
        seen.extend(list(x) for x in ids)
        return collate(ids, type_ids)

    yesno.collate = recording
    try:
        yesno.score([ex.query for ex in examples for _ in range(3)],
                    [d for ex in examples for d in (ex.positive, *ex.negatives)])
    finally:
        del yesno.collate
    flat = [ids for row in trained.ids for ids in row]
    assert sorted(seen) == sorted(flat)
    by_hand = yesno.tokenizer(yesno.template.text(PAIRS[0][0], PAIRS[0][1]), add_special_tokens=False)["input_ids"]
    assert trained.ids[0][0] == by_hand  # one string, no special tokens added: the template holds them


def test_truncation_cuts_the_document_and_keeps_the_query_and_the_template(yesno):
    """Bug caught: a long pair is cut at its end (the opened assistant turn, where the answer is read, is lost) or
    loses its query, or a query longer than the budget is not cut at all."""
    tokenizer, template = yesno.tokenizer, yesno.template
    head_and_query = tokenizer(template.head + "what is diabetes", add_special_tokens=False)["input_ids"]
    tail = tokenizer(template.tail, add_special_tokens=False)["input_ids"]
    ids = yesno.pair_ids(["what is diabetes"], [LONG])[0][0]
    assert len(ids) == MAX_LENGTH and ids[:len(head_and_query)] == head_and_query and ids[-len(tail):] == tail
    assert "what is diabetes" in tokenizer.decode(ids) and "the quick" in tokenizer.decode(ids)
    full = yesno.pair_ids(["what is diabetes"], [LONG], truncate=False)[0][0]
    assert len(full) > MAX_LENGTH
    cut = pair_token_ids(tokenizer, template, [LONG], [LONG], max_length=MAX_LENGTH)[0]
    text = tokenizer.decode(cut)
    # the document is gone (with the space its first token carried), the query cut to the rest, the template whole
    assert len(cut) == MAX_LENGTH and text.endswith("\n<Document>:" + template.tail) and "<Query>: the quick" in text
    with pytest.raises(ModelError) as info:
        YesNoReranker(yesno.backbone, tokenizer, template, max_length=50)
    assert "leaves no room for the pair" in str(info.value) and "\n" not in str(info.value)


def test_a_pair_scores_the_same_alone_and_in_a_left_padded_batch(trained):
    """Bug caught: padding leaks into the logit (right padding reads the answer at a pad; pads attended to), so
    a pair's score depends on its neighbours."""
    yesno = load_reranker(trained.output_dir)
    documents = ["a", "diabetes is a disease of high blood sugar", LONG, NOISE[0]]
    batch = yesno.collate(yesno.pair_ids(["what is diabetes"] * 4, documents)[0])
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"][:, 0] == 0).any()
    together = yesno.score(["what is diabetes"] * 4, documents, batch_size=4, logits=True)
    alone = np.array([yesno.score(["what is diabetes"], [d], logits=True)[0] for d in documents])
    assert np.allclose(together, alone, atol=1e-4)
    assert np.ptp(together) > 0.5  # the trained model tells the noise apart: its logits move with the pair


def test_the_score_is_p_yes_of_the_two_way_softmax_of_the_causal_lm(trained):
    """Bug caught: the logit is read at a pad or at the wrong position, from the wrong tokens ("no" - "yes", " yes"
    with a space), or the score is the sigmoid of logit(yes) alone rather than P(yes) over (no, yes)."""
    from transformers import AutoModelForCausalLM

    yesno = load_reranker(trained.output_dir)
    lm = AutoModelForCausalLM.from_pretrained(trained.output_dir).eval()  # the saved folder is a plain causal LM
    yes, no = (yesno.tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no"))
    queries, documents = ["what is diabetes", "flu symptoms"], ["diabetes is a disease of high blood sugar", NOISE[0]]
    by_hand = []
    for q, d in zip(queries, documents):
        ids = yesno.tokenizer(yesno.template.text(q, d), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            last = lm(ids).logits[0, -1]
        by_hand.append(float(torch.softmax(last[[no, yes]], dim=0)[1]))
    assert np.allclose(yesno.score(queries, documents), by_hand, atol=1e-5)
    assert (yesno.yes_id, yesno.no_id) == (yes, no)


# ---------------------------------------------------------------------------------------------------- the folder
def test_the_saved_folder_scores_the_same_in_embedkit_and_sentence_transformers(trained, tmp_path):
    """Bug caught: the folder sentence-transformers loads renders another prompt (its chat template, with the
    instruction's quotes and braces taken as Jinja), reads other answer tokens, or cuts a long pair elsewhere; or
    embedkit's reload loses the instruction or the max length."""
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer

    queries = ["what is diabetes", "who is playing a guitar", "asthma in children"]
    documents = ["diabetes is a disease of high blood sugar", LONG, NOISE[1]]
    ours = load_reranker(trained.output_dir).score(queries, documents)
    theirs = CrossEncoder(str(trained.output_dir), device="cpu").predict(list(zip(queries, documents)))
    assert np.allclose(ours, np.asarray(theirs), atol=1e-5), (ours, theirs)
    assert np.ptp(ours) > 0.1  # the trained model's scores move with the pair, so another prompt would show

    instruction = 'Find "passages" {{ not jinja }} {% raw %} that answer it \u2014 caf\u00e9'
    reranker = load_reranker(trained.output_dir, instruction=instruction)  # a saved prompt, another instruction
    assert reranker.template.head.endswith(f"<Instruct>: {instruction}\n<Query>: ")
    folder = reranker.save(tmp_path / "saved")
    loaded = load_reranker(folder)
    assert isinstance(loaded, YesNoReranker) and loaded.template == reranker.template
    assert loaded.max_length == MAX_LENGTH and loaded.fingerprint == reranker.fingerprint
    tokenizer = AutoTokenizer.from_pretrained(folder)  # its chat template renders sentence-transformers' messages
    for content in (lambda text: text, lambda text: [{"type": "text", "text": text}]):  # flat and structured
        messages = [{"role": "query", "content": content(queries[0])}, {"role": "document", "content": content("d")}]
        assert tokenizer.apply_chat_template(messages, tokenize=False) == loaded.template.text(queries[0], "d")
    theirs = CrossEncoder(str(folder), device="cpu").predict(list(zip(queries, documents)))
    assert np.allclose(loaded.score(queries, documents), np.asarray(theirs), atol=1e-5)
    assert check_rerank_probes(lambda q, d: loaded.score(q, d, logits=True), folder)["ok"]
    described = json.loads((folder / "embedkit_manifest.json").read_text())["model"]
    assert described["kind"] == "yes-no" and described["instruction"] == instruction


def test_the_wrong_kind_of_model_is_one_line(tiny_llama_dir, yesno_lm, yesno, tmp_path, tiny_bert_dir):
    """Bug caught: a causal LM whose vocabulary splits "yes" trains on the logit of a word piece; a plain causal LM
    given as --rerank scores with an untrained prompt; a yes/no reranker loads as an embedding model; LoRA on a
    cross-encoder start is silently ignored."""
    from embedkit.models import load_model
    from embedkit.train.rerank import build_reranker

    with pytest.raises(ModelError) as info:
        Reranker.from_pretrained(tiny_llama_dir, max_length=MAX_LENGTH, start=True)
    assert "'yes'" in str(info.value) and "single tokens" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ModelError) as info:
        load_reranker(yesno_lm)
    assert "not a reranker" in str(info.value) and "task: rerank" in str(info.value)
    folder = yesno.save(tmp_path / "saved")
    with pytest.raises(ModelError) as info:
        load_model(folder)
    assert "is a reranker" in str(info.value) and "\n" not in str(info.value)
    for sections, field in (({"adapter": {"type": "lora"}}, "adapter.type"),
                            ({"rerank": {"instruction": "Find it"}}, "rerank.instruction")):
        with pytest.raises(ConfigError) as info:
            build_reranker(_recipe(tiny_bert_dir, "x.jsonl", tmp_path / "o", **sections))
        assert field in str(info.value) and "yes/no reranker" in str(info.value)
    with pytest.raises(ConfigError) as info:
        _recipe(yesno_lm, "x.jsonl", tmp_path / "o", adapter={"type": "lora", "save": "adapter"})
    assert "adapter.save" in str(info.value)


# ---------------------------------------------------------------------------------------------------- training
def _margin(reranker: Reranker, rows: list[dict]) -> float:
    """Mean (positive logit - best negative logit) over the rows."""
    margins = []
    for row in rows:
        scores = reranker.score([row["query"]] * 4, [row["positive"], *row["negatives"]], logits=True)
        margins.append(float(scores[0] - scores[1:].max()))
    return float(np.mean(margins))


def test_lora_training_orders_positives_first_and_saves_the_merged_model(trained, yesno_lm):
    """Bug caught: the loss's positive column is not the positive, the adapter gets no gradient through the
    checkpointed layers (nothing learns), or the saved folder holds the base without the merged adapter (its
    scores would be the untrained model's)."""
    rows = [json.loads(line) for line in (trained.output_dir.parent / "rows.jsonl").read_text().splitlines()]
    before = _margin(Reranker.from_pretrained(yesno_lm, max_length=MAX_LENGTH, start=True), rows)
    saved = load_reranker(trained.output_dir)
    after = _margin(saved, rows)
    assert after > before + 1.0, (before, after)
    assert trained.final_loss < trained.first_loss
    assert not saved.has_adapter and not (trained.output_dir / "adapter_config.json").exists()
    manifest = json.loads((trained.output_dir / "embedkit_manifest.json").read_text())
    assert manifest["model"]["kind"] == "yes-no" and manifest["model"]["fingerprint"] == saved.fingerprint
    assert manifest["training"]["recipe"]["adapter"]["type"] == "lora"
    assert check_rerank_probes(lambda q, d: saved.score(q, d, logits=True), trained.output_dir)["ok"]
    assert (trained.output_dir / RERANK_PROBES_NAME).is_file()
    assert "yes/no LLM reranker" in (trained.output_dir / "README.md").read_text()


def test_qlora_training_saves_the_adapter_merged_into_a_full_precision_base(tmp_path):
    """Bug caught: a QLoRA run merges its adapter into the 4-bit base (lossy) or saves the packed 4-bit weights,
    which neither embedkit nor sentence-transformers then loads as the model that was trained."""
    from conftest import build_tiny_llama
    from embedkit.train.rerank import train_reranker

    prompt = QWEN3_PREFIX + f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: \n<Document>: " + QWEN3_SUFFIX
    base = build_tiny_llama(tmp_path / "lm64", hidden=64, vocab_size=600, extra_texts=(prompt,) * 3)  # bnb: >= 64
    recipe = _recipe(base, _rows_file(tmp_path / "rows.jsonl"), tmp_path / "out", adapter={"type": "qlora", "r": 4},
                     training={"epochs": 1, "batch_size": 10})
    result = train_reranker(recipe)
    saved = load_reranker(result.output_dir)
    assert saved.describe()["dtype"] == "float32" and saved.quantization is None and not saved.has_adapter
    config = json.loads((result.output_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert check_rerank_probes(lambda q, d: saved.score(q, d, logits=True), result.output_dir)["ok"]
    assert json.loads((result.output_dir / "embedkit_manifest.json").read_text())["model"]["kind"] == "yes-no"


def test_the_gpu_recipe_estimates_the_memory_of_its_pairs_and_lora_base():
    """Bug caught: --estimate-memory prices a reranker batch as bi-encoder texts (2 + k per row instead of 1 + k
    pairs) or the LoRA recipe's full-precision base as 4-bit weights, or estimates LoRA under ZeRO-3 it does not
    model."""
    from conftest import REPO
    from embedkit.train.config import load_recipe
    from embedkit.train.memory import KNOWN_SHAPES, estimate_recipe_memory, format_estimate

    recipe = load_recipe(REPO / "recipes" / "qwen3-0.6b-rerank.yaml", validate=False)
    shape = KNOWN_SHAPES["Qwen/Qwen3-0.6B"]
    estimate = estimate_recipe_memory(recipe)
    assert estimate["texts_at_once"] == recipe.training.batch_size * (1 + recipe.loss.hard_negatives)
    assert estimate["weights_bytes"] == 4 * shape.parameters  # fp32, the LM head tied to the embeddings
    assert estimate["rerank_logits_bytes"] == 2 * estimate["texts_at_once"] * shape.vocab * 4
    assert "128 pairs x 512 tokens" in format_estimate(estimate)
    with pytest.raises(ConfigError) as info:
        estimate_recipe_memory(recipe.with_overrides(["deepspeed.stage=zero3"]), processes=2)
    assert "deepspeed.stage" in str(info.value) and "\n" not in str(info.value)


def test_dev_evaluation_reranks_the_first_stages_candidates(yesno_lm, st_bert, tmp_path):
    """Bug caught: the dev evaluation of a reranker run fails (DevReranking had lost its evaluate method: any recipe
    with data.dev crashed at its first evaluation) or reports the first stage's metrics as the reranker's."""
    from embedkit.train.rerank import train_reranker
    from test_tune import write_beir

    beir = write_beir(tmp_path / "beir", split="dev")
    recipe = _recipe(yesno_lm, _rows_file(tmp_path / "rows.jsonl"), tmp_path / "out",
                     adapter={"type": "lora", "r": 4}, training={"epochs": 1, "batch_size": 10},
                     data={"dev": f"beir:{beir}:dev"}, rerank={"first_stage": str(st_bert), "top_k": 5})
    result = train_reranker(recipe)
    assert result.dev["main_metric"] == "ndcg_at_10" and 0.0 <= result.dev["score"] <= 1.0
    assert result.dev["first_stage"]["model"] == str(st_bert) and len(result.dev["per_query"]) == 15


def test_the_served_yes_no_reranker_scores_like_reranker_score(trained):
    """Bug caught: `embedkit serve --rerank` tokenized a yes/no reranker's pairs as a cross-encoder's (query and
    document without the prompt): its start-up probe check refused the folder, and had it been skipped the served
    scores would be those of another input. The served scores must be `Reranker.score`'s, the long document cut
    inside the prompt as in training."""
    from fastapi.testclient import TestClient

    from embedkit.serve.app import ServeSettings, create_app
    from embedkit.serve.server import load_rerankers

    yesno = load_reranker(trained.output_dir)
    documents = ["diabetes is a disease of high blood sugar", NOISE[0], LONG, "a"]
    expected = yesno.score(["what is diabetes"] * len(documents), documents)
    rerankers = load_rerankers([f"yn={trained.output_dir}"])  # probe-checked, as `serve --rerank` loads it
    app = create_app({}, ServeSettings(), rerankers=rerankers)
    with TestClient(app) as client:
        response = client.post("/v1/rerank", json={"model": "yn", "query": "what is diabetes",
                                                    "documents": documents})
    assert response.status_code == 200, response.text
    scores = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
    assert np.allclose([scores[i] for i in range(len(documents))], expected, atol=1e-5)
    assert np.ptp(expected) > 0.05  # the documents score differently: a swapped result would show
