"""Row reuse in the corpus embedding cache (embedkit.eval.rowcache): a corpus that misses the cache copies the vectors
of the texts an earlier entry of the same model key holds and encodes only the others, in eval's encode_cached and in
mine's streamed corpus_vectors. Fake encoders that record every text they are asked to encode."""

from __future__ import annotations

import logging
import os
import zlib

import numpy as np
import pytest

import embedkit.eval.runner as runner
import embedkit.mine.cache as mine_cache
from embedkit.eval.rowcache import SIDECAR_SUFFIX, sidecar_path, text_digests
from embedkit.eval.runner import embedding_cache_path, embedding_model_tag, encode_cached
from embedkit.mine.cache import corpus_vectors


class RecordingEncoder:
    """Deterministic bag-of-words vectors (a fixed random vector per word); `encoded` lists every text it encoded,
    per kind. `max_length` and `dim` are part of describe() (the model key); `fingerprint` can be pinned so that
    two encoders share a model key while their vectors differ in width."""

    def __init__(self, dim: int = 16, max_length: int = 64, fingerprint: str = "recording-fake") -> None:
        self.dim, self.max_length, self.fingerprint = dim, max_length, fingerprint
        self.encoded: dict[str, list[str]] = {"query": [], "document": []}
        self.calls: list[int] = []

    def describe(self) -> dict:
        return {"name": "recording", "fingerprint": self.fingerprint, "prompts": {}, "pooling": "mean",
                "max_length": self.max_length, "dtype": "float32", "dim": self.dim}

    def encode(self, texts, kind="query", batch_size=32, normalize=True, show_progress=None):
        texts = list(texts)
        assert texts, "the encoder was called with no texts"
        self.encoded[kind].extend(texts)
        self.calls.append(len(texts))
        out = np.zeros((len(texts), self.dim))
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i] += np.random.default_rng(zlib.crc32(word.encode())).standard_normal(self.dim)
            out[i, 0] += 0.5  # no all-zero vector for an empty text
        if normalize:
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out.astype(np.float32)


WORDS = ["fever", "cough", "insulin", "glucose", "guitar", "contract", "interest", "asthma", "fox", "flu", "river",
         "planet", "coffee", "soccer", "winter", "robot", "garden", "ocean", "violin", "desert"]


def corpus(n: int, start: int = 0, prefix: str = "doc") -> tuple[list[str], list[str]]:
    texts = [f"{WORDS[i % len(WORDS)]} {WORDS[(3 * i + 1) % len(WORDS)]} note {i}" for i in range(start, start + n)]
    return [f"{prefix}{i}" for i in range(start, start + n)], texts


def fresh(texts: list[str], **kwargs) -> np.ndarray:
    return RecordingEncoder(**kwargs).encode(texts, kind="document")


def entries(cache) -> list:
    return sorted((cache / "embeddings").glob("*.npy"))


def read_all(source) -> np.ndarray:
    return np.concatenate([chunk.copy() for _, chunk in source.chunks(7)])


