"""The RAG index (embedkit.rag): exact search, index types, add/delete, model check, eval parity, hybrid, CLI.

The tests of index / add / delete / query / eval behaviour run on both vector stores (the `store` fixture: FAISS and
a Milvus Lite file); filters and the Milvus-only parts are in test_rag_stores.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS

TEXTS = list(dict.fromkeys(CORPUS))  # the 10 distinct fixture sentences
EXTRA = [
    "a cough that lasts for weeks may need a chest x-ray",
    "children with asthma use an inhaler before sport",
    "the bank raised its lending rate again",
    "the guitar player tuned his instrument before the concert",
    "the judge dismissed the case for lack of evidence",
]


@pytest.fixture(scope="module")
def encoder(st_bert):
    from embedkit.models import load_model

    return load_model(st_bert)


@pytest.fixture(params=["faiss", "milvus"])
def store(request) -> str:
    """The vector store a test's indexes use: every RAG behaviour must hold on both."""
    return request.param


@pytest.fixture(scope="module")
def docs():
    return {f"d{i:02d}": {"title": "", "text": t} for i, t in enumerate(TEXTS + EXTRA)}


def _build(encoder, docs, path, **kw):
    from embedkit.rag import build_index

    return build_index(encoder, docs, path, **kw)


def test_flat_search_equals_brute_force_numpy_ranking(encoder, docs, tmp_path, store):
    index = _build(encoder, docs, tmp_path / "idx", index_type="flat", store=store)
    assert index.index_type == "flat" and len(index) == len(docs)
    ids = list(docs)
    doc_emb = encoder.encode([docs[i]["text"] for i in ids], kind="document", normalize=True)
    queries = ["fever and cough", "blood sugar and insulin", "court contract"]
    query_emb = encoder.encode(queries, kind="query", normalize=True)  # the query prompt ("query: ") applies
    results = index.search(encoder, queries, k=len(ids))
    for q, hits in enumerate(results):
        scores = doc_emb @ query_emb[q]
        expected = sorted(range(len(ids)), key=lambda i: (-scores[i], i))
        assert [h.doc_id for h in hits] == [ids[i] for i in expected]
        np.testing.assert_allclose([h.score for h in hits], scores[expected], rtol=0, atol=1e-5)
        assert [h.rank for h in hits] == list(range(1, len(ids) + 1))
        assert hits[0].text == docs[hits[0].doc_id]["text"]
    single = index.search(encoder, queries[0], k=3)
    assert [h.doc_id for h in single] == [h.doc_id for h in results[0][:3]]


def test_auto_picks_flat_below_threshold_and_hnsw_above(encoder, docs, tmp_path):
    """Bug caught: auto's switch in documents whatever the width (a 1024-d model's exact search costs 2.7x a 384-d
    one's per document, so it must switch earlier), or a choice the manifest does not explain."""
    from embedkit.errors import ConfigError
    from embedkit.rag import HNSW_THRESHOLD, choose_index_type

    assert HNSW_THRESHOLD == 100_000  # bench/records/index/curve-real.json: exact search ~10 ms a query there
    assert choose_index_type(HNSW_THRESHOLD - 1) == "flat"
    assert choose_index_type(HNSW_THRESHOLD) == "hnsw"
    assert choose_index_type(37_499, dim=1024) == "flat" and choose_index_type(37_500, dim=1024) == "hnsw"
    assert choose_index_type(10, hnsw_threshold=5) == "hnsw"
    assert choose_index_type(10, hnsw_threshold=5, dim=4096) == "hnsw"
    assert choose_index_type(10, "ivf") == "ivf"
    with pytest.raises(ConfigError, match="unknown index type"):
        choose_index_type(10, "annoy")

    flat = _build(encoder, docs, tmp_path / "flat")
    hnsw = _build(encoder, docs, tmp_path / "hnsw", hnsw_threshold=len(docs))  # at the threshold -> HNSW
    assert flat.index_type == "flat" and hnsw.index_type == "hnsw"
    manifest = json.loads((tmp_path / "hnsw" / "embedkit_manifest.json").read_text())
    assert manifest["index"]["type"] == "hnsw" and manifest["index"]["params"]["M"] == 32
    assert manifest["index"]["requested_type"] == "auto"
    assert manifest["index"]["choice"].startswith(f"auto: HNSW index: {len(docs)} documents, at or past the switch "
                                                  f"at {len(docs)} (--hnsw-threshold)")
    flat_choice = json.loads((tmp_path / "flat" / "embedkit_manifest.json").read_text())["index"]["choice"]
    assert flat_choice.startswith(f"auto: flat (exact) index: {len(docs)} documents, under the switch to HNSW at "
                                  f"{100_000 * 384 // encoder.dim:,} ({100_000 * 384:,} floats / {encoder.dim}-d")
    # On 15 documents with efSearch 128 the graph search visits everything: same ranking as exact search.
    query = ["the patient has a fever", "interest rates"]
    assert [[h.doc_id for h in r] for r in hnsw.search(encoder, query, k=5)] == \
           [[h.doc_id for h in r] for r in flat.search(encoder, query, k=5)]


