"""GradCache gives the plain loss and the plain parameter gradients."""

from __future__ import annotations

import pytest
import torch

from embedkit.models.encoder import load_model
from embedkit.train.gradcache import cached_step, plain_step
from embedkit.train.losses import InfoNCE, text_keys

QUERIES = ["what causes fever", "how is asthma treated", "insulin and blood sugar", "the guitar on stage",
           "court ruled contract void", "interest rates rose", "the quick brown fox", "symptoms of flu"]
DOCS = ["the patient has a fever and a cough", "how is asthma treated in children",
        "insulin lowers the level of glucose in the blood", "a man is playing a guitar on the stage",
        "the court ruled that the contract was void", "interest rates rose by half a percent this quarter",
        "the quick brown fox jumps over the lazy dog", "symptoms of flu include fever, aches and fatigue"]
NEGATIVES = ["diabetes is a disease of high blood sugar", "what causes high blood pressure in adults"] * 4


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: extra threads only spin-wait (seconds per step on a busy machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _grads(encoder) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}


def _run(encoder, step, *, seed=0, **kwargs):
    encoder.zero_grad(set_to_none=True)
    q_ids = encoder.token_ids(QUERIES, "query")
    d_ids = encoder.token_ids(DOCS + NEGATIVES, "document")
    loss = InfoNCE(temperature=0.05, symmetric=True)
    torch.manual_seed(seed)
    out = step(encoder, loss, q_ids, d_ids, query_keys=text_keys(QUERIES),
               document_keys=text_keys(DOCS + NEGATIVES), **kwargs)
    return out.loss.item(), _grads(encoder)


def _assert_same(a, b, atol=1e-5):
    assert a[0] == pytest.approx(b[0], abs=atol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        assert torch.allclose(a[1][name], b[1][name], atol=atol), name


def test_gradcache_equals_plain_loss_without_dropout(tiny_bert_dir):
    encoder = load_model(tiny_bert_dir)
    encoder.eval()  # no dropout: GradCache must equal the plain whole-batch step
    plain = _run(encoder, plain_step)
    cached = _run(encoder, cached_step, mini_batch=3)  # uneven sub-batches on purpose
    _assert_same(plain, cached)


def test_gradcache_replays_dropout_masks(tiny_bert_dir):
    encoder = load_model(tiny_bert_dir)
    encoder.train()  # dropout on (p = 0.1): the same masks must be used in both passes
    reference = _run(encoder, plain_step, mini_batch=3)  # plain step with the same sub-batching
    cached = _run(encoder, cached_step, mini_batch=3)
    _assert_same(reference, cached)
    # Without the RNG replay the second pass draws other masks and the gradients are wrong.
    unreplayed = _run(encoder, cached_step, mini_batch=3, replay_rng=False)
    name = next(iter(reference[1]))
    assert not all(torch.allclose(reference[1][n], unreplayed[1][n], atol=1e-5) for n in reference[1]), name


def test_gradcache_on_a_causal_encoder(tiny_llama_dir):
    encoder = load_model(tiny_llama_dir, padding_side="left")
    encoder.eval()
    _assert_same(_run(encoder, plain_step), _run(encoder, cached_step, mini_batch=4))


def test_length_sorted_chunks_equal_one_forward(tiny_bert_dir, monkeypatch):
    """The trainer's length-sorted chunked forward gives the one-forward loss and gradients."""
    import embedkit.train.gradcache as gradcache

    # These texts are too short for chunking to pay; force it so that the chunked path is what runs.
    monkeypatch.setattr(gradcache, "CHUNK_MIN_SAVED_TOKENS", 0)
    monkeypatch.setattr(gradcache, "CHUNK_MIN_SAVED_FRACTION", 0.0)
    calls = []
    real = gradcache.embed_length_sorted
    monkeypatch.setattr(gradcache, "embed_length_sorted", lambda *a, **k: calls.append(1) or real(*a, **k))
    encoder = load_model(tiny_bert_dir)
    encoder.eval()
    whole = _run(encoder, plain_step)
    assert not calls
    chunked = _run(encoder, plain_step, length_chunk=3)
    assert len(calls) == 2  # queries and documents
    _assert_same(whole, chunked)


def test_length_sorted_chunks_keep_row_order(tiny_bert_dir):
    from embedkit.train.gradcache import embed_length_sorted

    encoder = load_model(tiny_bert_dir)
    encoder.eval()
    ids = encoder.token_ids(DOCS + NEGATIVES, "document")
    with torch.no_grad():
        expected = encoder(encoder.collate(ids))
        got = embed_length_sorted(encoder, ids, 3)
    assert torch.allclose(expected, got, atol=1e-6)


def test_chunking_only_when_it_removes_much_padding():
    from embedkit.train.gradcache import chunking_saves

    uniform = [[1] * 256] * 32  # nothing to save
    mixed = [[1] * 256] * 8 + [[1] * 40] * 24  # 3 of 4 chunks shrink to 40 tokens
    short = [[1] * 30] * 8 + [[1] * 5] * 24  # a big fraction, but too few tokens to matter
    assert not chunking_saves(uniform, 8)
    assert chunking_saves(mixed, 8)
    assert not chunking_saves(short, 8)
    assert not chunking_saves(mixed[:8], 8)  # a single chunk
