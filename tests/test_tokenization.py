"""One tokenization path (embedkit.models.tokenization): the torch encoder, the ONNX encoder and the server give the
same token ids for fuzzed texts, and the torch and numpy batches are the same, for a BERT (mean pooling, right
padding, a query prompt) and a causal LM (last-token pooling with EOS appended, left padding, an instruction)."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from embedkit.export.onnx import OnnxEncoder, export_onnx
from embedkit.models import load_model
from embedkit.models.tokenization import (collate, ensure_eos_appended, ensure_pad_token, length_order,
                                          length_sorted_batches, tokenize, tokenize_pairs)
from embedkit.serve.app import CHARS_PER_TOKEN, APIError, _checked_token_ids
from embedkit.serve.backends import OnnxBackend, TorchBackend

MAX_LENGTH = 32  # small, so that "very long" texts are cheap and truncation is exercised often
LLAMA_MAX_LENGTH = 96  # the instruction alone is 59 tokens of the tiny byte-level BPE
_SURROGATES = re.compile("[\ud800-\udfff]")

_WORDS = ("the patient has a fever and a cough diabetes insulin glucose guitar court contract interest rates "
          "asthma children fox dog symptoms fatigue").split()
_PIECES = (
    "高血压的原因是什么", "糖尿病", "東京都", "한국어 문장", "😀", "🙂🙃", "👩‍👩‍👧", "🇫🇷", "e\u0301", "a\u0308\u0323",
    "résumé naïve café", "“quotes” – dash…", "مرحبا بالعالم", "שלום", "Ελληνικά", "ß ẞ ﬁ", "\u00a0", "\u200b",
    "\u200d", "\ufeff", "\t", "\n", "\r\n", "\x00", "\x7f", "[SEP]", "[CLS]", "[PAD]", "<|im_end|>", "<|endoftext|>",
    "<|im_start|>", "query: ", "Ⅻ", "①", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U0010ffff", "\ue000",
)


def _fuzzed_texts(seed: int = 29, n: int = 160) -> list[str]:
    """Seeded: plain words, unicode of every kind mixed in, special-token strings, empty and whitespace-only texts,
    texts far over the max_length in tokens (words, CJK, one long word), and lone UTF-16 surrogates."""
    rng = random.Random(seed)
    texts = ["", " ", "   \n\t ", "\u3000", "a", "[SEP]", "<|im_end|>", " ".join(_WORDS) * 40, "高血压" * 400,
             "x" * 3000, "é" * 1500, "😀" * 700, "supercalifragilistic " * 150, "\ud800", "fever \udfff cough",
             "😀\ud83d", "\udc00" * 3 + " fever"]
    for _ in range(n):
        parts = []
        for _ in range(rng.choice((1, 2, 3, 5, 8, 20, 60))):
            roll = rng.random()
            if roll < 0.5:
                parts.append(rng.choice(_WORDS))
            elif roll < 0.85:
                parts.append(rng.choice(_PIECES))
            elif roll < 0.95:
                parts.append("".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 6))))
            else:
                parts.append(chr(rng.randint(0xD800, 0xDFFF)))  # a lone surrogate: JSON can carry one
        texts.append(rng.choice(("", " ", "\n")).join(parts))
    return texts


def _server_rule(texts: list[str]) -> tuple[list[str], list[str]]:
    """(texts the server tokenises, texts it refuses): a lone surrogate is refused with 400 invalid_text
    (serve.app._check_unicode); a client that replaces it with U+FFFD sends the replaced text instead."""
    accepted, refused = [], []
    for text in texts:
        (refused if _SURROGATES.search(text) else accepted).append(text)
    return accepted + [_SURROGATES.sub("\ufffd", t) for t in refused], refused


@pytest.fixture(scope="module", params=["bert", "llama"])
def model(request, tmp_path_factory, tiny_bert_dir, tiny_llama_dir):
    """(torch Encoder, OnnxEncoder) of one saved and exported tiny model."""
    root = tmp_path_factory.mktemp(f"tok_{request.param}")
    if request.param == "bert":
        source = load_model(tiny_bert_dir, prompts={"query": "query: "}, max_length=MAX_LENGTH)
    else:
        source = load_model(tiny_llama_dir, prompts="instruct", max_length=LLAMA_MAX_LENGTH, padding_side="left")
        assert source.pooling == "lasttoken"
    source.save(root / "model")
    export_onnx(root / "model", root / "onnx")
    return load_model(root / "model"), OnnxEncoder(root / "onnx")


def _server_ids(backend, texts: list[str], kind: str, truncate: bool) -> list[list[int]]:
    """What POST /v1/embeddings tokenises, with the server's default limits."""
    token_limit = backend.max_length
    return _checked_token_ids("m", backend, texts, kind, token_limit, CHARS_PER_TOKEN * token_limit, truncate)


