"""The "ivfpq" RAG index (FAISS IVF over product-quantized codes): recall, size, persistence, deletion, refusals.

The corpus is PQ_MIN_DOCUMENTS (9,984) synthetic unit vectors with the low-rank structure of text embeddings (a
16-d latent mixed into 64 dimensions, plus noise), served by a lookup encoder ("doc N" -> vector N), so one index is
built once through `build_index` and searched, saved, loaded and updated through `RagIndex` as `rag` does it."""

from __future__ import annotations

import json

import numpy as np
import pytest

DIM = 64
QUERIES = 200


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((16, DIM))
    return _unit(rng.standard_normal((n, 16)) @ mix + 0.2 * rng.standard_normal((n, DIM)))


class LookupEncoder:
    """Text "doc N" / "query N" -> row N of the document / query vectors (what a model would embed)."""

    name, fingerprint, dim = "lookup", "lookup-64", DIM

    def __init__(self, documents: np.ndarray, queries: np.ndarray) -> None:
        self.rows = {"document": documents, "query": queries}
        self.encoded = 0

    def describe(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "dim": DIM, "normalize": True}

    def encode(self, texts, kind="query", batch_size=32, normalize=True):
        self.encoded += len(texts)
        return self.rows[kind][[int(t.rsplit(" ", 1)[1]) for t in texts]]


@pytest.fixture(scope="module")
def corpus():
    from embedkit.rag.vectors.faiss_store import PQ_MIN_DOCUMENTS

    both = _vectors(PQ_MIN_DOCUMENTS + QUERIES)
    documents, queries = both[:PQ_MIN_DOCUMENTS], both[PQ_MIN_DOCUMENTS:]
    encoder = LookupEncoder(documents, queries)
    docs = {f"d{i}": f"doc {i}" for i in range(len(documents))}
    return encoder, docs, documents, queries


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    """(ivfpq index, flat index) over the same corpus, built once for the module."""
    from embedkit.rag import build_index

    encoder, docs, _, _ = corpus
    root = tmp_path_factory.mktemp("ivfpq")
    return (build_index(encoder, docs, root / "ivfpq", index_type="ivfpq", bm25=False),
            build_index(encoder, docs, root / "flat", index_type="flat", bm25=False))


def _top_ids(index, queries: np.ndarray, k: int = 10) -> list[set[int]]:
    return [set(ids.tolist()) for ids, _ in index.search_vectors(queries, k)]


def _recall(index, exact, queries: np.ndarray) -> float:
    return float(np.mean([len(a & b) / 10 for a, b in zip(_top_ids(index, queries), _top_ids(exact, queries))]))


def test_ivfpq_finds_most_of_exact_searchs_top_10(corpus, built):
    """Bug caught: the probes not applied (FAISS's default nprobe 1 finds far fewer), scores of another metric than
    inner product, or ids shifted against the document store's."""
    _, _, _, queries = corpus
    ivfpq, flat = built
    assert ivfpq.index_type == "ivfpq"
    recall = _recall(ivfpq, flat, queries)
    # 0.563 measured: 16 of 256 lists probed (all 256: 0.58, so the codes, 8 bytes for 64 floats, set the bound
    # here); FAISS's default of 1 probe: 0.22
    assert recall > 0.45, recall
    hits = ivfpq.search(LookupEncoder(*corpus[2:]), "query 0", k=3)
    assert [h.doc_id for h in hits] and all(h.text == f"doc {h.doc_id[1:]}" for h in hits)


def test_ivfpq_index_file_is_a_fraction_of_flats(built):
    """Bug caught: full vectors stored beside the codes (an IVFFlat, or a refine index), which would make ivfpq
    cost flat's memory for less recall; and a manifest that does not say what was built."""
    ivfpq, flat = built
    ratio = (flat.path / "index.faiss").stat().st_size / (ivfpq.path / "index.faiss").stat().st_size
    # 5.8 measured: flat holds 256 + 8 (id) bytes a vector; ivfpq 8 code bytes + an 8-byte id + a 16-byte id -> slot
    # hashtable entry, and 131 KB of centroids and codebooks (64 floats x 256, twice). An IVFFlat would be larger.
    assert ratio > 4, ratio
    manifest = json.loads((ivfpq.path / "embedkit_manifest.json").read_text())["index"]
    assert manifest["type"] == "ivfpq" and manifest["requested_type"] == "ivfpq"
    assert manifest["params"] == {"nlist": 256, "nprobe": 16, "m": 8, "nbits": 8}


def test_ivfpq_round_trip_and_delete(corpus, built):
    """Bug caught: a loaded index whose search parameters or codes differ from the built one's (other results after a
    restart), or a deletion that leaves the vector findable or drops a neighbour."""
    from embedkit.rag import RagIndex

    encoder, _, _, queries = corpus
    ivfpq, _ = built
    before = ivfpq.search_vectors(queries[:20], 10)
    loaded = RagIndex.load(ivfpq.path)
    after = loaded.search_vectors(queries[:20], 10)
    for (ids_a, scores_a), (ids_b, scores_b) in zip(before, after):
        assert ids_a.tolist() == ids_b.tolist()
        np.testing.assert_array_equal(scores_a, scores_b)

    top = [int(ids[0]) for ids, _ in after[:3]]
    assert loaded.delete([f"d{i}" for i in top]) == 3
    reloaded = RagIndex.load(ivfpq.path)
    assert reloaded.manifest["index"]["tombstones"] == 0  # IVF lists drop the vectors: nothing to filter out
    assert reloaded.vectors.ntotal == len(corpus[1]) - 3
    for (ids, _), (ids_now, _) in zip(after[:3], reloaded.search_vectors(queries[:3], 10)):
        assert not set(top) & set(ids_now.tolist())
        assert set(ids.tolist()) - set(top) <= set(ids_now.tolist())  # the others are still found


def test_ivfpq_refuses_a_corpus_too_small_to_train_and_the_milvus_store(tmp_path):
    """Bug caught: FAISS's own failure deep in training (or a codebook trained on a handful of points) after the
    corpus was encoded, instead of one line before; and Milvus building its own per-segment IVF-PQ."""
    from embedkit.errors import ConfigError
    from embedkit.rag import build_index

    vectors = _vectors(100, seed=1)
    encoder = LookupEncoder(vectors, vectors)
    docs = {f"d{i}": f"doc {i}" for i in range(100)}
    with pytest.raises(ConfigError, match=r"ivfpq needs at least 9,984 documents .* not 100: use flat") as err:
        build_index(encoder, docs, tmp_path / "idx", index_type="ivfpq", bm25=False)
    assert err.value.field == "index-type" and not (tmp_path / "idx").exists() and encoder.encoded == 0
    with pytest.raises(ConfigError, match="milvus store builds flat, hnsw indexes, not 'ivfpq'") as err:
        build_index(encoder, docs, tmp_path / "idx", index_type="ivfpq", store="milvus", bm25=False)
    assert err.value.field == "index-type" and not (tmp_path / "idx").exists()
