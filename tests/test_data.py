"""Tests of embedkit.data: readers, validation errors (file, line, field), STS-B default, `data check`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from embedkit.data import (  # noqa: E402
    TrainingExample,
    check_path,
    format_summary,
    load_beir,
    load_sts,
    load_stsb,
    pairs_from_beir,
    read_examples,
    stsb_paraphrase_retrieval,
)
from embedkit.errors import DataError  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def make_beir(root: Path, *, corpus=None, queries=None, qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(
        root / "corpus.jsonl",
        corpus
        or [
            {"_id": "d1", "title": "Title one", "text": "Body one. "},
            {"_id": "d2", "title": "", "text": "  Body two"},
            {"_id": "d3", "text": "Body three"},
        ],
    )
    write_jsonl(
        root / "queries.jsonl",
        queries or [{"_id": "q1", "text": "first?"}, {"_id": "q2", "text": "second?"}, {"_id": "q3", "text": "unjudged"}],
    )
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / "test.tsv").write_text(qrels, encoding="utf-8")
    return root


def raises_data_error(fn, *args, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------- BEIR


def test_load_beir_reads_all_queries_and_joins_documents_like_mteb(tmp_path):
    ds = load_beir(make_beir(tmp_path / "b"))
    assert list(ds.corpus) == ["d1", "d2", "d3"]
    assert ds.corpus["d3"] == {"title": "", "text": "Body three"}
    assert ds.queries == {"q1": "first?", "q2": "second?", "q3": "unjudged"}  # unjudged kept
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}  # header line skipped
    assert ds.split == "test" and ds.judged_query_ids() == ["q1", "q2"]
    # mteb 2.26 _corpus_to_dict: (title + " " + text).strip() with a title, else text.strip()
    assert ds.document_texts() == ["Title one Body one.", "Body two", "Body three"]
    assert ds.document_texts(["d3", "d1"]) == ["Body three", "Title one Body one."]


def test_qrels_without_header_and_float_scores(tmp_path):
    ds = load_beir(make_beir(tmp_path / "b", qrels="q1\td1\t1.0\nq2\td2\t0\n"))
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 0}}
    assert list(ds.relevant_pairs()) == [("q1", "d1", 1)]  # score 0 is not relevant


def test_broken_json_line_names_file_and_line(tmp_path):
    root = make_beir(tmp_path / "b")
    lines = (root / "corpus.jsonl").read_text().splitlines()
    lines[2] = '{"_id": "d3", "text": "unterminated'
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    err = raises_data_error(load_beir, root)
    assert err.line == 3 and err.path.endswith("corpus.jsonl")
    assert "corpus.jsonl:3: invalid JSON" in str(err)


def test_missing_text_field_names_field(tmp_path):
    root = make_beir(tmp_path / "b", queries=[{"_id": "q1", "text": "a"}, {"_id": "q2", "txt": "b"}])
    err = raises_data_error(load_beir, root)
    assert (Path(err.path).name, err.line, err.field) == ("queries.jsonl", 2, "text")


def test_missing_id_and_duplicate_id(tmp_path):
    root = make_beir(tmp_path / "a", corpus=[{"_id": "d1", "text": "x"}, {"text": "no id"}])
    err = raises_data_error(load_beir, root)
    assert (err.line, err.field) == (2, "_id")
    root = make_beir(tmp_path / "b", corpus=[{"_id": "d1", "text": "x"}, {"_id": "d2", "text": "y"}, {"_id": "d1", "text": "z"}])
    err = raises_data_error(load_beir, root)
    assert (Path(err.path).name, err.line, err.field) == ("corpus.jsonl", 3, "_id")
    assert "duplicate document id 'd1'" in err.message


def test_qrels_with_unknown_ids(tmp_path):
    err = raises_data_error(load_beir, make_beir(tmp_path / "a", qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\tnope\t1\n"))
    assert (Path(err.path).name, err.line, err.field) == ("test.tsv", 3, "corpus-id")
    err = raises_data_error(load_beir, make_beir(tmp_path / "b", qrels="qX\td1\t1\n"))
    assert (err.line, err.field) == (1, "query-id")


def test_qrels_bad_score_after_first_line_and_missing_split(tmp_path):
    err = raises_data_error(load_beir, make_beir(tmp_path / "a", qrels="q1\td1\t1\nq2\td2\thigh\n"))
    assert (err.line, err.field) == (2, "score")
    err = raises_data_error(load_beir, make_beir(tmp_path / "h", qrels="q1\td1\thigh\nq2\td2\t1\n"))
    assert (err.line, err.field) == (1, "score")  # a data line is never mistaken for a header
    err = raises_data_error(load_beir, make_beir(tmp_path / "b"), split="dev")
    assert "split 'dev'" in err.message and "available: test" in err.message
    err = raises_data_error(load_beir, tmp_path / "missing")
    assert "not found" in err.message


def test_data_hash_follows_the_data(tmp_path):
    first = load_beir(make_beir(tmp_path / "a")).data_hash()
    assert first == load_beir(make_beir(tmp_path / "b")).data_hash()  # same content, other folder
    assert first != load_beir(make_beir(tmp_path / "c", qrels="q1\td1\t1\n")).data_hash()
    other_text = [{"_id": "d1", "title": "Title one", "text": "Body ONE"}, {"_id": "d2", "text": "Body two"}, {"_id": "d3", "text": "x"}]
    assert first != load_beir(make_beir(tmp_path / "d", corpus=other_text)).data_hash()


def test_pairs_from_beir_keeps_relevant_judgments_in_order(tmp_path):
    ds = load_beir(make_beir(tmp_path / "b", qrels="q2\td2\t1\nq1\td3\t0\nq1\td1\t2\nq1\td2\t1\n"))
    pairs = pairs_from_beir(ds)
    assert [(p.query, p.positive) for p in pairs] == [
        ("first?", "Title one Body one."),
        ("first?", "Body two"),
        ("second?", "Body two"),
    ]
    assert all(p.negatives == [] for p in pairs)


# ---------------------------------------------------------------- STS


def test_load_sts_jsonl_csv_tsv(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 4.5}, {"sentence1": "c", "sentence2": "d", "score": "1"}])
    (tmp_path / "b.csv").write_text('sentence1,sentence2,score\n"a, quoted",b,4.5\nc,d,1\n')
    (tmp_path / "c.tsv").write_text('score\tsentence1\tsentence2\n4.5\t"a\tb\n1\tc\td\n')
    for path in (jsonl, tmp_path / "b.csv", tmp_path / "c.tsv"):
        ds = load_sts(path)
        assert len(ds) == 2 and ds.sentences2 == ["b", "d"]
        np.testing.assert_array_equal(ds.scores, [4.5, 1.0])
    assert load_sts(tmp_path / "b.csv").sentences1[0] == "a, quoted"
    assert load_sts(tmp_path / "c.tsv").sentences1[0] == '"a'  # quotes kept verbatim in TSV
    assert load_sts(jsonl).data_hash() != load_sts(tmp_path / "b.csv").data_hash()


def test_sts_without_score_names_file_and_field(tmp_path):
    (tmp_path / "s.csv").write_text("sentence1,sentence2\na,b\n")
    err = raises_data_error(load_sts, tmp_path / "s.csv")
    assert err.field == "score" and err.path.endswith("s.csv")
    jsonl = write_jsonl(tmp_path / "s.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 1}, {"sentence1": "a", "sentence2": "b"}])
    err = raises_data_error(load_sts, jsonl)
    assert (err.line, err.field) == (2, "score")
    write_jsonl(jsonl, [{"sentence1": "a", "sentence2": "b", "score": "high"}])
    assert raises_data_error(load_sts, jsonl).field == "score"


def test_stsb_default_test_split():
    ds = load_stsb("test")
    assert len(ds) == 1379 and len(ds.sentences1) == len(ds.sentences2) == 1379
    assert ds.scores.min() >= 0.0 and ds.scores.max() <= 5.0
    assert ds.sentences1[0] == "A girl is styling her hair." and ds.scores[0] == 2.5
    assert not any("\t" in s for s in ds.sentences1 + ds.sentences2)  # extra columns never leak into a sentence


def test_stsb_paraphrase_retrieval_is_consistent():
    sts = load_stsb("test")
    ds = stsb_paraphrase_retrieval("test")
    assert len(ds.corpus) == len(set(sts.sentences2))
    doc_text = {row["text"]: doc_id for doc_id, row in ds.corpus.items()}
    expected = {(s1, s2) for s1, s2, score in zip(sts.sentences1, sts.sentences2, sts.scores) if score >= 4.0}
    found = {(ds.queries[qid], ds.corpus[did]["text"]) for qid, docs in ds.qrels.items() for did in docs}
    assert found == expected and len(doc_text) == len(ds.corpus)
    assert stsb_paraphrase_retrieval("test").data_hash() == ds.data_hash()  # ids are deterministic


# ---------------------------------------------------------------- training tuples


def test_jsonl_pairs_and_negatives_list(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"query": "q1", "positive": "p1", "extra": 1},
            {"query": "q2", "positive": "p2", "negatives": ["n1", "n2"], "scores": [0.9, 0.2, 0.1]},
        ],
    )
    examples = list(read_examples(path))
    assert examples == [
        TrainingExample("q1", "p1"),
        TrainingExample("q2", "p2", ["n1", "n2"], [0.9, 0.2, 0.1]),
    ]


def test_jsonl_bad_row_names_line_and_field(tmp_path):
    rows = [{"query": "a", "positive": "b"}, {"query": "c", "positive": "d"}, {"query": "e"}]
    err = raises_data_error(lambda: list(read_examples(write_jsonl(tmp_path / "t.jsonl", rows))))
    assert (err.line, err.field) == (3, "positive")
    rows[2] = {"query": "e", "positive": "f", "negatives": "not a list"}
    err = raises_data_error(lambda: list(read_examples(write_jsonl(tmp_path / "t.jsonl", rows))))
    assert (err.line, err.field) == (3, "negatives")
    rows[2] = {"query": "e", "positive": "f", "negatives": ["n"], "scores": [1.0]}
    err = raises_data_error(lambda: list(read_examples(write_jsonl(tmp_path / "t.jsonl", rows))))
    assert (err.line, err.field) == (3, "scores") and "expected 2 scores" in err.message


def test_csv_with_column_mapping_and_json_list_cell(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('anchor,answer,hard\n"q, one",p1,"[""n1"", ""n2""]"\nq2,p2,\n')
    examples = list(read_examples(path, query="anchor", positive="answer", negatives="hard"))
    assert examples == [TrainingExample("q, one", "p1", ["n1", "n2"]), TrainingExample("q2", "p2", [])]


def test_csv_missing_column_and_bad_cell(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("query,answer\nq,p\n")
    err = raises_data_error(lambda: list(read_examples(path)))
    assert (err.line, err.field) == (1, "positive")
    path.write_text("query,positive,negatives\nq,p,[]\nq,p,[]\nq,p,oops\n")
    err = raises_data_error(lambda: list(read_examples(path)))
    assert (err.line, err.field) == (4, "negatives")


def test_tsv_negatives_by_pattern_in_natural_order(tmp_path):
    path = tmp_path / "t.tsv"
    header = ["query", "positive"] + [f"negative_{i}" for i in (10, 2, 1)]
    path.write_text("\t".join(header) + '\nq "1"\tp\tn10\tn2\tn1\nq2\tp2\t\t\tonly\n')
    examples = list(read_examples(path, negatives="negative_*"))
    assert examples[0] == TrainingExample('q "1"', "p", ["n1", "n2", "n10"])
    assert examples[1].negatives == ["only"]  # empty cells: fewer negatives in this row
    err = raises_data_error(lambda: list(read_examples(path, negatives="neg_*x")))
    assert err.field == "neg_*x"


def test_parquet_list_column_and_several_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    table = pa.table(
        {
            "q": ["q1", "q2", "q3"],
            "pos": ["p1", "p2", "p3"],
            "negs": [["a", "b"], [], ["c"]],
            "neg_x": ["x1", "x2", None],
            "neg_y": ["y1", None, "y3"],
        }
    )
    pq.write_table(table, path, row_group_size=2)
    as_list = list(read_examples(path, query="q", positive="pos", negatives="negs"))
    assert [e.negatives for e in as_list] == [["a", "b"], [], ["c"]]
    as_columns = list(read_examples(path, query="q", positive="pos", negatives=["neg_x", "neg_y"]))
    assert [e.negatives for e in as_columns] == [["x1", "y1"], ["x2"], ["y3"]]
    pq.write_table(pa.table({"query": ["a", "b", None], "positive": ["x", "y", "z"]}), path)
    err = raises_data_error(lambda: list(read_examples(path)))
    assert (err.line, err.field) == (3, "query")  # row number for Parquet


def test_empty_and_unknown_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    assert "empty" in raises_data_error(lambda: list(read_examples(tmp_path / "e.jsonl"))).message
    (tmp_path / "e.csv").write_text("")
    assert "empty" in raises_data_error(lambda: list(read_examples(tmp_path / "e.csv"))).message
    (tmp_path / "x.txt").write_text("q\tp\n")
    assert "suffix" in raises_data_error(lambda: list(read_examples(tmp_path / "x.txt"))).message
    (tmp_path / "x.txt").write_text("q\tp\nquestion\tanswer\n")
    assert list(read_examples(tmp_path / "x.txt", format="tsv", query="q", positive="p")) == [TrainingExample("question", "answer")]


def test_json_array_file(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps([{"query": "a", "positive": "b"}, {"query": "c", "positive": "d"}]))
    assert [e.query for e in read_examples(tmp_path / "t.json")] == ["a", "c"]


# ---------------------------------------------------------------- check


def test_check_detects_kinds_and_reports_broken_line_3(tmp_path):
    beir = check_path(make_beir(tmp_path / "b"))
    assert beir["kind"] == "beir" and beir["documents"] == 3 and beir["queries"] == 3
    assert beir["splits"]["test"] == {"judged_queries": 2, "judgments": 2, "relevant_judgments": 2, "judged_documents": 2}
    sts = check_path(write_jsonl(tmp_path / "s.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 2}]))
    assert (sts["kind"], sts["pairs"], sts["score_min"], sts["score_max"]) == ("sts", 1, 2.0, 2.0)
    rows = [{"query": "q", "positive": "p", "negatives": ["n1", "n2"]}, {"query": "", "positive": "p"}]
    tuples = check_path(write_jsonl(tmp_path / "t.jsonl", rows))
    assert (tuples["rows"], tuples["rows_with_negatives"], tuples["mean_negatives"], tuples["empty_texts"]) == (2, 1, 1.0, 1)
    broken = write_jsonl(tmp_path / "broken.jsonl", [rows[0], rows[0], '{"query": "q", ', rows[0]])
    err = raises_data_error(check_path, broken)
    assert err.line == 3 and "broken.jsonl:3:" in str(err)
    assert "not a BEIR" in raises_data_error(check_path, tmp_path / "b" / "qrels").message


def test_check_command_prints_summary_or_json(tmp_path):
    import typer
    from typer.testing import CliRunner

    from embedkit.data.cli import check_command

    app = typer.Typer()
    app.command()(check_command)
    path = tmp_path / "t.csv"
    path.write_text("a,b\nq,p\n")
    result = CliRunner().invoke(app, [str(path), "--query", "a", "--positive", "b", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rows"] == 1
    result = CliRunner().invoke(app, [str(path)])  # default columns are missing
    assert result.exit_code != 0 and isinstance(result.exception, DataError)
    assert result.exception.field == "query"


def test_check_real_scifact_and_other_shared_sets():
    scifact = check_path(SHARED_DATA / "scifact")
    assert (scifact["documents"], scifact["queries"]) == (5183, 1109)
    assert scifact["splits"]["test"]["judged_queries"] == 300 and scifact["splits"]["test"]["judgments"] == 339
    assert scifact["splits"]["train"]["judged_queries"] == 809 and scifact["splits"]["train"]["judgments"] == 919
    text = format_summary(scifact)
    assert "documents: 5,183" in text and "split test: judged queries 300, judgments 339" in text
    assert check_path(SHARED_DATA / "medquad" / "test")["splits"]["test"]["judged_queries"] == 1498
    assert check_path(SHARED_DATA / "sts" / "sick" / "test.jsonl")["pairs"] == 4927
    medquad = check_path(SHARED_DATA / "medquad" / "train_pairs.jsonl")
    assert (medquad["kind"], medquad["rows"], medquad["rows_with_negatives"]) == ("tuples", 14805, 0)
    assert len(pairs_from_beir(load_beir(SHARED_DATA / "scifact", "train"))) == 919


@pytest.mark.integration
def test_document_text_matches_mteb_itself():
    """Cross-check against mteb's own corpus formatting (slow import of mteb, hence integration)."""
    from mteb._create_dataloaders import _corpus_to_dict

    from embedkit.data import mteb_document_text

    for title, text in [("T", " body "), ("", " body "), (" ", "body"), ("T.", "")]:
        row = {"id": "x", "title": title, "text": text}
        assert mteb_document_text(title, text) == _corpus_to_dict(row)["text"]
