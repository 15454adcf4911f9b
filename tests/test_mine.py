"""Unit tests of embedkit.mine: filters by hand-made scores, positives never negatives, short queries reported,
seeds, chunk independence, caching, precomputed embeddings, re-mining, one-line errors. Fake encoders only."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from embedkit.data import TrainingExample, read_examples
from embedkit.errors import ConfigError, DataError, EmbedkitError
from embedkit.mine import (
    ArraySource,
    MiningSettings,
    MiningStats,
    NpyFileSource,
    RemineState,
    load_task,
    mine_embeddings,
    mine_to_file,
    parse_range,
    remine,
    task_from_pairs,
)
from embedkit.mine.filters import apply_filters, positive_mask, sample_negatives
from embedkit.mine.search import exact_topk, gather_rows, max_similarity_to_groups, merge_topk


# ---------------------------------------------------------------------------------------------- helpers
class FakeEncoder:
    """Deterministic bag-of-words encoder: each word has a fixed random vector (seeded by crc32 of the word).

    `table` overrides the vector of whole texts, which lets a test set exact scores. `shift` changes every vector
    (a stand-in for training steps) and the fingerprint with it.
    """

    def __init__(self, dim: int = 16, table: dict[str, np.ndarray] | None = None, shift: float = 0.0) -> None:
        self.dim = dim
        self.table = table or {}
        self.shift = shift
        self.calls: list[tuple[str, int]] = []

    @property
    def fingerprint(self) -> str:
        return f"fake-{self.dim}-{self.shift}-{len(self.table)}"

    def describe(self) -> dict:
        return {"name": "fake", "fingerprint": self.fingerprint, "prompts": {}, "pooling": "mean", "max_length": 64,
                "dtype": "float32", "dim": self.dim}

    def _vector(self, text: str) -> np.ndarray:
        if text in self.table:
            return np.asarray(self.table[text], dtype=np.float64)
        v = np.zeros(self.dim)
        for word in text.lower().split():
            v += np.random.default_rng(zlib.crc32(word.encode())).standard_normal(self.dim)
        v[0] += self.shift
        return v

    def encode(self, texts, kind="document", batch_size=32, normalize=True, show_progress=None):
        texts = list(texts)
        self.calls.append((kind, len(texts)))
        out = np.array([self._vector(t) for t in texts], dtype=np.float64).reshape(len(texts), self.dim)
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32)


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def with_score(score: float, axis: int, dim: int = 32) -> np.ndarray:
    """A unit vector whose inner product with e0 is `score`, and orthogonal to the other test vectors' axes."""
    v = np.zeros(dim)
    v[0] = score
    v[axis] = np.sqrt(1 - score**2)
    return v


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_all(queries, corpus, ptr, idx, settings):
    stats = MiningStats()
    blocks = list(mine_embeddings(queries, len(ptr) - 1, ArraySource(corpus), ptr, idx, settings, stats=stats))
    negatives = [n for b in blocks for n in b.negatives]
    scores = [s for b in blocks for s in b.negative_scores]
    return negatives, scores, stats


SETTINGS_OFF = dict(relative_margin=None, absolute_margin=None, duplicate_threshold=None)