@pytest.mark.parametrize("kind", ["query", "document"])
def test_torch_onnx_and_server_give_the_same_token_ids(model, kind):
    """Bug caught: a path that tokenises on its own (a forgotten prompt, another truncation rule, EOS not appended
    after export, a pad fallback that differs) embeds other tokens than training did: served vectors drift from
    the evaluated ones with no error."""
    encoder, onnx = model
    limit = encoder.max_length
    texts, _ = _server_rule(_fuzzed_texts())
    expected = encoder.token_ids(texts, kind)
    assert max(len(ids) for ids in expected) == limit == onnx.max_length  # the long texts really are truncated
    assert onnx.token_ids(texts, kind) == expected
    for backend in (TorchBackend(encoder), OnnxBackend(onnx)):
        assert backend.token_ids(texts, kind, max_length=limit) == expected
        assert _server_ids(backend, texts, kind, truncate=True) == expected
    # truncate=false: the ids of the texts that fit (in tokens and characters), unchanged; the others are refused
    whole = encoder.token_ids(texts, kind, truncate=False)
    assert onnx.token_ids(texts, kind, truncate=False) == whole
    fits = [t for t, ids in zip(texts, whole) if len(ids) <= limit and len(t) <= CHARS_PER_TOKEN * limit]
    assert 0 < len(fits) < len(texts)
    for backend in (TorchBackend(encoder), OnnxBackend(onnx)):
        assert backend.token_ids(texts, kind) == whole
        assert _server_ids(backend, fits, kind, truncate=False) == encoder.token_ids(fits, kind)
        with pytest.raises(APIError) as refused:
            _server_ids(backend, texts, kind, truncate=False)
        assert refused.value.code == "input_too_long"


def test_the_prompt_and_the_special_tokens_are_where_every_path_expects_them(model):
    """Bug caught: the query prompt applied to documents (or not at all), or truncation that cuts the closing
    special token ([SEP], or the EOS that last-token pooling reads) along with the text's end."""
    encoder, onnx = model
    texts, _ = _server_rule(_fuzzed_texts())
    tok = encoder.tokenizer
    queries, documents = encoder.token_ids(texts, "query"), encoder.token_ids(texts, "document")
    assert queries != documents
    prompt = encoder.prompts["query"]
    assert queries == tokenize(tok, [prompt + t for t in texts], "document", max_length=encoder.max_length)
    last = tok.eos_token_id if encoder.pooling == "lasttoken" else tok.sep_token_id
    assert all(ids and ids[-1] == last for ids in queries + documents)


def test_the_server_refuses_lone_surrogates_and_embeds_their_replacement(model):
    """Bug caught: a lone UTF-16 surrogate (valid in JSON, not in UTF-8) reaching a tokenizer, which raises a 500 or
    embeds something no other path can reproduce; the replaced text (U+FFFD) must tokenise like any other."""
    encoder, onnx = model
    _, refused = _server_rule(_fuzzed_texts())
    assert len(refused) >= 5
    backend = OnnxBackend(onnx)
    for text in refused:
        with pytest.raises(APIError) as error:
            _server_ids(backend, [text], "document", truncate=True)
        assert error.value.code == "invalid_text"
    replaced = [_SURROGATES.sub("\ufffd", t) for t in refused]
    assert _server_ids(backend, replaced, "document", truncate=True) == encoder.token_ids(replaced, "document")


