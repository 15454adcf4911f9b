"""bench/bench_index.py and bench/bench_mine_memory.py: the parts whose mistakes would bend the index curve or the
mining overlap without failing the benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import bench_module


@pytest.fixture(scope="module")
def bench_index():
    yield from bench_module("bench_index")


@pytest.fixture(scope="module")
def bench_mine_memory():
    yield from bench_module("bench_mine_memory")


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fake_data(root):
    _write_jsonl(root / "scifact" / "corpus.jsonl", [
        {"_id": "1", "title": "Stem cells in mice.", "text": "Nanoparticles track stem cells.  Short one. "
                                                          "Nanoparticles track stem cells."}])
    _write_jsonl(root / "scifact" / "queries.jsonl", [{"_id": "q1", "text": "Do nanoparticles track stem cells?"}])
    _write_jsonl(root / "medquad" / "train_pairs.jsonl", [
        {"query": "What is   asthma ?", "positive": "Asthma is a disease of the airways. It makes breathing hard."},
        {"query": "Asthma is a disease of the airways.", "positive": "Asthma is a disease of the airways."}])
    _write_jsonl(root / "medquad" / "test" / "corpus.jsonl", [{"_id": "d", "title": "", "text": "Gout hurts the toes."}])
    _write_jsonl(root / "medquad" / "test" / "queries.jsonl", [{"_id": "Q0", "text": "What is gout ?"}])
    _write_jsonl(root / "sts" / "sick" / "train.jsonl", [
        {"sentence1": "A man is playing a guitar loudly", "sentence2": "Gout hurts the toes."}])


def test_the_corpus_is_deduplicated_and_holds_no_query(tmp_path, bench_index):
    """Bug caught: duplicate sentences (a passage repeated across sources) or a query that is also a corpus sentence
    make exact search's top 10 degenerate (ties, a perfect match) and inflate approximate search's recall; an order
    that depends on the run would make the sizes' prefixes different samples."""
    _fake_data(tmp_path)
    texts, queries = bench_index.assemble(tmp_path, seed=0)
    assert len(texts) == len(set(texts))
    assert "Short one." not in texts  # under 20 characters
    assert {"Nanoparticles track stem cells.", "Gout hurts the toes.", "A man is playing a guitar loudly",
            "Asthma is a disease of the airways.", "It makes breathing hard."} <= set(texts)
    assert "Asthma is a disease of the airways." not in queries  # a question that is a corpus sentence
    assert set(queries) == {"What is asthma ?", "What is gout ?", "Do nanoparticles track stem cells?"}
    assert (texts, queries) == bench_index.assemble(tmp_path, seed=0)
    assert bench_index.assemble(tmp_path, seed=1)[0] != texts or len(texts) < 3


def test_multi_chunks_add_half_overlapping_word_windows_of_whole_documents(tmp_path, bench_index, monkeypatch):
    """Bug caught (--chunks multi, the 1,000,000-text curve): windows that skip words (a stride past the window),
    windows cut from sentences instead of whole documents, a document no longer than a window repeated as one (a
    duplicate of its sentences' text), or the sentence corpus changed by the option (the records of the sentence
    curve would no longer be reproducible)."""
    _fake_data(tmp_path)
    words = " ".join(f"w{i}." for i in range(10))
    _write_jsonl(tmp_path / "medquad" / "train_pairs.jsonl", [{"query": "What is w?", "positive": words}])
    monkeypatch.setattr(bench_index, "WINDOWS", ((4, 2), (20, 10)))
    sentences_only, _ = bench_index.assemble(tmp_path, seed=0)
    texts, queries = bench_index.assemble(tmp_path, seed=0, chunks="multi")
    added = set(texts) - set(sentences_only)
    assert set(sentences_only) <= set(texts) and len(texts) == len(set(texts))
    windows = {t for t in added if t.startswith("w")}
    assert windows == {"w0. w1. w2. w3.", "w2. w3. w4. w5.", "w4. w5. w6. w7.", "w6. w7. w8. w9."}
    assert not any(len(t.split()) == 20 for t in added)  # no document is longer than 20 words
    assert queries == bench_index.assemble(tmp_path, seed=0)[1]


def test_texts_files_are_read_deduplicated_without_blanks_or_queries_from_the_corpus(tmp_path, bench_index):
    """Bug caught (--texts / --query-texts): a blank line kept as a text (it embeds to the special tokens alone), a
    duplicate kept, or a question that is also a corpus text (a perfect match that inflates recall)."""
    (tmp_path / "corpus.txt").write_text("Gout hurts the toes.\n\n   \nA man  plays a guitar.\nGout hurts the toes.\n"
                                         "What is gout?\n")
    _write_jsonl(tmp_path / "questions.jsonl", [{"text": "What is  gout?"}, {"text": "Who plays the guitar?"},
                                                {"text": " "}])
    texts, queries = bench_index.assemble_files(tmp_path / "corpus.txt", tmp_path / "questions.jsonl", seed=0)
    assert sorted(texts) == ["A man plays a guitar.", "Gout hurts the toes.", "What is gout?"]
    assert queries == ["Who plays the guitar?"]
    assert (texts, queries) == bench_index.assemble_files(tmp_path / "corpus.txt", tmp_path / "questions.jsonl", 0)


def test_the_curve_measures_recall_against_exact_search(bench_index):
    """Bug caught: recall computed against the approximate index itself (always 1), against a shifted id space, or
    the flat row not exact; and embedkit's own parameters not the ones measured."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:40] + 0.05 * rng.standard_normal((40, 32), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    rows = bench_index.curve(x, q, [3000], ["flat", "ivf"], "t", threads=1)
    flat, ivf = rows
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    _, found = bench_index.measure("flat", x, q, None, threads=1)
    assert (found == exact).mean() > 0.99  # flat is exact (ties aside)
    assert flat["recall_at_10"] == 1.0 and 0 < ivf["recall_at_10"] < 1.0  # 8 of 76 lists probed: approximate
    assert ivf["params"]["nprobe"] == 8 and ivf["params"]["nlist"] == 3000 // 39
    assert ivf["bytes"] > x.nbytes and flat["p99_ms"] >= flat["p50_ms"]
    # exact top 10 within the index's top 100: at least what its top 10 holds (a deeper search finds more), and
    # computed against exact search, not the index itself (the bug: always 1.0)
    # IVF scores exactly within the lists it opens, so a true top-10 document it returns at all is already in its
    # top 10: a deeper search adds none (the ones it misses sit in lists the 8 probes never open)
    assert ivf["recall_10_at_100"] == ivf["recall_at_10"] < 1.0 and flat["recall_10_at_100"] == 1.0


def test_mining_on_real_vectors_takes_each_querys_nearest_document_as_its_positive(tmp_path, bench_mine_memory):
    """Bug caught: a positive off by a chunk (argmax within a chunk, not over the corpus), which would make the
    mining window start in the wrong place."""
    rng = np.random.default_rng(1)
    corpus = rng.standard_normal((1000, 16), dtype=np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[[5, 700, 999]] + 0.01
    source = tmp_path / "vectors"
    source.mkdir()
    np.save(source / "corpus.npy", corpus)
    np.save(source / "queries.npy", np.concatenate([queries, queries]))
    folder = tmp_path / "run"
    folder.mkdir()
    bench_mine_memory.link_real(folder, source, queries=3, chunk=300)
    assert np.load(folder / "positives.npy").tolist() == [5, 700, 999]
    assert np.load(folder / "queries.npy").shape == (3, 16)