# ---------------------------------------------------------------------------------------------- settings
def test_parse_range_and_settings_errors_are_one_line():
    assert parse_range("10:100") == (10, 100)
    assert parse_range(":50") == (0, 50)
    for bad in ("10-100", "a:b", "10"):
        with pytest.raises(ConfigError) as info:
            parse_range(bad)
        assert "range" in str(info.value) and "\n" not in str(info.value)
    cases = [
        (dict(range_min=50, range_max=50), "range"),
        (dict(range_min=0, range_max=3, num_negatives=5), "num_negatives"),
        (dict(sampling="best"), "sampling"),
        (dict(relative_margin=1.5), "relative_margin"),
        (dict(absolute_margin=-0.1), "absolute_margin"),
        (dict(max_score=float("nan")), "max_score"),
        (dict(seed=-1), "seed"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ConfigError) as info:
            MiningSettings(**kwargs)
        assert info.value.field == field and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- filters by hand
def test_margin_filters_remove_exactly_the_candidates_above_the_threshold():
    pos = np.array([0.8, -0.2])
    scores = np.array([
        [0.95, 0.7600, 0.7501, 0.7499, 0.7300, 0.7100, 0.50, -np.inf],
        [0.10, -0.150, -0.249, -0.251, -0.300, -0.310, -0.40, -0.90],
    ])
    idx = np.array([[1, 2, 3, 4, 5, 6, 7, -1], [1, 2, 3, 4, 5, 6, 7, 8]])
    none = np.zeros(idx.shape, dtype=bool)

    # absolute only: remove score > pos - 0.05 (0.75 / -0.25)
    out = apply_filters(idx, scores, pos, none, MiningSettings(range_min=0, range_max=8, **{
        **SETTINGS_OFF, "absolute_margin": 0.05}))
    assert out.candidates == 15  # the -1 slot is not a candidate
    kept = [list(idx[r][out.alive[r]]) for r in range(2)]
    assert kept == [[4, 5, 6, 7], [4, 5, 6, 7, 8]]
    assert out.removed == {"known_positive": 0, "absolute_margin": 6}

    # relative only, 10%: threshold pos - |pos| * 0.1 = 0.72 and -0.22 (pos * 0.9 would be -0.18 for row 2)
    out = apply_filters(idx, scores, pos, none, MiningSettings(range_min=0, range_max=8, **{
        **SETTINGS_OFF, "relative_margin": 0.1}))
    kept = [list(idx[r][out.alive[r]]) for r in range(2)]
    assert kept == [[6, 7], [3, 4, 5, 6, 7, 8]]
    assert out.removed["relative_margin"] == 5 + 2

    # both, plus max/min score: each candidate counted once, under the first filter (absolute before relative)
    settings = MiningSettings(range_min=0, range_max=8, absolute_margin=0.05, relative_margin=0.1, max_score=0.9,
                              min_score=-0.35, duplicate_threshold=None)
    out = apply_filters(idx, scores, pos, none, settings)
    assert out.removed == {"known_positive": 0, "absolute_margin": 6, "relative_margin": 2, "max_score": 0,
                           "min_score": 2}
    assert sum(out.removed.values()) + int(out.alive.sum()) == out.candidates
    assert [list(idx[r][out.alive[r]]) for r in range(2)] == [[6, 7], [4, 5, 6]]


def test_known_positive_and_duplicate_masks_come_first():
    idx = np.array([[5, 9, 2, 7]])
    scores = np.array([[0.1, 0.1, 0.1, 0.1]])
    is_pos = positive_mask(idx, np.array([0, 2]), np.array([9, 7]), n_docs=10)
    assert is_pos.tolist() == [[False, True, False, True]]
    dup = np.array([[0.99, 1.0, 0.5, 0.2]])
    out = apply_filters(idx, scores, np.array([0.9]), is_pos, MiningSettings(range_min=0, range_max=4), dup)
    assert out.removed["known_positive"] == 2 and out.removed["near_duplicate"] == 1
    assert idx[out.alive].tolist() == [2]


def test_sampling_top_random_and_seed():
    alive = np.zeros((3, 20), dtype=bool)
    alive[0, [1, 4, 6, 9, 12, 15]] = True
    alive[1, [0, 2]] = True  # short
    alive[2, :] = True
    top = sample_negatives(alive, MiningSettings(range_min=0, range_max=20, num_negatives=3, sampling="top"),
                           np.arange(3))
    assert [list(c) for c in top] == [[1, 4, 6], [0, 2], [0, 1, 2]]
    s = MiningSettings(range_min=0, range_max=20, num_negatives=3, sampling="random", seed=7)
    a, b = sample_negatives(alive, s, np.arange(3)), sample_negatives(alive, s, np.arange(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(set(c) <= set(np.flatnonzero(row)) for c, row in zip(a, alive))
    assert all(list(c) == sorted(c) for c in a)
    draws = {tuple(sample_negatives(alive, MiningSettings(range_min=0, range_max=20, num_negatives=3, seed=seed),
                                    np.arange(3))[2]) for seed in range(10)}
    assert len(draws) > 5  # different seeds draw differently


# ---------------------------------------------------------------------------------------------- search
def test_exact_topk_streamed_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    corpus = unit(rng, 103, 8)
    corpus[50] = corpus[7]  # a tie: the lower index must come first, whatever the chunking
    queries = unit(rng, 11, 8)
    queries[0] = corpus[7]
    full = queries @ corpus.T
    expected = np.lexsort((np.tile(np.arange(103), (11, 1)), -full.astype(np.float64)), axis=-1)[:, :20]
    for chunk in (1, 7, 50, 1000):
        s, i = exact_topk(queries, ArraySource(corpus), 20, chunk)
        assert np.array_equal(i, expected), chunk
        assert np.allclose(s, np.take_along_axis(full, expected, 1), atol=1e-5)
    assert list(exact_topk(queries, ArraySource(corpus), 20, 7)[1][0, :2]) == [7, 50]
    s, i = exact_topk(queries, ArraySource(corpus[:5]), 8, 2)  # fewer documents than k: padded with -1
    assert (i[:, 5:] == -1).all() and np.isneginf(s[:, 5:]).all()
    ms, mi = merge_topk(np.array([[0.5, -np.inf]]), np.array([[3, -1]]), np.array([[0.5, 0.9]]),
                        np.array([[1, 2]]), 3)
    assert mi.tolist() == [[2, 1, 3]]


def test_npy_file_source_gather_and_group_similarity(tmp_path):
    rng = np.random.default_rng(1)
    corpus = unit(rng, 37, 6)
    np.save(tmp_path / "c.npy", corpus)
    src = NpyFileSource(tmp_path / "c.npy")
    assert (src.n, src.dim) == (37, 6)
    assert np.array_equal(np.concatenate([c.copy() for _, c in src.chunks(5)]), corpus)  # chunks share a buffer
    rows = np.array([36, 0, 5, 5, 20])
    assert np.array_equal(gather_rows(src, rows, 4), corpus[rows])
    groups = np.array([0, 2])  # group vectors: g0 = corpus[[1, 2]], g1 = corpus[[3]]
    ptr = np.array([0, 2, 3])
    gv = corpus[[1, 2, 3]]
    cand = np.array([10, 11, 2, 30])
    cand_group = np.array([0, 1, 0, 1])
    got = max_similarity_to_groups(src, cand, cand_group, ptr, gv, 4)
    want = [max(corpus[10] @ corpus[1], corpus[10] @ corpus[2]), corpus[11] @ corpus[3], 1.0, corpus[30] @ corpus[3]]
    assert np.allclose(got, want, atol=1e-6)
    assert groups is not None
    np.save(tmp_path / "i.npy", np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(DataError, match="float32"):
        NpyFileSource(tmp_path / "i.npy")
    (tmp_path / "t.npy").write_bytes((tmp_path / "c.npy").read_bytes()[:500])
    with pytest.raises(DataError, match="truncated"):
        NpyFileSource(tmp_path / "t.npy")


# ---------------------------------------------------------------------------------------------- engine
def test_known_positives_never_appear_as_negatives():
    rng = np.random.default_rng(3)
    corpus = unit(rng, 300, 16)
    nq = 40
    # Each query sits right next to its positives, so positives are ranked at the very top and inside the window.
    pos_lists = [sorted(rng.choice(300, size=rng.integers(1, 5), replace=False).tolist()) for _ in range(nq)]
    queries = np.stack([corpus[p].sum(0) for p in pos_lists])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ptr = np.cumsum([0] + [len(p) for p in pos_lists])
    idx = np.concatenate(pos_lists)
    settings = MiningSettings(range_min=0, range_max=60, num_negatives=59, sampling="top", **SETTINGS_OFF)
    negatives, _, stats = run_all(queries, corpus, ptr, idx, settings)
    for q, negs in enumerate(negatives):
        assert not set(negs.tolist()) & set(pos_lists[q])
        top60 = np.argsort(-(corpus @ queries[q]), kind="stable")[:60]
        assert len(negs) == min(59, 60 - len(set(top60.tolist()) & set(pos_lists[q])))
    assert stats.removed["known_positive"] >= nq  # at least the best positive of each query was in the window
    assert stats.positive_above_window == 0 and stats.positive_in_window == nq


def test_mining_is_independent_of_chunk_and_block_sizes_and_reproducible():
    rng = np.random.default_rng(4)
    corpus = unit(rng, 250, 12)
    queries = unit(rng, 30, 12)
    ptr = np.arange(31)
    idx = rng.integers(0, 250, size=30)
    base = dict(range_min=3, range_max=40, num_negatives=4, sampling="random", seed=11, relative_margin=0.05)
    ref, ref_s, _ = run_all(queries, corpus, ptr, idx, MiningSettings(**base))
    for chunk, block in ((7, 4), (1000, 1), (64, 30)):
        got, got_s, _ = run_all(queries, corpus, ptr, idx, MiningSettings(**base, corpus_chunk=chunk,
                                                                           query_block=block))
        assert all(np.array_equal(a, b) for a, b in zip(ref, got))
        assert all(np.allclose(a, b) for a, b in zip(ref_s, got_s))
    other, _, _ = run_all(queries, corpus, ptr, idx, MiningSettings(**{**base, "seed": 12}))
    assert any(not np.array_equal(a, b) for a, b in zip(ref, other))


def test_hnsw_search_applies_the_same_filters():
    rng = np.random.default_rng(5)
    corpus = unit(rng, 400, 16)
    queries = corpus[:20] + 0.05 * unit(rng, 20, 16)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ptr, idx = np.arange(21), np.arange(20)
    settings = MiningSettings(range_min=0, range_max=20, num_negatives=5, sampling="top", search="hnsw",
                              **SETTINGS_OFF)
    negatives, _, stats = run_all(queries, corpus, ptr, idx, settings)
    assert stats.search_method == "hnsw"
    exact, _, _ = run_all(queries, corpus, ptr, idx, MiningSettings(**{**settings.to_dict(), "search": "exact"}))
    assert all(q not in n for q, n in enumerate(negatives))
    agreement = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(negatives, exact)])
    assert agreement > 0.9  # HNSW is approximate, but on 400 vectors it should find the same neighbours


# ---------------------------------------------------------------------------------------------- text level
def pairs_rows():
    return [
        {"query": "what lowers blood sugar", "positive": "insulin lowers blood sugar"},
        {"query": "what lowers blood sugar", "positive": "metformin lowers blood sugar levels"},  # same query again
        {"query": "treatment of asthma", "positive": "asthma is treated with inhalers"},
        {"query": "guitar on stage", "positive": "a man plays a guitar on the stage"},
    ]


CORPUS_ROWS = [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate([
    "blood sugar rises after meals", "sugar in the blood is glucose", "insulin lowers blood sugar",
    "inhalers open the airways", "children with asthma cough at night", "the stage lights were bright",
    "a guitar has six strings", "court rulings on contracts", "interest rates rose", "the fox jumps",
    "blood pressure and sugar", "asthma attacks and inhalers", "a man plays a guitar on the stage",
    "lowers the blood sugar of patients",
])]


def test_same_query_in_several_pairs_has_all_positives_and_they_are_never_negatives(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows())
    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS_ROWS)
    task = load_task(pairs, corpus=corpus)
    assert task.n_queries == 3
    q = task.query_texts.index("what lowers blood sugar")
    positives = {task.corpus_texts[i] for i in task.positives_of(q)}
    assert positives == {"insulin lowers blood sugar", "metformin lowers blood sugar levels"}
    assert task.description["positives_added"] == 2  # "metformin..." and "asthma is treated..." were not in it
    assert task.corpus_ids[task.corpus_texts.index("insulin lowers blood sugar")] == "d2"  # matched, not added
    out = tmp_path / "mined.jsonl"
    settings = MiningSettings(range_min=0, range_max=16, num_negatives=15, sampling="top", **SETTINGS_OFF)
    summary = mine_to_file(FakeEncoder(), task, out, settings, use_cache=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4  # one per (query, positive)
    for row in rows:
        known = positives if row["query"] == "what lowers blood sugar" else {row["positive"]}
        assert not known & set(row["negatives"])
        assert len(row["negatives"]) == 16 - len(known)  # the whole pool except the positives
    assert summary["stats"]["removed"]["known_positive"] == 2 + 1 + 1  # counted per query, not per row


def test_output_files_and_read_examples_round_trip(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows())
    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS_ROWS)
    out = tmp_path / "runs" / "mined.jsonl"
    settings = MiningSettings(range_min=1, range_max=10, num_negatives=2, seed=3)
    summary = mine_to_file(FakeEncoder(), load_task(pairs, corpus=corpus), out, settings, use_cache=False)
    examples = list(read_examples(out))
    assert len(examples) == 4 and all(isinstance(e, TrainingExample) for e in examples)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for example, row in zip(examples, rows):
        assert example.scores is not None and len(example.scores) == 1 + len(example.negatives)
        assert len(row["negative_ids"]) == len(row["negatives"])
        # recorded scores are the fake encoder's cosines, positive first
        enc = FakeEncoder()
        qv = enc.encode([row["query"]], kind="query")[0]
        dv = enc.encode([row["positive"], *row["negatives"]])
        assert np.allclose(example.scores, dv @ qv, atol=1e-5)
        assert example.scores[1:] == sorted(example.scores[1:], reverse=True)
    for suffix in (".summary.json", ".scores.png", ".manifest.json"):
        assert (out.parent / f"mined{suffix}").is_file()
    assert (out.parent / "mined.scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out.parent / "mined.manifest.json").read_text())
    assert manifest["kind"] == "mining" and manifest["seed"] == 3 and manifest["model"]["name"] == "fake"
    assert manifest["settings"]["relative_margin"] == 0.05 and manifest["data"]["sha256"]
    assert manifest["outputs"]["rows"] == 4 and "numpy" in manifest["library_versions"]
    assert summary["stats"]["positive_scores"]["count"] == 4
    assert not list(out.parent.glob(".*tmp"))  # atomic writes leave nothing behind


def test_short_queries_are_reported_never_silently_dropped(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows())  # no corpus: a pool of 4 positives
    settings = dict(range_min=0, range_max=10, num_negatives=5, sampling="top", **SETTINGS_OFF)
    keep = mine_to_file(FakeEncoder(), load_task(pairs), tmp_path / "keep.jsonl", MiningSettings(**settings),
                        use_cache=False)
    assert keep["stats"]["queries_short"] == 3 and keep["rows_written"] == 4
    short = {s["query"]: s for s in keep["short_queries"]}
    assert short["what lowers blood sugar"]["found"] == 2 and short["treatment of asthma"]["found"] == 3
    assert short["what lowers blood sugar"]["query_id"] == "row:1"
    assert short["treatment of asthma"]["query_id"] == "row:3"
    assert {len(json.loads(line)["negatives"]) for line in (tmp_path / "keep.jsonl").read_text().splitlines()} == {2, 3}
    drop = mine_to_file(FakeEncoder(), load_task(pairs), tmp_path / "drop.jsonl",
                        MiningSettings(**{**settings, "on_short": "drop"}), use_cache=False)
    assert drop["rows_written"] == 0 and (tmp_path / "drop.jsonl").read_text() == ""
    assert [s["rows"] for s in drop["short_queries"]] == ["dropped"] * 3
    saved = json.loads((tmp_path / "drop.summary.json").read_text())
    assert {s["query_id"] for s in saved["short_queries"]} == {"row:1", "row:3", "row:4"}
    from embedkit.mine.report import format_summary

    text = format_summary(drop)
    assert "3 queries found fewer than 5 negatives (left out of the output)" in text and "row:3" in text


def test_near_duplicate_of_a_positive_under_another_id_is_removed(tmp_path):
    rows = CORPUS_ROWS + [{"_id": "copy", "title": "", "text": "insulin lowers blood sugar"}]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", rows)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows()[:1])
    task = load_task(pairs, corpus=corpus)
    out = tmp_path / "m.jsonl"
    s = MiningSettings(range_min=0, range_max=15, num_negatives=5, sampling="top", relative_margin=None)
    summary = mine_to_file(FakeEncoder(), task, out, s, use_cache=False)
    row = json.loads(out.read_text().splitlines()[0])
    assert "copy" not in row["negative_ids"] and "insulin lowers blood sugar" not in row["negatives"]
    assert summary["stats"]["removed"]["near_duplicate"] >= 1
    off = mine_to_file(FakeEncoder(), task, tmp_path / "off.jsonl",
                       MiningSettings(**{**s.to_dict(), "duplicate_threshold": None}), use_cache=False)
    assert "copy" in json.loads((tmp_path / "off.jsonl").read_text().splitlines()[0])["negative_ids"]
    assert off["stats"]["removed"].get("near_duplicate", 0) == 0


def test_corpus_embeddings_are_cached_and_shared_with_eval(tmp_path):
    from embedkit.eval.runner import encode_cached

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows())
    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS_ROWS)
    enc = FakeEncoder()
    s = MiningSettings(range_min=0, range_max=8, num_negatives=2)
    first = mine_to_file(enc, load_task(pairs, corpus=corpus), tmp_path / "a.jsonl", s, cache_dir=tmp_path / "c")
    doc_calls = sum(n for kind, n in enc.calls if kind == "document")
    assert doc_calls == 16 and first["corpus_embeddings"]["cached"] is False
    second = mine_to_file(enc, load_task(pairs, corpus=corpus), tmp_path / "b.jsonl", s, cache_dir=tmp_path / "c")
    assert second["corpus_embeddings"]["cached"] is True
    assert sum(n for kind, n in enc.calls if kind == "document") == doc_calls  # not encoded again
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    task = load_task(pairs, corpus=corpus)
    vectors, cached = encode_cached(enc, task.corpus_ids, task.corpus_texts, kind="document", batch_size=32,
                                    cache_dir=tmp_path / "c", use_cache=True)
    assert cached and np.allclose(vectors, enc.encode(task.corpus_texts))
    other = FakeEncoder(shift=1.0)  # another model: another key
    third = mine_to_file(other, load_task(pairs, corpus=corpus), tmp_path / "d.jsonl", s, cache_dir=tmp_path / "c")
    assert third["corpus_embeddings"]["cached"] is False


