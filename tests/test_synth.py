"""`embedkit synth`: documents -> (query, positive) pairs or a synthetic eval set.

Tiny models from fixtures (never a download), a fake OpenAI-compatible endpoint (http.server in a thread), and
generator-free styles for what needs no model. Each test names the bug it catches.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from embedkit.cli import main
from embedkit.data.documents import Document, chunk_paragraphs, load_documents
from embedkit.errors import ConfigError
from embedkit.synth.filters import FilterReport, FilterSettings, cheap_filters, round_trip_filter
from embedkit.synth.generators.base import GenerationSettings, QueryGenerator
from embedkit.synth.prompts import clean_query, load_prompt_file, named_prompt
from embedkit.synth.run import SynthSettings, synthesize
from embedkit.synth.store import GENERATED_FILE
from embedkit.synth.styles import make_pair, queries_available, split_sentences

DOCS = [
    {"_id": "d1", "title": "Insulin", "text": "Insulin lowers the level of glucose in the blood. It is made in the "
                                              "pancreas. People with diabetes may need insulin injections."},
    {"_id": "d2", "title": "", "text": "The court ruled that the contract was void. Both parties had signed it "
                                       "under pressure. The ruling can be appealed."},
    {"_id": "d3", "title": "Asthma in children", "text": "Asthma in children is treated with inhalers. Most "
                                                         "children need a reliever and a preventer inhaler."},
    {"_id": "d4", "title": "Interest rates", "text": "Interest rates rose by half a percent this quarter. Banks "
                                                     "passed the rise on to borrowers within weeks."},
]


def write_corpus(folder: Path, docs=DOCS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", *args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------- documents (data layer)
def test_a_folder_of_text_files_is_cut_at_paragraphs_with_headings_as_titles(tmp_path):
    # Catches: a chunker that splits a paragraph that fits, loses a heading's title, or reads hidden files.
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# Setup\n\nInstall the tool.\nThen run it.\n\nSecond paragraph here.\n\n"
                                 "## Usage\n\nCall the command.\n")
    (folder / "sub" / "b.txt").write_text(("word " * 150 + "\n\n") * 2)
    (folder / ".hidden.txt").write_text("never read")
    docs = load_documents(folder)
    by_id = {d.doc_id: d for d in docs}
    assert by_id["a.md#1"] == Document("a.md#1", "Setup", "Install the tool. Then run it. Second paragraph here.")
    assert by_id["a.md#2"] == Document("a.md#2", "Usage", "Call the command.")
    # two 150-word paragraphs do not fit one 200-word passage: two passages, neither paragraph split
    assert [len(by_id[f"sub/b.txt#{n}"].text.split()) for n in (1, 2)] == [150, 150]
    assert not any("never" in d.text for d in docs)
    # a single paragraph longer than a passage becomes word windows
    assert [len(p.split()) for p in chunk_paragraphs(["w " * 450], 200)] == [200, 200, 50]


def test_rag_reads_documents_through_the_data_layer():
    # Catches: rag keeping its own copy of the reader (synth and rag index would then cut documents differently).
    import embedkit.rag as rag
    from embedkit.data import documents

    assert rag.load_documents is documents.load_documents and rag.Document is documents.Document


# ----------------------------------------------------------------------------------------- generator-free styles
def test_ict_takes_the_query_sentence_out_of_the_positive():
    # Catches: ICT leaving the query sentence inside the positive (the pair is then a string match), or two
    # queries of one document being the same sentence.
    doc = Document("d1", "Insulin", DOCS[0]["text"])
    sentences = split_sentences(doc.text)
    assert len(sentences) == 3 and queries_available("ict", doc, 5) == 3
    pairs = [make_pair("ict", doc, i, seed=1) for i in range(3)]
    assert sorted(p.query for p in pairs) == sorted(sentences)
    for pair in pairs:
        assert pair.query not in pair.positive
        assert pair.positive.startswith("Insulin ")  # the title stays, as the evaluation encodes it
        assert all(s in pair.positive for s in sentences if s != pair.query)
    assert queries_available("ict", Document("x", "", "One sentence only."), 2) == 0


def test_title_and_crop_styles():
    # Catches: a title query made from an empty title; crops outside Contriever's 10-50 % span length; crops that
    # change with the seed of another document (each item must have its own stream).
    assert queries_available("title", Document("d2", "", DOCS[1]["text"]), 3) == 0
    assert make_pair("title", Document("d1", "Insulin", "text here"), 0, 1).query == "Insulin"
    doc = Document("c", "", " ".join(f"w{i}" for i in range(100)))
    for index in range(20):
        pair = make_pair("crop", doc, index, seed=3)
        for span in (pair.query, pair.positive):
            words = span.split()
            assert 10 <= len(words) <= 50 and span in doc.text
    assert make_pair("crop", doc, 4, seed=3) == make_pair("crop", doc, 4, seed=3)
    assert make_pair("crop", doc, 4, seed=3) != make_pair("crop", doc, 4, seed=4)


# ---------------------------------------------------------------------------------------------------- filters
def _row(doc_id, query, positive="an unrelated positive text about something else", index=0):
    return {"doc_id": doc_id, "index": index, "query": query, "positive": positive}


def test_cheap_filters_count_what_each_removes():
    # Catches: a copied sentence kept; a short title that appears in its text removed as a copy; a repeated query
    # kept; counts that do not add up.
    positive = "insulin lowers the level of glucose in the blood and is made in the pancreas"
    rows = [
        _row("d1", "what does insulin do to blood sugar"),  # kept
        _row("d1", "Insulin lowers the level of glucose in the blood.", positive),  # copy
        _row("d1", "Insulin", positive),  # length (one word)
        _row("d2", "glucose pancreas", positive),  # kept: short, appears in the text, not a copy
        _row("d2", "What does insulin do to blood sugar?"),  # near duplicate (same words, other document)
        _row("d1", "what does insulin do to the blood sugar", index=1),  # near duplicate (Jaccard, same document)
        _row("d3", "!!! ???"),  # empty: no words
        _row("d3", " ".join(["word"] * 60)),  # length: too long
    ]
    report = FilterReport()
    kept = cheap_filters(rows, FilterSettings(), report)
    assert [r["query"] for r in kept] == ["what does insulin do to blood sugar", "glucose pancreas"]
    assert report.counts == {"empty": 1, "length": 2, "copy": 1, "near_duplicate": 2, "round_trip": 0}


def test_round_trip_filter_keeps_only_queries_whose_document_is_in_the_top_k():
    # Catches: the round-trip filter keeping a query whose source document is not in its top k (or checking the
    # wrong document, or ranks over the sample instead of the whole corpus).
    import numpy as np

    from embedkit.mine.vectors import ArraySource

    doc_ids = ["a", "b", "c", "d"]
    docs = ArraySource(np.eye(4, dtype=np.float32))
    rows = [_row("a", "about a"), _row("b", "about b, mostly c"), _row("c", "about d")]
    queries = np.array([[1, 0, 0, 0], [0, 0.6, 0.8, 0], [0, 0, 0, 1]], dtype=np.float32)
    report = FilterReport()
    kept = round_trip_filter(rows, doc_ids, docs, queries, 1, report)
    assert [r["query"] for r in kept] == ["about a"]
    assert report.counts["round_trip"] == 2
    kept2 = round_trip_filter(rows, doc_ids, docs, queries, 2, FilterReport())
    assert [r["query"] for r in kept2] == ["about a", "about b, mostly c"]


# ------------------------------------------------------------------------------------- output, resume, manifest
class CountingGenerator(QueryGenerator):
    """Replies "what about <first word of the passage> <n>"; can fail after some batches, like a killed run."""

    def __init__(self, fail_after: int | None = None, batch_size: int = 2) -> None:
        self.settings = GenerationSettings(batch_size=batch_size)
        self.prompts: list[str] = []
        self.calls = 0
        self.fail_after = fail_after

    def generate(self, prompts, *, seed):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # what Ctrl-C does in the middle of a run
        self.calls += 1
        self.prompts.extend(prompts)
        return [f"Question: what about {p.split('Passage: ')[1].split()[0].lower()} number {len(self.prompts) - len(prompts) + i}?"
                for i, p in enumerate(prompts)]

    def describe(self):
        return {"engine": "fake", "model": "counting", "sha256": "0" * 64, "settings": self.settings.to_dict()}


class FakeSpec:
    """What synthesize needs of a GeneratorSpec: an identity known before loading, and open()."""

    def __init__(self, generator: QueryGenerator) -> None:
        self.generator = generator
        self.opened = 0

    def identity(self):
        return {"engine": "fake", "model": "counting"}

    def open(self):
        self.opened += 1
        return self.generator


def test_an_interrupted_run_resumes_without_duplicates_or_losses(tmp_path):
    # Catches: a re-run that generates queries again (duplicates), loses the batches an interrupted run had
    # flushed, or keeps a half-written last line.
    corpus = write_corpus(tmp_path / "in")
    out = tmp_path / "out"
    settings = SynthSettings(style="question", prompt=named_prompt("question"), queries_per_doc=2)
    first = CountingGenerator(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        synthesize(corpus, out, settings, FakeSpec(first), show_progress=False)
    flushed = read_jsonl(out / GENERATED_FILE)
    assert len(flushed) == 4  # two batches of two, durable before the interruption
    with open(out / GENERATED_FILE, "a", encoding="utf-8") as f:
        f.write('{"doc_id": "d4", "index": 1, "que')  # the kill came in the middle of a line
    second = CountingGenerator()
    summary = synthesize(corpus, out, settings, FakeSpec(second), show_progress=False)
    rows = read_jsonl(out / GENERATED_FILE)
    keys = [(r["doc_id"], r["index"]) for r in rows]
    assert len(keys) == len(set(keys)) == 8
    assert len(second.prompts) == 4 and summary["generated_now"] == 4
    assert rows[:4] == flushed  # append-only: what was there is untouched
    third = FakeSpec(CountingGenerator())
    synthesize(corpus, out, settings, third, show_progress=False)
    # nothing left: the model is not even loaded (a re-run that only re-filters costs no generator start)
    assert third.opened == 0 and len(read_jsonl(out / GENERATED_FILE)) == 8


def test_batches_are_length_sorted(tmp_path):
    # Catches: batches in corpus order, so a long prompt pads a batch of short ones.
    docs = [{"_id": f"d{i}", "title": "", "text": "word " * n} for i, n in enumerate([50, 3, 40, 5, 45, 4])]
    corpus = write_corpus(tmp_path / "in", docs)
    gen = CountingGenerator(batch_size=2)
    synthesize(corpus, tmp_path / "out", SynthSettings(style="question", prompt=named_prompt("question")),
               FakeSpec(gen), show_progress=False)
    lengths = [len(p) for p in gen.prompts]
    assert lengths == sorted(lengths)


def test_training_output_manifest_and_refused_settings_change(tmp_path):
    # Catches: pairs that `embedkit train` cannot read; a manifest without generator hash, prompt, seed or filter
    # counts; a re-run with another style silently mixing two runs in one file.
    from embedkit.data.tuples import read_examples
    from embedkit.manifest import MANIFEST_NAME

    corpus = write_corpus(tmp_path / "in")
    out = tmp_path / "out"
    settings = SynthSettings(style="question", prompt=named_prompt("question"), seed=7)
    synthesize(corpus, out, settings, FakeSpec(CountingGenerator()), show_progress=False)
    examples = list(read_examples(out / "pairs.jsonl"))
    assert len(examples) == 4 and examples[0].query.startswith("what about insulin")
    assert examples[0].positive == "Insulin " + DOCS[0]["text"]  # title + text, as eval encodes the document
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["generator"]["sha256"] == "0" * 64 and manifest["seed"] == 7
    assert manifest["prompt"]["name"] == "question" and manifest["prompt"]["sha256"]
    assert manifest["filters"]["removed"]["copy"] == 0 and manifest["counts"]["kept"] == 4
    assert manifest["command_line"]
    assert [json.loads(x)["_id"] for x in (out / "corpus.jsonl").read_text().splitlines()] == ["d1", "d2", "d3", "d4"]
    with pytest.raises(ConfigError, match="other settings"):
        synthesize(corpus, out, SynthSettings(style="ict"), show_progress=False)


def test_sample_is_seeded(tmp_path):
    # Catches: an unseeded sample (runs not reproducible) or a sample that ignores the seed.
    docs = [{"_id": f"d{i}", "title": f"title {i}", "text": f"text {i}"} for i in range(30)]
    corpus = write_corpus(tmp_path / "in", docs)

    def chosen(seed, name):
        synthesize(corpus, tmp_path / name, SynthSettings(style="title", sample=5, seed=seed, filters=FilterSettings(
            min_words=1)), show_progress=False)
        return [r["doc_id"] for r in read_jsonl(tmp_path / name / "pairs.jsonl")]

    assert chosen(1, "a") == chosen(1, "b") != chosen(2, "c")
    assert len(chosen(1, "a")) == 5


def test_a_free_style_ignores_generator_options(tmp_path, capsys):
    # Catches: --style ict refusing to run on a machine without vllm because --engine vllm was also given (a
    # generator-free style must not check, let alone load, a generator).
    corpus = write_corpus(tmp_path / "in")
    code, out, err = run_cli(capsys, str(corpus), "-o", str(tmp_path / "out"), "--style", "title", "--engine", "vllm")
    assert code == 0, err
    # d2 has no title: 3 queries; "Insulin" is one word, under the default --min-words 2: 2 kept
    assert "3 queries from 4 of 4 documents" in out and "; 2 kept" in out


# ------------------------------------------------------------------------------------------------- generators
def test_transformers_generator_on_a_tiny_llama(tmp_path, capsys, tiny_llama_dir, one_torch_thread):
    # Catches: the in-process generator not loading a causal-LM folder, unseeded sampling (same seed, other
    # queries), a manifest without the weights' hash, a resumed run that loads but regenerates.
    from embedkit.manifest import sha256_dir

    corpus = write_corpus(tmp_path / "in")
    common = [str(corpus), "-m", str(tiny_llama_dir), "-k", "2", "--max-new-tokens", "6", "--batch-size", "3",
              "--min-words", "1", "--device", "cpu"]
    code, out, err = run_cli(capsys, *common, "-o", str(tmp_path / "a"))
    assert code == 0, err
    assert "8 queries from 4 of 4 documents" in out
    code, _, err = run_cli(capsys, *common, "-o", str(tmp_path / "b"))
    assert code == 0, err
    a, b = read_jsonl(tmp_path / "a" / GENERATED_FILE), read_jsonl(tmp_path / "b" / GENERATED_FILE)
    assert a == b and len(a) == 8
    manifest = json.loads((tmp_path / "a" / "embedkit_manifest.json").read_text())
    assert manifest["generator"]["engine"] == "transformers"
    assert manifest["generator"]["sha256"] == sha256_dir(tiny_llama_dir)
    code, out, _ = run_cli(capsys, *common, "-o", str(tmp_path / "a"))
    assert code == 0 and "(0 generated now)" in out


class FakeEndpoint:
    """An OpenAI-compatible chat endpoint in a thread: records requests, replies with `reply(prompt)`."""

    def __init__(self, reply, status: int = 200) -> None:
        self.requests: list[tuple[str, dict, dict]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                endpoint.requests.append((self.path, dict(self.headers), {}))
                self._send({"object": "list", "data": [{"id": "fake-model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append((self.path, dict(self.headers), body))
                text = reply(body["messages"][-1]["content"])
                self._send({"model": body["model"], "choices": [{"index": 0, "message": {
                    "role": "assistant", "content": text}, "finish_reason": "stop"}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _question_about(prompt: str) -> str:
    passage = prompt.split("Passage: ", 1)[-1]
    return f'Query: "what is said about {" ".join(passage.split()[1:4]).lower()}"'


def test_api_endpoint_with_round_trip_filter(tmp_path, capsys, monkeypatch, st_bert, one_torch_thread):
    # Catches: requests without the model name, the seed or the key from the environment; a key written to a
    # file; replies not cleaned ("Query:" and quotes kept); the round-trip filter not wired to --filter-model.
    monkeypatch.setenv("EMBEDKIT_API_KEY", "sk-secret-test")
    corpus = write_corpus(tmp_path / "in")
    out = tmp_path / "out"
    with FakeEndpoint(_question_about) as endpoint:
        code, stdout, err = run_cli(capsys, str(corpus), "-o", str(out), "--api-base", endpoint.url + "/v1",
                                    "--round-trip-k", "4", "--filter-model", str(st_bert), "--device", "cpu")
    assert code == 0, err
    assert endpoint.requests[0][0] == "/v1/models"  # no --api-model: the endpoint's first model
    posts = [r for r in endpoint.requests if r[0] == "/v1/chat/completions"]
    assert len(posts) == 4
    assert all(r[2]["model"] == "fake-model" and isinstance(r[2]["seed"], int) for r in posts)
    assert all(r[1]["Authorization"] == "Bearer sk-secret-test" for r in posts)
    pairs = read_jsonl(out / "pairs.jsonl")
    assert pairs and pairs[0]["query"] == "what is said about insulin lowers the"
    assert pairs[0]["source"] == "api:fake-model"
    # k = 4 = the whole corpus: every source document is in the top 4, so round trip removes nothing
    assert json.loads((out / "filters.json").read_text())["filter_model"]["name"] == str(st_bert)
    assert "filter round_trip      removed 0" in stdout
    for path in out.rglob("*"):
        if path.is_file():
            assert "sk-secret-test" not in path.read_text(encoding="utf-8")


def test_custom_prompt_file_reaches_the_generator(tmp_path, capsys):
    # Catches: --prompt-file ignored (the named prompt sent instead), Jinja2 templates not rendered, and a
    # template without {document} accepted.
    corpus = write_corpus(tmp_path / "in")
    prompt = tmp_path / "prompt.j2"
    prompt.write_text("Title: {{ title }}\nWrite a query for: {{ document }}")
    seen = []
    with FakeEndpoint(lambda p: seen.append(p) or "how to use insulin") as endpoint:
        code, _, err = run_cli(capsys, str(corpus), "-o", str(tmp_path / "out"), "--api-base", endpoint.url,
                               "--api-model", "m", "--prompt-file", str(prompt), "--sample", "1", "--seed", "0")
    assert code == 0, err
    assert len(seen) == 1 and seen[0].startswith("Title: ") and "Write a query for: " in seen[0]
    assert read_jsonl(tmp_path / "out" / "pairs.jsonl")[0]["style"] == "custom"
    bad = tmp_path / "bad.txt"
    bad.write_text("Write a query.")
    with pytest.raises(ConfigError, match="never inserts the document"):
        load_prompt_file(bad)
    assert clean_query('\n  Question: "What is X?"\nSure!') == "What is X?"


# --------------------------------------------------------------------------------------- bad input, one line each
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_is_one_line_exit_3_and_writes_nothing(tmp_path, capsys):
    # Catches: a traceback instead of one line, exit code 0/1, or output files left by a run that never started.
    corpus = write_corpus(tmp_path / "in")
    url = f"http://127.0.0.1:{_closed_port()}"
    code, _, err = run_cli(capsys, str(corpus), "-o", str(tmp_path / "out"), "--api-base", url)
    assert code == 3
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [err.strip().splitlines()[-1]] and errors[0].startswith(f"error: cannot reach {url}/v1/models")
    assert not (tmp_path / "out").exists()


def test_an_endpoint_error_is_one_line_with_its_status(tmp_path, capsys):
    # Catches: an HTTP error from the endpoint shown as a traceback, or without its status and body.
    corpus = write_corpus(tmp_path / "in")
    with FakeEndpoint(lambda p: "x", status=500) as endpoint:
        code, _, err = run_cli(capsys, str(corpus), "-o", str(tmp_path / "out"), "--api-base", endpoint.url)
    assert code == 3
    assert err.strip().splitlines()[-1].startswith(f"error: {endpoint.url}/v1/models answered HTTP 500")


def test_a_generator_that_returns_nothing_stops_the_run(tmp_path, capsys):
    # Catches: a run that "succeeds" with zero queries when the generator says nothing at all.
    corpus = write_corpus(tmp_path / "in")
    with FakeEndpoint(lambda p: "   ") as endpoint:
        code, _, err = run_cli(capsys, str(corpus), "-o", str(tmp_path / "out"), "--api-base", endpoint.url,
                               "--api-model", "m")
    last = err.strip().splitlines()[-1]  # after the progress log line: the error, in one line
    assert code == 3 and last.startswith("error: the generator returned no text for any of the 4 prompts")
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1
    assert not (tmp_path / "out" / "pairs.jsonl").exists()


def test_vllm_engine_without_vllm_is_one_line(tmp_path, capsys):
    # Catches: an ImportError traceback on a machine without vllm or CUDA.
    corpus = write_corpus(tmp_path / "in")
    code, _, err = run_cli(capsys, str(corpus), "-o", str(tmp_path / "out"), "--engine", "vllm")
    assert code == 3
    assert len(err.strip().splitlines()) == 1 and "--engine vllm needs" in err


def test_bad_corpora_are_named_in_one_line(tmp_path, capsys):
    # Catches: an empty corpus or a document without text accepted (or reported without file, line and field).
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run_cli(capsys, str(empty), "-o", str(tmp_path / "o1"), "--style", "ict")
    assert code == 2 and err.strip() == f"error: {empty}: no documents in corpus file"
    docs = DOCS[:2] + [{"_id": "blank", "title": "t", "text": "  "}]
    corpus = write_corpus(tmp_path / "in", docs)
    code, _, err = run_cli(capsys, str(corpus), "-o", str(tmp_path / "o2"), "--style", "ict")
    assert code == 2 and err.strip() == f"error: {corpus}:3: field 'text': document 'blank' has no text"
    code, _, err = run_cli(capsys, str(corpus), "-o", str(tmp_path / "o3"), "--style", "nonsense")
    assert code == 2 and "unknown style 'nonsense'" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ------------------------------------------------------------------------------------------------------ eval set
def test_eval_set_is_a_beir_folder_marked_synthetic_in_eval_reports(tmp_path, capsys, st_bert, one_torch_thread):
    # Catches: an eval folder `embedkit eval` cannot read, qrels pointing at the wrong document, an eval report
    # that does not say its queries were generated, and --eval with a style whose query is inside its document.
    from embedkit.data.beir import load_beir

    corpus = write_corpus(tmp_path / "in")
    out = tmp_path / "eval"
    with FakeEndpoint(_question_about) as endpoint:
        code, _, err = run_cli(capsys, str(corpus), "-o", str(out), "--eval", "--api-base", endpoint.url,
                               "--api-model", "m")
    assert code == 0, err
    ds = load_beir(out, "test")
    assert len(ds.queries) == 4 and not (out / "pairs.jsonl").exists()
    for qid, judged in ds.qrels.items():
        assert list(judged) == [qid.split(":")[1]]
    assert json.loads((out / "synthetic.json").read_text())["synthetic"] is True
    report_path = tmp_path / "report.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "-m", str(st_bert), "-t", f"beir:{out}:test", "-o", str(report_path), "--device", "cpu"])
    assert exit_info.value.code == 0
    report = json.loads(report_path.read_text())
    (data,) = report["manifest"]["data"].values()
    assert data["synthetic"]["made_by"] == "embedkit synth"
    assert "synthetic queries" in report_path.with_suffix(".md").read_text()
    assert "synthetic queries (made by embedkit synth, style question)" in capsys.readouterr().out
    # rag eval over an index of the same corpus says so too, in its output and its JSON
    with pytest.raises(SystemExit):
        main(["rag", "index", "-m", str(st_bert), "--corpus", str(out), "-o", str(tmp_path / "index"),
              "--device", "cpu"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["rag", "eval", str(tmp_path / "index"), "--beir", str(out), "-o", str(tmp_path / "rag.json"),
              "--latency-queries", "0", "--device", "cpu"])
    assert exit_info.value.code == 0
    assert "synthetic queries" in capsys.readouterr().out
    assert json.loads((tmp_path / "rag.json").read_text())["synthetic"]["synthetic"] is True
    code, _, err = run_cli(capsys, str(corpus), "-o", str(tmp_path / "e2"), "--eval", "--style", "ict")
    assert code == 2 and "--eval needs a generator style" in err
    # the eval folder's queries cannot become training pairs by a re-run without --eval
    with FakeEndpoint(_question_about) as endpoint:
        code, _, err = run_cli(capsys, str(corpus), "-o", str(out), "--api-base", endpoint.url, "--api-model", "m")
    assert code == 2 and "eval_set: True then, False now" in err
    assert not (out / "pairs.jsonl").exists()