def test_eval_corpus_with_added_documents_encodes_only_the_new_texts(tmp_path, caplog):
    """Bug caught: a corpus that differs from a cached one by a few added documents missed the cache and was
    re-encoded whole (and a reuse that copies rows into the wrong places, or from the ids rather than the texts,
    gives vectors that differ from a fresh encode)."""
    cache = tmp_path / "cache"
    ids, texts = corpus(30)
    encode_cached(RecordingEncoder(), ids, texts, kind="document", batch_size=8, cache_dir=cache, use_cache=True)
    # The new corpus: the old documents in another order under other ids, with 5 new ones spread among them.
    new_ids, new_texts = corpus(5, start=100)
    order = np.random.default_rng(0).permutation(30)
    ids2 = [f"renamed-{ids[i]}" for i in order]
    texts2 = [texts[i] for i in order]
    for k, (i, t) in enumerate(zip(new_ids, new_texts)):
        ids2.insert(6 * k, i)
        texts2.insert(6 * k, t)
    enc = RecordingEncoder()
    with caplog.at_level(logging.INFO, logger="embedkit"):
        vectors, cached = encode_cached(enc, ids2, texts2, kind="document", batch_size=8, cache_dir=cache,
                                        use_cache=True, progress=True)
    assert cached is False
    assert sorted(enc.encoded["document"]) == sorted(new_texts) and len(enc.calls) == 1  # one encode call
    assert vectors.dtype == np.float32 and vectors.shape == (35, 16)
    np.testing.assert_allclose(vectors, fresh(texts2), atol=1e-6)
    assert "reused 30 of 35 vectors from cached entries; encoding 5" in caplog.text
    # The new entry is written as before (same path, same format) with its sidecar, and is an exact hit next time.
    path = embedding_cache_path(cache, enc, ids2, texts2, "document")
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), vectors)
    assert sidecar_path(path, embedding_model_tag(enc, "document")).is_file()
    assert len(entries(cache)) == 2  # sidecars are not *.npy: the glob still lists entries only
    again = RecordingEncoder()
    hit, cached = encode_cached(again, ids2, texts2, kind="document", batch_size=8, cache_dir=cache, use_cache=True)
    assert cached and again.calls == [] and np.array_equal(hit, vectors)


def test_eval_corpus_of_known_texts_only_encodes_nothing(tmp_path):
    """Bug caught: a corpus made entirely of cached texts (a subset, with duplicates) still called the encoder
    (with an empty list, which real encoders reject) instead of copying every row."""
    cache = tmp_path / "cache"
    ids, texts = corpus(12)
    encode_cached(RecordingEncoder(), ids, texts, kind="document", batch_size=8, cache_dir=cache, use_cache=True)
    sub = [texts[3], texts[0], texts[3], texts[11]]
    enc = RecordingEncoder()
    vectors, cached = encode_cached(enc, ["a", "b", "c", "d"], sub, kind="document", batch_size=8, cache_dir=cache,
                                    use_cache=True)
    assert not cached and enc.calls == []
    np.testing.assert_allclose(vectors, fresh(sub), atol=1e-6)


def test_mine_streamed_corpus_reuses_rows_across_chunk_boundaries(tmp_path, monkeypatch):
    """Bug caught: mine's chunked writer (ENCODE_CHUNK texts at a time) re-encoded a corpus with a few documents
    added, or reuse copied a found row into the wrong chunk or the wrong place inside one, or called the encoder for
    a chunk that was all reused."""
    monkeypatch.setattr(mine_cache, "ENCODE_CHUNK", 4)
    cache = tmp_path / "cache"
    ids, texts = corpus(10)
    with corpus_vectors(RecordingEncoder(), ids, texts, cache_dir=cache) as (_, info):
        assert info["cached"] is False
    # Chunks of 4: [new, 0, 1, 2] [3, 4, 5, 6] [7, new, 8, 9] [new]: the second chunk is all reused.
    new_ids, new_texts = corpus(3, start=50)
    ids2 = [new_ids[0], *ids[:8], new_ids[1], *ids[8:], new_ids[2]]
    texts2 = [new_texts[0], *texts[:8], new_texts[1], *texts[8:], new_texts[2]]
    enc = RecordingEncoder()
    with corpus_vectors(enc, ids2, texts2, cache_dir=cache) as (source, info):
        assert info["cached"] is False and source.n == 13
        vectors = read_all(source)
    assert enc.encoded["document"] == new_texts
    assert enc.calls == [1, 1, 1]  # one call per chunk that has new texts, each within its chunk
    np.testing.assert_allclose(vectors, fresh(texts2), atol=1e-6)
    # Entry and sidecar as eval writes them: eval finds mine's entry as an exact hit.
    again = RecordingEncoder()
    hit, cached = encode_cached(again, ids2, texts2, kind="document", batch_size=8, cache_dir=cache, use_cache=True)
    assert cached and again.calls == [] and np.array_equal(hit, vectors)