def test_precomputed_embeddings_in_any_row_order_give_the_same_result(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pairs_rows()[0], pairs_rows()[3]])  # positives in the corpus
    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS_ROWS)
    s = MiningSettings(range_min=0, range_max=10, num_negatives=3, seed=5)
    mine_to_file(FakeEncoder(), load_task(pairs, corpus=corpus), tmp_path / "enc.jsonl", s, use_cache=False)
    order = np.random.default_rng(0).permutation(len(CORPUS_ROWS))
    ids = [CORPUS_ROWS[i]["_id"] for i in order]
    vectors = FakeEncoder().encode([CORPUS_ROWS[i]["text"] for i in order])
    np.save(tmp_path / "emb.npy", vectors)
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    mine_to_file(FakeEncoder(), load_task(pairs, corpus=corpus), tmp_path / "pre.jsonl", s,
                 corpus_embeddings=tmp_path / "emb.npy", corpus_ids=tmp_path / "ids.txt")

    def key(path):
        rows = map(json.loads, path.read_text().splitlines())
        return [(r["query"], r["positive"], sorted(r["negative_ids"])) for r in rows]

    # The ranking does not depend on the pool's row order, and the draw is over rank positions: same result.
    assert key(tmp_path / "enc.jsonl") == key(tmp_path / "pre.jsonl")
    assert len(key(tmp_path / "pre.jsonl")) == 2
    # wrong ids: one line error naming the ids file and line
    (tmp_path / "bad.txt").write_text("\n".join(ids[:-1] + ["nope"]) + "\n")
    with pytest.raises(DataError) as info:
        mine_to_file(FakeEncoder(), load_task(pairs, corpus=corpus), tmp_path / "x.jsonl", s,
                     corpus_embeddings=tmp_path / "emb.npy", corpus_ids=tmp_path / "bad.txt")
    assert "bad.txt" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="corpus-ids"):
        mine_to_file(FakeEncoder(), load_task(pairs, corpus=corpus), tmp_path / "x.jsonl", s,
                     corpus_embeddings=tmp_path / "emb.npy")


