"""Vector stores and metadata filters of the RAG index (issue #33 item 3): FAISS and Milvus take the same filters
with the same meaning, the Milvus store's Lite file and server-URI modes, and what a bad filter prints.

Behaviour shared by both stores (search, add / delete, eval parity, CLI) is tested over both in test_rag.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import CORPUS

TEXTS = list(dict.fromkeys(CORPUS))
SOURCES = ["manual", "web", "forum"]


@pytest.fixture(scope="module")
def encoder(st_bert):
    from embedkit.models import load_model

    return load_model(st_bert)


@pytest.fixture(scope="module")
def docs():
    """The fixture sentences with metadata: a source, a year, a flag; one document has none, one lacks `year`."""
    out = {}
    for i, text in enumerate(TEXTS):
        meta = {"source": SOURCES[i % 3], "year": 2015 + i, "reviewed": i % 2 == 0}
        if i == 4:
            meta.pop("year")
        out[f"d{i:02d}"] = {"title": "", "text": text, "metadata": None if i == 7 else meta}
    return out


@pytest.fixture(params=["faiss", "milvus"])
def store(request) -> str:
    return request.param


def _meta(docs):
    return {d: row["metadata"] or {} for d, row in docs.items()}


# Filters with their meaning spelled out in Python (None: a document without the field never matches, `not`
# included, as in Milvus): each picks a strict, non-empty subset of the documents, so an ignored filter fails.
FILTERS = [
    ('source == "manual"', lambda m: m.get("source") == "manual"),
    ("source != 'manual'", lambda m: "source" in m and m["source"] != "manual"),
    ('year >= 2019 and source in ["web", "forum"]',
     lambda m: "year" in m and m["year"] >= 2019 and m.get("source") in ("web", "forum")),
    ('not (year < 2020) || reviewed == true',
     lambda m: ("year" in m and not m["year"] < 2020) or m.get("reviewed") is True),
    ('source not in ["forum"] && !(reviewed == false)',
     lambda m: "source" in m and m["source"] != "forum" and m.get("reviewed") is True),
    ('year == "2016"', lambda m: False),  # a string never equals a number ...
    ('year != "2016"', lambda m: "year" in m),  # ... and so differs from every number
]


@pytest.mark.parametrize("text,meaning", FILTERS, ids=[f for f, _ in FILTERS])
def test_filter_meaning_is_the_same_in_python_and_in_milvus(text, meaning, docs, tmp_path):
    """Bug caught: the FAISS side (Filter.matches over the SQLite metadata) and the Milvus side (the filter rendered
    as a Milvus expression) disagree on a document, e.g. on a missing field under `not`, or a type mismatch."""
    from embedkit.rag.filters import parse_filter
    from embedkit.rag.vectors.milvus_store import MilvusVectors

    flt = parse_filter(text)
    meta = _meta(docs)
    expected = {d for d, m in meta.items() if meaning(m)}
    assert {d for d, m in meta.items() if flt.matches(m)} == expected
    ids = {d: n for n, d in enumerate(meta)}
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(meta), 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    milvus, _ = MilvusVectors.create(tmp_path, "flat", vectors, np.arange(len(meta)), list(meta.values()),
                                     documents=None, options={})
    try:
        ((found, _),) = milvus.search(vectors[:1], len(meta), flt)
        assert {d for d, n in ids.items() if n in set(found.tolist())} == expected
    finally:
        milvus.close()
    if text != 'year == "2016"':
        assert expected and expected != set(meta), text


def test_filtered_search_on_both_stores(encoder, docs, tmp_path, store):
    """Bug caught: a filter ignored (or applied after the top k, returning fewer than k of what passes), or one
    store's filtered ranking differing from the unfiltered ranking restricted to the passing documents."""
    from embedkit.rag import build_index
    from embedkit.rag.filters import parse_filter

    index = build_index(encoder, docs, tmp_path / "idx", index_type="flat", store=store)
    query = "the patient has a fever"
    everything = [h.doc_id for h in index.search(encoder, query, k=len(docs))]
    for text, meaning in FILTERS[:5]:
        passing = {d for d, m in _meta(docs).items() if meaning(m)}
        hits = index.search(encoder, query, k=3, filter=text)
        assert [h.doc_id for h in hits] == [d for d in everything if d in passing][:3], text
        assert all(parse_filter(text).matches(h.metadata) for h in hits)
    # hybrid: the BM25 candidates are filtered too
    hybrid = index.search(encoder, "fever cough insulin court", k=len(docs), hybrid=True, filter='source == "web"')
    assert {h.doc_id for h in hybrid} == {d for d, m in _meta(docs).items() if m.get("source") == "web"}
    assert index.search(encoder, query, k=5, filter='source == "nowhere"') == []
    # filters see added documents' metadata and never deleted documents
    index.add(encoder, {"n1": {"title": "", "text": "a fever clinic", "metadata": {"source": "manual", "year": 1}}})
    index.delete(["d00"])
    found = {h.doc_id for h in index.search(encoder, query, k=20, filter='source == "manual"')}
    assert "n1" in found and "d00" not in found
    assert found == {d for d, m in _meta(docs).items() if m.get("source") == "manual"} - {"d00"} | {"n1"}