def test_manifest_records_model_corpus_and_counts(encoder, docs, tmp_path, store):
    from embedkit.manifest import sha256_texts

    _build(encoder, docs, tmp_path / "idx", store=store)
    manifest = json.loads((tmp_path / "idx" / "embedkit_manifest.json").read_text())
    assert manifest["kind"] == "rag_index" and manifest["index"]["vector_store"] == store
    assert manifest["model"]["fingerprint"] == encoder.fingerprint
    assert manifest["index"]["documents"] == manifest["index"]["vectors"] == len(docs)
    expected = sha256_texts(t for i, row in docs.items() for t in (i, "", row["text"]))
    assert manifest["corpus"]["sha256"] == expected
    vectors = {"faiss": "index.faiss", "milvus": "vectors.milvus.db"}[store]
    assert manifest["index"]["file"] == vectors
    assert {p.name for p in (tmp_path / "idx").iterdir()} == {vectors, "documents.sqlite", "bm25",
                                                              "embedkit_manifest.json"}
    if store == "milvus":  # the Lite file inside the folder (relative: the folder can move), exact FLAT over IP
        assert manifest["index"]["milvus"] == {"uri": "vectors.milvus.db", "collection": "embedkit_rag",
                                               "embedded": True, "index": "FLAT", "metric": "IP"}


STORE_TYPES = [("faiss", "flat"), ("faiss", "hnsw"), ("faiss", "ivf"), ("milvus", "flat"), ("milvus", "hnsw")]


@pytest.mark.parametrize("store,index_type", STORE_TYPES)
def test_add_then_delete_without_rebuild(encoder, docs, tmp_path, store, index_type):
    from embedkit.errors import DataError
    from embedkit.rag import RagIndex

    path = tmp_path / "idx"
    index = _build(encoder, docs, path, index_type=index_type, store=store)
    n = len(docs)
    assert index.delete(["d00", "d03"]) == 2
    assert len(index) == n - 2
    everything = index.search(encoder, "the patient has a fever and a cough", k=n)
    assert {"d00", "d03"}.isdisjoint(h.doc_id for h in everything) and len(everything) == n - 2

    added = index.add(encoder, {"new1": {"title": "Flu", "text": "fever and cough in winter"},
                                "new2": "insulin pumps for diabetes"})
    assert added == 2 and len(index) == n
    reloaded = RagIndex.load(path)
    assert len(reloaded) == n
    manifest = reloaded.manifest["index"]
    assert manifest["documents"] == n
    # FAISS's HNSW keeps deleted vectors as tombstones; flat, IVF and Milvus really remove them.
    tombstones = 2 if (store, index_type) == ("faiss", "hnsw") else 0
    assert manifest["tombstones"] == tombstones and manifest["vectors"] == n + tombstones
    assert reloaded.vectors.ntotal == n + tombstones
    assert manifest["next_id"] == n + 2  # ids are never reused
    found = {h.doc_id: h for h in reloaded.search(encoder, "fever and cough in winter", k=n + 5)}
    assert "new1" in found and found["new1"].title == "Flu" and "d00" not in found and "d03" not in found
    assert len(found) == n
    assert [u["op"] for u in reloaded.manifest["updates"]] == ["delete", "add"]

    with pytest.raises(DataError, match="already in the index"):
        reloaded.add(encoder, {"new1": "again"})
    with pytest.raises(DataError, match="not in the index"):
        reloaded.delete(["d00"])  # already deleted
    assert reloaded.delete(["d00", "d01"], missing_ok=True) == 1
    # The first handle is stale now: writing through it is refused instead of losing the other update.
    with pytest.raises(DataError, match="changed on disk"):
        index.delete(["d02"])