def test_bad_input_gives_one_line_errors(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"query": "a", "positive": "b"}\n{"query": "c"}\n')
    with pytest.raises(DataError) as info:
        load_task(bad)
    assert info.value.line == 2 and info.value.field == "positive" and "\n" not in str(info.value)
    with pytest.raises(DataError, match="not found"):
        load_task(tmp_path / "missing.jsonl")
    good = write_jsonl(tmp_path / "good.jsonl", pairs_rows())
    with pytest.raises(ConfigError, match=r"\.jsonl"):
        mine_to_file(FakeEncoder(), load_task(good), tmp_path / "out.csv", MiningSettings())
    with pytest.raises(ConfigError) as info:
        mine_to_file(FakeEncoder(), load_task(good), tmp_path / "out.jsonl", MiningSettings(),
                     teacher=tmp_path / "no-such-model")
    assert info.value.field == "teacher" and "no-such-model" in str(info.value)
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{"_id": "d1", "text": "y"}\n')
    with pytest.raises(DataError) as info:
        load_task(good, corpus=tmp_path / "corpus.jsonl")
    assert info.value.line == 2 and "duplicate" in str(info.value)
    assert all(isinstance(e, EmbedkitError) for e in (info.value,))


def test_remine_uses_the_current_model_and_the_same_filters():
    examples = [TrainingExample(query=r["query"], positive=r["positive"]) for r in pairs_rows()]
    corpus = {r["_id"]: {"title": "", "text": r["text"]} for r in CORPUS_ROWS}
    settings = MiningSettings(range_min=0, range_max=12, num_negatives=3, sampling="random", seed=1,
                              relative_margin=0.05)
    state = RemineState.from_examples(examples, settings, corpus=corpus)
    first = remine(FakeEncoder(), state)
    assert state.rounds == 1 and state.last_stats is not None and len(first) == 4
    sugar = {"insulin lowers blood sugar", "metformin lowers blood sugar levels"}
    for ex in first:
        assert isinstance(ex, TrainingExample) and ex.scores is not None
        assert not ({ex.positive} | (sugar if ex.query == "what lowers blood sugar" else set())) & set(ex.negatives)
        assert all(s <= ex.scores[0] - abs(ex.scores[0]) * 0.05 + 1e-6 for s in ex.scores[1:])  # relative margin held
    second = remine(FakeEncoder(shift=2.0), state)  # "trained" model, next round: seed + 1
    assert state.rounds == 2
    assert [e.scores for e in first] != [e.scores for e in second]
    again = remine(FakeEncoder(), RemineState.from_examples(examples, settings, corpus=corpus))
    assert [(e.negatives, e.scores) for e in again] == [(e.negatives, e.scores) for e in first]  # reproducible