def test_mine_reuses_rows_of_an_eval_entry_and_eval_of_a_mine_entry(tmp_path, monkeypatch):
    """Bug caught: the two writers of the shared cache (eval's encode_cached, mine's corpus_vectors) named or
    formatted their row digests differently, so synth's round-trip entry (mine) did not help a later eval, or
    an eval's entry a later mine."""
    monkeypatch.setattr(mine_cache, "ENCODE_CHUNK", 5)
    cache = tmp_path / "cache"
    ids, texts = corpus(8)
    encode_cached(RecordingEncoder(), ids, texts, kind="document", batch_size=8, cache_dir=cache, use_cache=True)
    more_ids, more_texts = corpus(2, start=20)
    enc = RecordingEncoder()
    with corpus_vectors(enc, ids + more_ids, texts + more_texts, cache_dir=cache) as (source, _):
        mined = read_all(source)
    assert enc.encoded["document"] == more_texts
    np.testing.assert_allclose(mined, fresh(texts + more_texts), atol=1e-6)
    last_ids, last_texts = corpus(1, start=40)
    enc = RecordingEncoder()
    vectors, _ = encode_cached(enc, more_ids + last_ids, more_texts + last_texts, kind="document", batch_size=8,
                               cache_dir=cache, use_cache=True)
    assert enc.encoded["document"] == last_texts
    np.testing.assert_allclose(vectors, fresh(more_texts + last_texts), atol=1e-6)


@pytest.mark.parametrize("other", ["max_length", "kind", "fingerprint"])
def test_another_model_key_never_reuses(tmp_path, monkeypatch, other):
    """Bug caught: rows were looked up by text alone, so a model with another max length, another fingerprint, or
    the query side of the same model (other prompts) would copy vectors encoded differently."""
    monkeypatch.setattr(mine_cache, "ENCODE_CHUNK", 4)
    ids, texts = corpus(10)
    for cache in (tmp_path / "eval", tmp_path / "mine"):  # each holds the document entry of the first model alone
        encode_cached(RecordingEncoder(), ids, texts, kind="document", batch_size=8, cache_dir=cache, use_cache=True)
    ids2, texts2 = ids + ["extra"], texts + ["an extra document"]
    kind = "query" if other == "kind" else "document"
    kwargs = {"max_length": 32} if other == "max_length" else {"fingerprint": "other"} if other == "fingerprint" else {}
    enc = RecordingEncoder(**kwargs)
    _, cached = encode_cached(enc, ids2, texts2, kind=kind, batch_size=8, cache_dir=tmp_path / "eval",
                              use_cache=True)
    assert not cached and sorted(enc.encoded[kind]) == sorted(texts2)
    if kind == "document":  # mine's path too (documents only)
        enc = RecordingEncoder(**kwargs)
        with corpus_vectors(enc, ids2, texts2, cache_dir=tmp_path / "mine"):
            pass
        assert sorted(enc.encoded["document"]) == sorted(texts2)


def _damage(path, how: str) -> None:
    if how == "truncated entry":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 100)
    elif how == "entry not float32":
        wide = np.load(path).astype(np.float64)
        np.save(open(path, "wb"), wide, allow_pickle=False)
    elif how == "entry missing":
        path.unlink()
    else:
        sidecar = next(path.parent.glob(f"{path.stem}.*{SIDECAR_SUFFIX}"))
        if how == "sidecar with fewer rows":
            fewer = np.load(sidecar)[:-1]
            np.save(open(sidecar, "wb"), fewer, allow_pickle=False)
        elif how == "sidecar not a .npy":
            sidecar.write_bytes(b"garbage")
        elif how == "sidecar of pickled objects":
            np.save(open(sidecar, "wb"), np.array([{"a": 1}], dtype=object), allow_pickle=True)