def test_empty_query_is_refused(encoder, docs, tmp_path):
    """An empty query embeds to the special tokens alone: it would return arbitrary documents, so it is an error."""
    from embedkit.errors import ConfigError

    index = _build(encoder, docs, tmp_path / "idx")
    for query in ("", "   ", "\t\n"):
        with pytest.raises(ConfigError, match="the query is empty") as err:
            index.search(encoder, query, k=3)
        assert err.value.field == "query"
    with pytest.raises(ConfigError, match=r"query is empty \(query 2 of 3\)"):
        index.search(encoder, ["fever", " ", "court"], k=3)
    assert len(index.search(encoder, " fever ", k=3)) == 3


def test_index_swaps_are_noticed_by_other_handles(encoder, docs, tmp_path, store):
    """A long-lived reader (rag web) learns from two stat calls that a writer swapped in a new folder; until it
    reloads it searches the folder it loaded (for Milvus Lite: its own server on the old file, not the new one)."""
    from embedkit.rag import RagIndex, build_index

    path = tmp_path / "idx"
    reader = _build(encoder, docs, path, store=store)
    assert "d00" in {h.doc_id for h in reader.search(encoder, "fever", k=len(docs))}  # holds the file open
    assert not reader.changed_on_disk()
    writer = RagIndex.load(path)
    writer.delete(["d00"])  # through another handle, as another process would
    assert reader.changed_on_disk() and not writer.changed_on_disk()  # a handle's own writes keep it current
    assert "d00" not in {h.doc_id for h in writer.search(encoder, "fever", k=len(docs))}
    fresh = RagIndex.load(path)
    assert len(fresh.search(encoder, "fever", k=len(docs))) == len(docs) - 1
    # A rebuild at the same path restarts the generation count, yet it is another folder.
    build_index(encoder, docs, path, store=store)
    assert writer.changed_on_disk() and not RagIndex.load(path).changed_on_disk()


def test_stale_temp_folders_of_killed_writers_are_removed_under_the_lock(encoder, docs, tmp_path, st_bert, store):
    """`rag add` killed mid-write (SIGKILL) leaves .idx.XXXXXXXX.tmp; the next writer removes it, holding the lock,
    and touches nothing else: not the live index, not another index's temporary folder."""
    import fcntl
    import signal
    import threading
    import time

    from embedkit.rag import RagIndex

    path = tmp_path / "idx"
    _build(encoder, docs, path, store=store)
    _build(encoder, docs, tmp_path / "idx2", store=store)
    more = tmp_path / "more.jsonl"
    more.write_text('{"_id": "m1", "title": "", "text": "a new passage about coughs"}\n')
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "import embedkit.rag.index as index\n"
        "index._write_folder = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from embedkit.cli import main\n"
        "main(['rag', 'add', sys.argv[1], '--corpus', sys.argv[2], '--model', sys.argv[3]])\n"),
        str(path), str(more), str(st_bert)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".idx.") and p.name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].is_dir() and (stale[0] / "documents.sqlite").exists()
    other = tmp_path / ".idx2.abcd1234.tmp"  # another index's temporary folder: not ours to remove
    other.mkdir()

    index = RagIndex.load(path)
    assert len(index) == len(docs)  # the killed run changed nothing
    with open(tmp_path / ".idx.lock", "w") as lock:  # a writer holds the lock: nothing may be removed yet
        fcntl.flock(lock, fcntl.LOCK_EX)
        writer = threading.Thread(target=index.delete, args=(["d00"],))
        writer.start()
        time.sleep(0.5)
        assert writer.is_alive() and stale[0].exists()
        fcntl.flock(lock, fcntl.LOCK_UN)
    writer.join(timeout=60)
    assert not writer.is_alive() and len(index) == len(docs) - 1
    assert not stale[0].exists()
    assert other.exists() and RagIndex.load(tmp_path / "idx2") and len(RagIndex.load(path)) == len(docs) - 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".idx.") and p.name.endswith(".tmp")]


def test_a_different_model_is_refused(encoder, docs, tmp_path, tiny_bert_dir):
    from embedkit.errors import ModelError
    from embedkit.models import load_model

    index = _build(encoder, docs, tmp_path / "idx")
    other = load_model(tiny_bert_dir)  # same weights, no query prompt: other vectors, other fingerprint
    assert other.fingerprint != encoder.fingerprint
    with pytest.raises(ModelError) as err:
        index.search(other, "fever", k=3)
    line = err.value.one_line()
    assert "\n" not in line and "fingerprint" in line and encoder.fingerprint[:12] in line
    with pytest.raises(ModelError):
        index.add(other, {"x": "text"})