def test_filtered_eval_counts_excluded_judged_documents_as_missed(encoder, docs, tmp_path, store):
    from embedkit.rag import build_index, evaluate_index

    index = build_index(encoder, docs, tmp_path / "idx", index_type="flat", store=store)
    queries = {"q1": "blood sugar and insulin", "q2": "fever and cough"}
    manual = {d for d, m in _meta(docs).items() if m.get("source") == "manual"}
    other = sorted(set(docs) - manual)
    qrels = {"q1": {sorted(manual)[0]: 1}, "q2": {other[0]: 1}}
    plain = evaluate_index(index, encoder, queries, qrels, latency_queries=0)
    filtered = evaluate_index(index, encoder, queries, qrels, latency_queries=0, filter='source == "manual"')
    assert plain["per_query"]["q2"]["recall_at_100"] == 1.0
    assert filtered["per_query"]["q2"]["recall_at_100"] == 0.0  # its judged document is filtered out
    assert filtered["per_query"]["q1"]["recall_at_100"] == 1.0
    assert filtered["retrieval"]["filter"] == 'source == "manual"' and plain["retrieval"]["filter"] is None


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedkit.cli", "rag", *args], capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_cli_filter_and_bad_filter(st_bert, docs, tmp_path, store):
    """Bug caught: --filter not passed through, metadata lost between corpus.jsonl and the index, or a bad filter
    failing with a traceback (or after the model loaded) instead of one line naming --filter, exit 2."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": d, **row}) + "\n" for d, row in docs.items()))
    out = tmp_path / "idx"
    result = run_cli("index", "-m", str(st_bert), "-c", str(corpus), "-o", str(out), "-q", "--store", store)
    assert result.returncode == 0, result.stderr
    result = run_cli("query", str(out), "fever", "-k", "20", "--json", "--filter", 'source == "manual"')
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    manual = {d for d, m in _meta(docs).items() if m.get("source") == "manual"}
    assert {h["doc_id"] for h in hits} == manual and all(h["metadata"]["source"] == "manual" for h in hits)
    for command in (["query", str(out), "fever"], ["eval", str(out), "--queries", str(corpus), "--qrels",
                                                   str(corpus)]):
        result = run_cli(*command, "--filter", 'source = "manual"')
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: field 'filter': bad filter"), lines
        assert "column 8" in lines[0] and result.stdout == ""


def test_bad_metadata_in_corpus_is_named_with_its_line(tmp_path):
    from embedkit.errors import DataError
    from embedkit.rag import load_documents

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"_id": "a", "text": "x", "metadata": {"source": "m"}}\n{"_id": "b", "text": "y", '
                      '"metadata": "manual"}\n')
    with pytest.raises(DataError) as err:
        load_documents(corpus)
    assert err.value.line == 2 and err.value.field == "metadata"


def test_old_document_store_without_metadata_still_loads_and_updates(encoder, docs, tmp_path):
    """An index written before metadata existed (no metadata column) reads as documents without metadata, and an
    update adds the column."""
    import sqlite3

    from embedkit.rag import RagIndex, build_index

    path = tmp_path / "idx"
    build_index(encoder, {d: {"title": "", "text": r["text"]} for d, r in docs.items()}, path)
    conn = sqlite3.connect(path / "documents.sqlite")
    conn.execute("ALTER TABLE documents DROP COLUMN metadata")
    conn.commit()
    conn.close()
    index = RagIndex.load(path)
    assert len(index.search(encoder, "fever", k=3)) == 3
    assert index.search(encoder, "fever", k=3, filter='source == "manual"') == []
    index.add(encoder, {"n1": {"text": "fever", "metadata": {"source": "manual"}}})
    assert [h.doc_id for h in index.search(encoder, "fever", k=3, filter='source == "manual"')] == ["n1"]


def test_milvus_refuses_ivf_and_unknown_stores(encoder, docs, tmp_path):
    from embedkit.errors import ConfigError
    from embedkit.rag import build_index

    with pytest.raises(ConfigError, match="milvus store builds flat, hnsw") as err:
        build_index(encoder, docs, tmp_path / "idx", store="milvus", index_type="ivf")
    assert err.value.field == "index-type" and not (tmp_path / "idx").exists()
    with pytest.raises(ConfigError, match="unknown vector store"):
        build_index(encoder, docs, tmp_path / "idx", store="annoy")
    with pytest.raises(ConfigError, match="need --store milvus"):
        build_index(encoder, docs, tmp_path / "idx", milvus_uri=str(tmp_path / "x.db"))


def test_index_type_aliases_are_read_as_faiss_own_kinds(st_bert, encoder, docs, tmp_path):
    """Bug caught: `--index-type ivf-flat` / `ivf-pq` (FAISS' own names, and issue #33's) refused by the store check
    before they are read as ivf / ivfpq, or an index recorded under the alias (later commands key on the type)."""
    from embedkit.errors import ConfigError
    from embedkit.rag import build_index

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": d, **row}) + "\n" for d, row in docs.items()))
    out = tmp_path / "idx"
    result = run_cli("index", "-m", str(st_bert), "-c", str(corpus), "-o", str(out), "-q", "--index-type", "ivf-flat")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "embedkit_manifest.json").read_text())["index"]["type"] == "ivf"
    result = run_cli("index", "-m", str(st_bert), "-c", str(corpus), "-o", str(tmp_path / "pq"), "-q",
                     "--index-type", "ivf-pq")
    assert result.returncode == 2 and "ivfpq needs at least 9,984 documents" in result.stderr, result.stderr
    with pytest.raises(ConfigError, match="milvus store builds flat, hnsw"):
        build_index(encoder, docs, tmp_path / "m", store="milvus", index_type="ivf-flat")


def test_milvus_lite_file_held_by_another_handle_is_searched_through_a_copy(encoder, docs, tmp_path):
    """Milvus Lite lets one handle hold a file: a second reader (`rag query` while `rag web` runs) searches a
    private copy, with the same results, and removes the copy when closed."""
    from embedkit.rag import RagIndex, build_index

    path = tmp_path / "idx"
    first = build_index(encoder, docs, path, store="milvus")
    expected = [(h.doc_id, h.score) for h in first.search(encoder, "fever", k=5)]  # `first` holds the file now
    second = RagIndex.load(path)
    assert [(h.doc_id, h.score) for h in second.search(encoder, "fever", k=5)] == expected
    private = second.vectors._lite.private
    assert private is not None and not private.startswith(str(tmp_path))
    second.close()
    assert not __import__("os").path.exists(private)
    first.close()


def test_milvus_at_an_outside_uri_is_changed_in_place(encoder, docs, tmp_path):
    """--milvus-uri (a server in production; here a Milvus Lite file outside the folder, which the code treats the
    same way): the manifest records the URI and collection, add / delete change that collection in place, and a
    rebuild refuses to drop a collection embedkit did not make."""
    from embedkit.errors import ConfigError
    from embedkit.rag import RagIndex, build_index

    uri = str(tmp_path / "server.db")
    index = build_index(encoder, docs, tmp_path / "my-index", store="milvus", milvus_uri=uri)
    record = index.manifest["index"]["milvus"]
    assert record["uri"] == uri and record["collection"] == "embedkit_rag_my_index" and record["embedded"] is False
    assert not (tmp_path / "my-index" / "vectors.milvus.db").exists() and index.manifest["index"]["file"] is None
    assert index.vectors.in_place
    index.delete(["d01"])
    index.add(encoder, {"n1": {"text": "fever", "metadata": {"source": "manual"}}})
    index.close()
    reloaded = RagIndex.load(tmp_path / "my-index")
    found = {h.doc_id for h in reloaded.search(encoder, "fever", k=20)}
    assert "n1" in found and "d01" not in found and len(found) == len(docs)
    assert reloaded.vectors.ntotal == len(docs)
    reloaded.close()

    from pymilvus import DataType, MilvusClient

    client = MilvusClient(uri)  # someone else's collection on that "server"
    schema = MilvusClient.create_schema(auto_id=True)
    schema.add_field("pk", DataType.INT64, is_primary=True)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    client.create_collection("theirs", schema=schema)
    client.close()
    with pytest.raises(ConfigError, match="was not made by embedkit") as err:
        build_index(encoder, docs, tmp_path / "other", store="milvus", milvus_uri=uri, milvus_collection="theirs")
    assert err.value.field == "milvus-collection"