DAMAGES = ["truncated entry", "entry not float32", "entry missing", "sidecar with fewer rows", "sidecar not a .npy",
           "sidecar of pickled objects"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_candidate_is_skipped(tmp_path, monkeypatch, how):
    """Bug caught: a damaged earlier entry (cut short by a full disk, its sidecar out of step with it, a file that
    is not what it should be) crashed the run or had garbage rows copied from it, instead of being skipped."""
    monkeypatch.setattr(mine_cache, "ENCODE_CHUNK", 4)
    cache = tmp_path / "cache"
    ids, texts = corpus(10)
    encode_cached(RecordingEncoder(), ids, texts, kind="document", batch_size=8, cache_dir=cache, use_cache=True)
    _damage(entries(cache)[0], how)
    ids2, texts2 = ids + ["extra"], texts + ["an extra document"]
    enc = RecordingEncoder()
    vectors, cached = encode_cached(enc, ids2, texts2, kind="document", batch_size=8, cache_dir=cache, use_cache=True)
    assert not cached and sorted(enc.encoded["document"]) == sorted(texts2)
    np.testing.assert_allclose(vectors, fresh(texts2), atol=1e-6)
    enc = RecordingEncoder()
    with corpus_vectors(enc, ids + ["y"], texts + ["yet another"], cache_dir=cache) as (source, _):
        mined = read_all(source)
    # The eval entry just written (sound) is now a candidate for everything but the new text.
    assert enc.encoded["document"] == ["yet another"]
    np.testing.assert_allclose(mined, fresh(texts + ["yet another"]), atol=1e-6)


def test_damaged_newer_candidate_falls_back_to_an_older_sound_one(tmp_path):
    """Bug caught: one damaged candidate ended the search, so the rows an older sound entry holds were encoded."""
    cache = tmp_path / "cache"
    ids, texts = corpus(10)
    encode_cached(RecordingEncoder(), ids, texts, kind="document", batch_size=8, cache_dir=cache, use_cache=True)
    older = entries(cache)[0]
    encode_cached(RecordingEncoder(), ids[:6], texts[:6], kind="document", batch_size=8, cache_dir=cache,
                  use_cache=True)
    newer = next(p for p in entries(cache) if p != older)
    tag = embedding_model_tag(RecordingEncoder(), "document")
    os.utime(sidecar_path(older, tag), (1, 1))  # make the order unambiguous
    _damage(newer, "truncated entry")
    enc = RecordingEncoder()
    vectors, _ = encode_cached(enc, ids + ["n"], texts + ["new one"], kind="document", batch_size=8,
                               cache_dir=cache, use_cache=True)
    assert enc.encoded["document"] == ["new one"]
    np.testing.assert_allclose(vectors, fresh(texts + ["new one"]), atol=1e-6)


def test_candidate_of_another_width_falls_back_to_a_full_encode(tmp_path, monkeypatch):
    """Bug caught: an entry whose vectors are not the encoder's width (same key, e.g. a file put there by hand)
    was stitched together with fresh vectors, or the run failed, instead of encoding the corpus whole."""
    monkeypatch.setattr(mine_cache, "ENCODE_CHUNK", 4)
    cache = tmp_path / "cache"
    ids, texts = corpus(10)
    encode_cached(RecordingEncoder(dim=8), ids, texts, kind="document", batch_size=8, cache_dir=cache,
                  use_cache=True)
    enc = RecordingEncoder(dim=16)  # same fingerprint and describe() but for dim: same model key
    vectors, _ = encode_cached(enc, ids + ["n"], texts + ["new one"], kind="document", batch_size=8,
                               cache_dir=cache, use_cache=True)
    assert vectors.shape == (11, 16)
    np.testing.assert_allclose(vectors, fresh(texts + ["new one"]), atol=1e-6)
    cache2 = tmp_path / "cache2"
    with corpus_vectors(RecordingEncoder(dim=8), ids, texts, cache_dir=cache2):
        pass
    with corpus_vectors(RecordingEncoder(dim=16), ids + ["n"], texts + ["new one"], cache_dir=cache2) as (src, _):
        assert src.dim == 16
        np.testing.assert_allclose(read_all(src), fresh(texts + ["new one"]), atol=1e-6)


def test_exact_hit_is_unchanged_and_writes_nothing(tmp_path, monkeypatch):
    """Bug caught: the exact-hit path computed digests, looked for candidates or rewrote the entry or its sidecar;
    a hit must read the entry alone, as before row reuse."""
    cache = tmp_path / "cache"
    ids, texts = corpus(9)
    first, _ = encode_cached(RecordingEncoder(), ids, texts, kind="document", batch_size=8, cache_dir=cache,
                             use_cache=True)
    files = sorted((cache / "embeddings").iterdir())
    assert sorted(p.suffix for p in files) == [".npy", SIDECAR_SUFFIX]
    stamps = [p.stat().st_mtime_ns for p in files]

    def untouched(*args, **kwargs):
        raise AssertionError("row reuse ran on an exact hit")

    monkeypatch.setattr(runner, "plan_row_reuse", untouched)
    monkeypatch.setattr(mine_cache, "plan_row_reuse", untouched)
    monkeypatch.setattr(runner, "write_row_digests", untouched)
    monkeypatch.setattr(mine_cache, "write_row_digests", untouched)
    enc = RecordingEncoder()
    hit, cached = encode_cached(enc, ids, texts, kind="document", batch_size=8, cache_dir=cache, use_cache=True)
    assert cached and enc.calls == [] and np.array_equal(hit, first)
    with corpus_vectors(enc, ids, texts, cache_dir=cache) as (source, info):
        assert info["cached"] is True and np.array_equal(read_all(source), first)
    assert enc.calls == []
    assert sorted((cache / "embeddings").iterdir()) == files
    assert [p.stat().st_mtime_ns for p in files] == stamps


def test_sidecar_holds_one_text_digest_per_row(tmp_path):
    """Bug caught: the sidecar held digests of ids (which do not change a vector) or was pickled; it must be a
    plain uint64 .npy of the texts' digests, row for row, named after the model key."""
    cache = tmp_path / "cache"
    ids, texts = corpus(6)
    enc = RecordingEncoder()
    encode_cached(enc, ids, texts, kind="document", batch_size=8, cache_dir=cache, use_cache=True)
    path = embedding_cache_path(cache, enc, ids, texts, "document")
    sidecar = sidecar_path(path, embedding_model_tag(enc, "document"))
    with open(sidecar, "rb") as f:
        digests = np.load(f, allow_pickle=False)
    assert digests.dtype == np.uint64 and np.array_equal(digests, text_digests(texts))
    assert sidecar.name == f"{path.stem}.{embedding_model_tag(enc, 'document')}.rows"
    assert embedding_model_tag(enc, "document") != embedding_model_tag(enc, "query")


def test_no_reuse_under_sharded_encoding_or_without_the_cache(tmp_path, monkeypatch):
    """Bug caught: under sharded encoding (every process must encode the same texts, in the same calls) a rank
    that found rows encoded fewer texts than its peers and hung the collective; and use_cache=False read the
    cache's rows."""
    cache = tmp_path / "cache"
    ids, texts = corpus(10)
    encode_cached(RecordingEncoder(), ids, texts, kind="document", batch_size=8, cache_dir=cache, use_cache=True)
    enc = RecordingEncoder()
    encode_cached(enc, ids + ["n"], texts + ["new one"], kind="document", batch_size=8, cache_dir=cache,
                  use_cache=False)
    assert len(enc.encoded["document"]) == 11
    enc = RecordingEncoder()
    with corpus_vectors(enc, ids + ["n"], texts + ["new one"], cache_dir=cache, use_cache=False):
        pass
    assert len(enc.encoded["document"]) == 11
    monkeypatch.setattr(runner, "encodes_sharded", lambda encoder: True)
    enc = RecordingEncoder()
    encode_cached(enc, ids + ["n"], texts + ["new one"], kind="document", batch_size=8, cache_dir=cache,
                  use_cache=True)
    assert len(enc.encoded["document"]) == 11
    enc = RecordingEncoder()
    with corpus_vectors(enc, ids + ["m"], texts + ["one more"], cache_dir=cache):
        pass
    assert len(enc.encoded["document"]) == 11