def test_load_index_encoder_reloads_the_recorded_model(encoder, docs, tmp_path, st_bert):
    from embedkit.rag import RagIndex, load_index_encoder

    _build(encoder, docs, tmp_path / "idx")
    again = load_index_encoder(RagIndex.load(tmp_path / "idx"))
    assert again.fingerprint == encoder.fingerprint


def _small_beir(shared_data: Path, folder: Path, n_queries: int = 40, n_docs: int = 400) -> Path:
    """A slice of SciFact: the first judged test queries, their relevant documents and the first other documents."""
    src = shared_data / "scifact"
    qrels_lines = (src / "qrels" / "test.tsv").read_text().splitlines()
    header, rows = qrels_lines[0], [line.split("\t") for line in qrels_lines[1:] if line.strip()]
    keep_q = list(dict.fromkeys(r[0] for r in rows))[:n_queries]
    rows = [r for r in rows if r[0] in keep_q]
    wanted = {r[1] for r in rows}
    corpus = [json.loads(line) for line in (src / "corpus.jsonl").read_text().splitlines() if line.strip()]
    picked = [d for i, d in enumerate(corpus) if i < n_docs or d["_id"] in wanted]
    queries = [json.loads(line) for line in (src / "queries.jsonl").read_text().splitlines() if line.strip()]
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in picked))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries if q["_id"] in keep_q))
    (folder / "qrels" / "test.tsv").write_text(header + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return folder


def test_rag_eval_ndcg_equals_embedkit_eval(encoder, tmp_path, shared_data, store):
    from embedkit.data.beir import load_beir
    from embedkit.eval.runner import evaluate
    from embedkit.rag import build_index, evaluate_index

    beir = _small_beir(shared_data, tmp_path / "scifact-slice")
    data = load_beir(beir, "test")
    index = build_index(encoder, data, tmp_path / "idx", index_type="flat", store=store)
    result = evaluate_index(index, encoder, data.queries, data.qrels, latency_queries=5)
    report = evaluate(encoder, [f"beir:{beir}:test"], use_cache=False, cache_dir=tmp_path / "cache")
    (task,) = report["results"].values()
    # FAISS (or Milvus) and the eval runner sum the dot products in different orders (AVX-512 kernels differ from AVX2 ones), and
    # the random tiny BERT scores many documents within 1e-7 of each other, so a near-tie deep in a ranking may swap
    # (seen: map@100 off by 2.6e-6 on an AVX-512 CPU). An indexing or metric bug moves these numbers by far more.
    for name in ("ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10", "map_at_100"):
        assert result["metrics"][name] == pytest.approx(task["metrics"][name], abs=1e-4), name
    # per query too (issue #33: a store that ranked one query worse and another better would pass on the means)
    assert result["per_query"].keys() == task["per_query"].keys()
    for qid, values in task["per_query"].items():
        assert result["per_query"][qid]["ndcg_at_10"] == pytest.approx(values["ndcg_at_10"], abs=1e-4), qid
    assert 0 < result["metrics"]["ndcg_at_10"] < 1  # a real, non-degenerate number on this slice
    assert result["index"]["vector_store"] == store
    assert result["metrics"]["recall_at_1"] <= result["metrics"]["recall_at_5"] <= result["metrics"]["recall_at_100"]
    lat = result["latency"]
    assert lat["queries"] == 5 and 0 < lat["median_ms"] <= lat["p95_ms"]


def test_hybrid_finds_a_lexical_only_match(encoder, docs, tmp_path):
    from embedkit.errors import ConfigError

    query = "zyxquartz"
    # The only document with the query's word is one the dense model ranks low: of the fixture texts (once or
    # repeated, which dilutes the word in the mean) with the word appended, the farthest from the query that the
    # model ranks below at least 5 plain documents. Picking it (rather than trusting one text) keeps the premise true
    # whatever the tiny model's weights and vocabulary are.
    candidates = [" ".join([d["text"]] * times + [query]) for d in docs.values() for times in (1, 2, 4)]
    q = encoder.encode([query], kind="query", normalize=True)[0]
    closeness = encoder.encode(candidates, kind="document", normalize=True) @ q
    plain = encoder.encode([d["text"] for d in docs.values()], kind="document", normalize=True) @ q
    below = [i for i in np.argsort(closeness) if (plain > closeness[i]).sum() >= 5]
    assert below, "no fixture text with the word appended ranks below 5 plain documents: the premise cannot hold"
    rare = {"rare": {"title": "", "text": candidates[int(below[0])]}}
    index = _build(encoder, {**docs, **rare}, tmp_path / "idx")
    dense = [h.doc_id for h in index.search(encoder, query, k=len(docs) + 1)]
    hybrid = index.search(encoder, query, k=5, hybrid=True)
    assert dense.index("rare") >= 5  # the dense model does not find it by meaning ...
    assert hybrid[0].doc_id == "rare" and hybrid[0].bm25_score > 0  # ... BM25 does, and fusion puts it first
    assert all(h.bm25_score is None for h in hybrid[1:])  # no other document contains the word
    # Weight 0 is the dense ranking again; the fused scores are RRF scores.
    assert [h.doc_id for h in index.search(encoder, query, k=5, hybrid=True, hybrid_weight=0.0)] == dense[:5]
    rank_dense = dense.index("rare") + 1
    assert hybrid[0].score == pytest.approx(0.5 / (60 + rank_dense) + 0.5 / 61)
    with pytest.raises(ConfigError):
        index.search(encoder, query, hybrid=True, hybrid_weight=1.5)
    # A stopword-only query matches nothing lexically and falls back to the dense order.
    assert [h.doc_id for h in index.search(encoder, "the of", k=3, hybrid=True, hybrid_weight=0.0)] == \
           [h.doc_id for h in index.search(encoder, "the of", k=3)]


@pytest.mark.parametrize("store,index_type", STORE_TYPES)
def test_hybrid_scores_bm25_only_candidates_from_stored_vectors(encoder, docs, tmp_path, store, index_type):
    """With a shallow dense list, BM25-only candidates get their exact cosine from the index's stored vectors."""
    from embedkit.rag.index import encode_texts

    index = _build(encoder, docs, tmp_path / "idx", index_type=index_type, store=store)
    ids = list(docs)
    query = "insulin lowers blood glucose"
    q = encode_texts(encoder, [query], "query", 32)
    doc_emb = encode_texts(encoder, [docs[i]["text"] for i in ids], "document", 32)
    cosine = dict(zip(range(len(ids)), doc_emb @ q[0]))
    (ranked,) = index.rank([query], q, 10, hybrid=True, depth=1)  # dense contributes only its top 1 ...
    assert len(ranked) > 1  # ... so every other candidate came from BM25 and was reconstructed
    for faiss_id, _, dense_score, _ in ranked:
        assert dense_score == pytest.approx(float(cosine[faiss_id]), abs=1e-5)


def test_corpus_inputs_jsonl_txt_and_errors(encoder, tmp_path):
    from embedkit.errors import DataError
    from embedkit.rag import load_documents

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"_id": "a", "title": "T", "text": "x"}\n{"_id": 7, "text": "y"}\n')
    assert [(d.doc_id, d.embed_text) for d in load_documents(jsonl)] == [("a", "T x"), ("7", "y")]
    txt = tmp_path / "p.txt"
    txt.write_text("first passage\n\nsecond passage\n")
    assert [d.doc_id for d in load_documents(txt)] == ["p.txt:1", "p.txt:3"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "a", "text": "x"}\n{"_id": "b"}\n')
    with pytest.raises(DataError) as err:
        load_documents(bad)
    assert err.value.line == 2 and err.value.field == "text"
    csv = tmp_path / "c.csv"
    csv.write_text("x")
    with pytest.raises(DataError, match="unsupported corpus file"):
        load_documents(csv)