def test_torch_and_numpy_batches_are_equal(model):
    """Bug caught: the torch collate (training, torch serving) and the numpy one (ONNX) padding differently: another
    pad id, the wrong side, or a mask that covers a pad; vectors then differ only inside padded batches."""
    encoder, onnx = model
    texts, _ = _server_rule(_fuzzed_texts())
    ids = encoder.token_ids(texts, "document")
    assert encoder.padding_side == onnx.padding_side == ("left" if encoder.pooling == "lasttoken" else "right")
    for rows in length_sorted_batches(ids, 7):
        batch = [ids[i] for i in rows]
        torch_batch = encoder.collate(batch)
        input_ids, mask = onnx.collate(batch)
        assert np.array_equal(torch_batch["input_ids"].numpy(), input_ids)
        assert np.array_equal(torch_batch["attention_mask"].numpy(), mask)
        assert mask.sum(1).tolist() == [len(x) for x in batch]
        for row, x in enumerate(batch):
            kept = input_ids[row][mask[row] == 1].tolist()
            assert kept == list(x)
            assert (input_ids[row][mask[row] == 0] == onnx.pad_id).all()
            if encoder.padding_side == "left" and len(x):
                assert mask[row, -1] == 1  # the last position is the text's last token (EOS): last-token pooling
            elif len(x):
                assert mask[row, 0] == 1


def test_length_order_is_longest_first_and_stable():
    """Bug caught: a sort that reorders equal lengths differently in the encoders and the server's batcher (the
    order decides which texts share a batch)."""
    ids = [[1], [1, 2, 3], [], [4, 5, 6], [7, 8]]
    assert length_order(ids) == [1, 3, 4, 0, 2]
    assert list(length_sorted_batches(ids, 2)) == [[1, 3], [4, 0], [2]]
    assert collate([], 0, "left", to="numpy")["input_ids"].shape == (0, 0)


def test_collate_refuses_an_unknown_padding_side():
    """Bug caught: a typo ('Left') silently padding on the right, which moves last-token pooling off the EOS."""
    with pytest.raises(ValueError):
        collate([[1]], 0, "Left")
    with pytest.raises(ValueError):
        collate([[1]], 0, "left", to="jax")


def test_pairs_truncate_longest_first_and_never_fail(tiny_bert_dir):
    """Bug caught: 'only_second' truncation raising on a query longer than max_length, or a pair longer than the
    model's positions; token types and their padding must follow the pair template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    long = " ".join(_WORDS) * 20
    queries, documents = ["fever", long, long, "", "高血压"], ["the patient has a fever", "cough", long, "", "😀"]
    ids, types = tokenize_pairs(tok, queries, documents, max_length=MAX_LENGTH)
    assert all(len(x) <= MAX_LENGTH for x in ids) and max(len(x) for x in ids) == MAX_LENGTH
    assert ids[0] == tok("fever", "the patient has a fever")["input_ids"]
    for x, t in zip(ids, types):
        assert x[0] == tok.cls_token_id and x.count(tok.sep_token_id) == 2 and x[-1] == tok.sep_token_id
        assert t == [0] * (x.index(tok.sep_token_id) + 1) + [1] * (len(x) - x.index(tok.sep_token_id) - 1)
    batch = collate(ids, tok.pad_token_id, "right", to="numpy", type_ids=types)
    assert batch["token_type_ids"][batch["attention_mask"] == 0].sum() == 0
    with pytest.raises(ValueError):
        tokenize_pairs(tok, ["a"], [], max_length=MAX_LENGTH)


def test_pad_and_eos_setup_is_idempotent(tiny_llama_dir):
    """Bug caught: a second setup (the ONNX folder's tokenizer was saved already set up) appending EOS twice."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.pad_token = None
    assert ensure_pad_token(tok) == tok.eos_token_id
    ensure_eos_appended(tok)
    once = tokenize(tok, ["fever", ""])
    ensure_eos_appended(tok)
    assert tokenize(tok, ["fever", ""]) == once and once[1] == [tok.eos_token_id]
    assert once[0][-1] == tok.eos_token_id and once[0][-2] != tok.eos_token_id


def test_server_character_precut_keeps_the_tokens(model):
    """Bug caught: the server's character pre-cut of an over-long text (truncate=true) dropping tokens the encoders
    keep: a long whitespace run before the words, or a word split at the cut."""
    encoder, onnx = model
    text = " " * (CHARS_PER_TOKEN * encoder.max_length + 10) + "the patient has a fever"
    words = " ".join(["fever"] * (CHARS_PER_TOKEN * encoder.max_length // 5))  # cut mid-word by characters
    for case in (text, words, "the " + text):
        assert (_server_ids(OnnxBackend(onnx), [case], "document", truncate=True)
                == encoder.token_ids([case], "document")), case[-40:]