def test_write_false_mines_the_same_rows_and_writes_nothing(tmp_path):
    """The processes other than rank 0 of `embedkit mine --nproc N` make the same encode calls, write nothing."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows())
    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS_ROWS)
    settings = MiningSettings(range_min=1, range_max=10, num_negatives=2, seed=3)
    main, other = FakeEncoder(), FakeEncoder()
    out = tmp_path / "main" / "mined.jsonl"
    written = mine_to_file(main, load_task(pairs, corpus=corpus), out, settings, cache_dir=tmp_path / "cache")
    silent = mine_to_file(other, load_task(pairs, corpus=corpus), tmp_path / "other" / "mined.jsonl", settings,
                          cache_dir=tmp_path / "cache2", write=False)
    without_timings = lambda stats: {k: v for k, v in stats.items() if k != "seconds"}  # noqa: E731 (wall clock)
    assert silent["rows_written"] == written["rows_written"] == 4
    assert without_timings(silent["stats"]) == without_timings(written["stats"])
    assert other.calls == main.calls  # the same encode calls: each is a collective under sharded encoding
    assert not (tmp_path / "other").exists() and not (tmp_path / "cache2").exists()
    manifest = json.loads(out.with_name("mined.manifest.json").read_text())
    assert "device" in manifest  # None for this torch-free fake; "cpu (2 threads)" etc. for a real encoder