# ---------------------------------------------------------------------------------------------------- CLI
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedkit.cli", "rag", *args], capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_cli_index_query_eval(st_bert, tmp_path, shared_data, store):
    beir = _small_beir(shared_data, tmp_path / "beir", n_queries=10, n_docs=60)
    out = tmp_path / "idx"
    result = run_cli("index", "--model", str(st_bert), "--corpus", str(beir), "--output", str(out), "-q",
                     "--store", store)
    assert result.returncode == 0, result.stderr
    assert f"{store} flat index" in result.stdout and "indexed" in result.stdout

    result = run_cli("query", str(out), "vitamin D and bone fractures", "-k", "3", "--json")
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]

    report = tmp_path / "rag_eval.json"
    result = run_cli("eval", str(out), "--beir", str(beir), "--latency-queries", "3", "-o", str(report), "-q",
                     "--hybrid")
    assert result.returncode == 0, result.stderr
    assert "ndcg_at_10" in result.stdout and "latency per query" in result.stdout and "hybrid" in result.stdout
    saved = json.loads(report.read_text())
    assert saved["kind"] == "rag_eval" and saved["retrieval"]["hybrid"] is True
    assert saved["index"]["vector_store"] == store
    assert f"{saved['metrics']['ndcg_at_10']:.4f}" in result.stdout

    # explicit files: a qrels line naming a document that is not in the index is reported with its line
    qrels = tmp_path / "qrels.tsv"
    first_query = json.loads((beir / "queries.jsonl").read_text().splitlines()[0])["_id"]
    qrels.write_text(f"query-id\tcorpus-id\tscore\n{first_query}\tno-such-doc\t1\n")
    result = run_cli("eval", str(out), "--queries", str(beir / "queries.jsonl"), "--qrels", str(qrels))
    assert result.returncode == 2 and f"{qrels}:2" in result.stderr and "no-such-doc" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_bad_corpus_line_exits_2_with_file_and_line(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "a", "text": "fine"}\n{"_id": "b", "text": "fine too"}\n{"_id": "c", "text": }\n')
    result = run_cli("index", "--model", "minilm", "--corpus", str(corpus), "--output", str(tmp_path / "idx"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and f"{corpus}:3" in lines[0]
    assert not (tmp_path / "idx").exists()

    result = run_cli("query", str(tmp_path / "nowhere"), "x")
    assert result.returncode == 2 and "RAG index folder not found" in result.stderr


def test_cli_add_and_delete(st_bert, tmp_path, store):
    corpus = tmp_path / "passages.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "idx"
    assert run_cli("index", "-m", str(st_bert), "-c", str(corpus), "-o", str(out), "-q", "--store",
                   store).returncode == 0
    more = tmp_path / "more.jsonl"
    more.write_text('{"_id": "m1", "title": "", "text": "a new passage about coughs"}\n')
    result = run_cli("add", str(out), "--corpus", str(more))
    assert result.returncode == 0, result.stderr
    assert "added 1 documents; the index now holds 11" in result.stdout
    result = run_cli("query", str(out), "coughs", "-k", "20", "--json")
    assert result.returncode == 0 and "m1" in {h["doc_id"] for h in json.loads(result.stdout)}
    result = run_cli("delete", str(out), "m1", "passages.txt:1")
    assert result.returncode == 0 and "now holds 9" in result.stdout
    result = run_cli("query", str(out), "coughs", "-k", "20", "--json")
    found = {h["doc_id"] for h in json.loads(result.stdout)}
    assert len(found) == 9 and not {"m1", "passages.txt:1"} & found
    result = run_cli("delete", str(out), "m1")
    assert result.returncode == 2 and "not in the index" in result.stderr
    result = run_cli("query", str(out), "   ")  # an empty query: one line, exit 2, no hits
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: field 'query': the query is empty: give some words to "
                                                  "search for"]


# ---------------------------------------------------------------------------------------------------- reranking
def test_reranked_rag_eval_equals_embedkit_eval_rerank_per_query(st_bert, tiny_reranker, tmp_path, one_torch_thread,
                                                                store):
    """Bug caught: `rag eval --rerank` ranks with other pairs, other document texts, another head/tail split or
    another tie order than `embedkit eval --rerank` (a second reranking routine drifting from the first), or its
    report leaves out which reranker made the numbers."""
    from typer.testing import CliRunner

    from embedkit.cli import app
    from embedkit.models import load_model
    from embedkit.models.reranker import load_reranker
    from test_tune import write_beir

    beir = write_beir(tmp_path / "beir", split="test")  # 10 documents: with --rerank-top 5 the tail counts too
    runner = CliRunner()
    indexed = runner.invoke(app, ["rag", "index", "-m", str(st_bert), "-c", str(beir), "-o", str(tmp_path / "idx"),
                                  "--index-type", "flat", "-q", "--store", store])
    assert indexed.exit_code == 0, indexed.output
    rag = runner.invoke(app, ["rag", "eval", str(tmp_path / "idx"), "--beir", str(beir), "--rerank",
                              str(tiny_reranker), "--rerank-top", "5", "--latency-queries", "2", "-q",
                              "-o", str(tmp_path / "rag.json")])
    assert rag.exit_code == 0, rag.output
    assert "reranked by" in rag.output and "rerank" in rag.output.splitlines()[-1]
    ev = runner.invoke(app, ["eval", "-m", str(st_bert), "--rerank", str(tiny_reranker), "--rerank-top", "5",
                             "-t", f"beir:{beir}:test", "-o", str(tmp_path / "eval.json"), "-q", "--no-cache"])
    assert ev.exit_code == 0, ev.output
    rag_report = json.loads((tmp_path / "rag.json").read_text())
    (task,) = json.loads((tmp_path / "eval.json").read_text())["results"].values()

    assert rag_report["per_query"].keys() == task["per_query"].keys()
    for qid, values in task["per_query"].items():
        for metric, value in values.items():
            assert rag_report["per_query"][qid][metric] == pytest.approx(value, abs=1e-9), (qid, metric)
    for metric, value in task["first_stage"]["metrics"].items():
        assert rag_report["first_stage"]["metrics"][metric] == pytest.approx(value, abs=1e-9), metric
    # the reranker changed the ranking (else this test could not tell one stage from two)
    assert rag_report["metrics"]["ndcg_at_10"] != rag_report["first_stage"]["metrics"]["ndcg_at_10"]
    fingerprint = load_reranker(tiny_reranker).fingerprint
    assert rag_report["reranker"]["fingerprint"] == fingerprint and rag_report["reranker"]["path"] == str(tiny_reranker)
    assert rag_report["retrieval"]["rerank_top"] == 5 and rag_report["latency"]["rerank_median_ms"] > 0
    assert rag_report["index"]["fingerprint"] == load_model(st_bert).fingerprint  # both stages are named


def test_search_with_a_reranker_orders_the_first_stage_top(encoder, docs, tiny_reranker, tmp_path, one_torch_thread,
                                                          store):
    """Bug caught: the reranker sees fewer candidates than --rerank-top (or only the k shown), the hits keep the
    first stage's order or its cosine as their score, or a depth below k silently shows unreranked results."""
    from embedkit.errors import ConfigError
    from embedkit.models.reranker import load_reranker

    index = _build(encoder, docs, tmp_path / "idx", store=store)
    reranker = load_reranker(tiny_reranker)
    query = "insulin and blood sugar"
    first = index.search(encoder, query, k=8)
    hits = index.search(encoder, query, k=3, reranker=reranker, rerank_top=8)
    expected = reranker.rerank(query, [docs[h.doc_id]["text"] for h in first], top_n=3)
    assert [h.doc_id for h in hits] == [first[i].doc_id for i, _ in expected]
    assert [h.score for h in hits] == pytest.approx([s for _, s in expected], abs=1e-6)
    assert all(h.reranked for h in hits) and [h.rank for h in hits] == [1, 2, 3]
    cosine = {h.doc_id: h.score for h in first}
    assert all(h.dense_score == pytest.approx(cosine[h.doc_id]) for h in hits)  # the first stage's part is kept
    with pytest.raises(ConfigError) as err:
        index.search(encoder, query, k=5, reranker=reranker, rerank_top=3)
    assert err.value.field == "rerank-top"


def test_cli_rerank_query_and_wrong_kind_is_one_line(st_bert, tiny_reranker, tmp_path):
    """Bug caught: `rag query --rerank` prints first-stage scores, or an embedding model given to --rerank loads
    (a random head) or fails with a traceback or after progress lines instead of one line and exit 2."""
    corpus = tmp_path / "passages.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "idx"
    assert run_cli("index", "-m", str(st_bert), "-c", str(corpus), "-o", str(out), "-q").returncode == 0
    result = run_cli("query", str(out), "fever and cough", "-k", "3", "--rerank", str(tiny_reranker),
                     "--rerank-top", "6", "--json")
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    assert all(h["reranked"] and 0 < h["score"] < 1 for h in hits) and len(hits) == 3
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    queries, qrels = tmp_path / "queries.jsonl", tmp_path / "qrels.tsv"
    queries.write_text('{"_id": "q1", "text": "fever"}\n')
    qrels.write_text("q1\tpassages.txt:1\t1\n")
    for command in (["query", str(out), "fever"], ["eval", str(out), "--queries", str(queries), "--qrels", str(qrels)]):
        result = run_cli(*command, "--rerank", str(st_bert))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "not a reranker" in lines[0], lines
        assert result.stdout == ""
