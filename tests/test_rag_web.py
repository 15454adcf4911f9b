"""The RAG search page: rendered server-side, checked in headless Chromium (DOM + screenshot) and over HTTP."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import CORPUS

CHROMIUM_FLAGS = [  # without these, a closed network makes Chromium hang on lookups and updates
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "Debian's chromium is needed (scripts/test.sh installs it where it may: apt-get install chromium)"
    return exe


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                          capture_output=True, text=True, timeout=120)


class PageParser(HTMLParser):
    """Collects what the assertions need: the search box, the hits, <mark>s, the answer and its citation links."""

    def __init__(self) -> None:
        super().__init__()
        self.query_value = None
        self.hits: list[dict] = []
        self.marks: list[str] = []
        self.citations: list[tuple[str, str]] = []
        self.answer_text = ""
        self.error = ""
        self.notice = ""
        self._stack: list[tuple[str, dict]] = []

    def _inside(self, cls: str) -> bool:
        return any(cls in (a.get("class") or "").split() or a.get("id") == cls for _, a in self._stack)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "input" and a.get("name") == "q":
            self.query_value = a.get("value")
        if tag == "li" and "hit" in (a.get("class") or ""):
            self.hits.append({"rank": int(a["data-rank"]), "score": float(a["data-score"]),
                              "doc_id": a["data-doc-id"], "id": a["id"], "text": ""})
        if tag not in ("input", "meta", "br", "option"):  # void elements never close
            self._stack.append((tag, a))

    def handle_endtag(self, tag):
        while self._stack:
            if self._stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if not self._stack:
            return
        tag, attrs = self._stack[-1]
        if tag == "mark":
            self.marks.append(data)
        if self._inside("passage") and self.hits:
            self.hits[-1]["text"] += data
        if self._inside("answer"):
            self.answer_text += data
            if tag == "a" and "cite" in (attrs.get("class") or ""):
                self.citations.append((attrs["href"], data))
        if self._inside("error"):
            self.error += data
        if self._inside("notice"):
            self.notice += data


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    return parser


@pytest.fixture(scope="module")
def web_index(st_bert, tmp_path_factory):
    from embedkit.models import load_model
    from embedkit.rag import build_index

    encoder = load_model(st_bert)
    docs = {f"doc{i}": {"title": "", "text": t} for i, t in enumerate(dict.fromkeys(CORPUS))}
    docs["xss"] = {"title": "<b>bold</b> title", "text": "fever <script>alert('x')</script> & cough"}
    index = build_index(encoder, docs, tmp_path_factory.mktemp("web") / "idx")
    return index, encoder


class RecordingAnswerer:
    """A deterministic answerer that cites the first two passages and remembers what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, question: str, passages: list[str]) -> str:
        self.calls.append((question, passages))
        return f"Fever and cough are covered by [1] and [2]; see also [9] <i>unlisted</i>."


def test_search_page_in_headless_chromium(web_index, tmp_path):
    from embedkit.rag import create_web_app
    from embedkit.serve.server import BackgroundServer

    index, encoder = web_index
    answerer = RecordingAnswerer()
    app = create_web_app(index, encoder, answerer=answerer)
    shot = tmp_path / "page.png"
    with BackgroundServer(app) as server:
        url = f"{server.url}/?q=fever+and+cough&k=5"
        dom = chromium(url, tmp_path / "profile-dom", "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        png = chromium(url, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1100,1300",
                       "--hide-scrollbars")
        assert png.returncode == 0, png.stderr[-2000:]

    page = parse(dom.stdout)
    assert page.query_value == "fever and cough"  # the query stays in the box
    assert [h["rank"] for h in page.hits] == [1, 2, 3, 4, 5]
    scores = [h["score"] for h in page.hits]
    assert scores == sorted(scores, reverse=True)
    expected = index.search(encoder, "fever and cough", k=5)
    assert [h["doc_id"] for h in page.hits] == [h.doc_id for h in expected]
    assert page.marks and all(m.lower().startswith(("fever", "cough")) for m in page.marks)
    assert any(m.lower() == "fever" for m in page.marks)
    # The answer shows with its citations linked to the listed passages; [9] is no passage, so no link.
    assert page.citations == [("#hit-1", "[1]"), ("#hit-2", "[2]")]
    assert "[9]" in page.answer_text and "<i>unlisted</i>" in page.answer_text  # escaped, shown as text
    assert {h["id"] for h in page.hits} >= {"hit-1", "hit-2"}
    (question, passages), *_ = answerer.calls
    assert question == "fever and cough" and len(passages) == 5
    assert passages[0].endswith(expected[0].text)

    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a rendered page, not a blank canvas
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1100, 1300)


def test_empty_query_in_headless_chromium(web_index, tmp_path):
    """Submitting the form empty (q present, blank) shows a message, never hits; no q at all is the start page."""
    from embedkit.rag import create_web_app
    from embedkit.serve.server import BackgroundServer

    index, encoder = web_index
    answerer = RecordingAnswerer()
    with BackgroundServer(create_web_app(index, encoder, answerer=answerer)) as server:
        dom = chromium(f"{server.url}/?q=+++&k=5", tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = parse(dom.stdout)
    assert page.hits == [] and page.notice == "Type a question or a few words to search for."
    assert page.error == "" and page.answer_text == "" and answerer.calls == []
    assert page.query_value == "   "


def test_empty_query_is_a_400(web_index):
    from fastapi.testclient import TestClient

    from embedkit.rag import create_web_app

    index, encoder = web_index
    client = TestClient(create_web_app(index, encoder))
    for params in ({"q": ""}, {"q": "  \t "}, {}):
        response = client.get("/api/search", params={**params, "k": 3})
        assert response.status_code == 400
        assert response.json() == {"error": "field 'q': the query is empty: give some words to search for"}
    start = parse(client.get("/").text)
    assert start.notice == "" and start.hits == [] and start.error == ""
    blank = client.get("/", params={"q": ""})
    assert blank.status_code == 200 and parse(blank.text).notice and parse(blank.text).hits == []


@pytest.mark.parametrize("store", ["faiss", "milvus"])
def test_rag_web_follows_index_swaps(st_bert, tmp_path, monkeypatch, store):
    """`rag add` / `rag delete` from another process swap in a new folder: the running page serves it at once
    (deleted documents never again), and reloads only then; on either vector store."""
    from fastapi.testclient import TestClient

    from embedkit.models import load_model
    from embedkit.rag import RagIndex, build_index, create_web_app

    encoder = load_model(st_bert)
    docs = {f"doc{i}": {"title": "", "text": t} for i, t in enumerate(dict.fromkeys(CORPUS))}
    path = tmp_path / "idx"
    client = TestClient(create_web_app(build_index(encoder, docs, path, store=store), encoder))
    loads = []
    real_load = RagIndex.load.__func__
    monkeypatch.setattr(RagIndex, "load", classmethod(lambda cls, p: loads.append(p) or real_load(cls, p)))

    def ids(q: str) -> list[str]:
        body = client.get("/api/search", params={"q": q, "k": 20})
        assert body.status_code == 200, body.text
        return [r["doc_id"] for r in body.json()["results"]]

    assert "doc1" in ids("diabetes blood sugar") and "doc1" in ids("insulin") and loads == []  # no change, no reload

    other = real_load(RagIndex, path)  # another writer's handle, as `embedkit rag delete` would hold
    other.delete(["doc1"])
    loads.clear()  # the writer's own reload
    assert "doc1" not in ids("diabetes blood sugar")
    assert "doc1" not in ids("diabetes") and len(loads) == 1  # reloaded once, then current
    page = parse(client.get("/", params={"q": "diabetes blood sugar", "k": 20}).text)
    assert page.hits and "doc1" not in {h["doc_id"] for h in page.hits}
    assert client.get("/health").json()["index"]["documents"] == len(docs) - 1

    other.add(encoder, {"new": "a diabetes clinic opened downtown"})
    loads.clear()
    assert "new" in ids("diabetes clinic") and len(loads) == 1
    build_index(encoder, {"only": "a single passage about guitars"}, path, store=store)  # rebuilt from scratch
    assert ids("guitar") == ["only"] and client.get("/health").json()["index"]["documents"] == 1


def test_page_escapes_corpus_and_query_html(web_index):
    from fastapi.testclient import TestClient

    from embedkit.rag import create_web_app

    index, encoder = web_index
    client = TestClient(create_web_app(index, encoder))
    body = client.get("/", params={"q": "fever\"><script>alert(1)</script>", "k": 20}).text
    assert "<script>" not in body and "&lt;script&gt;" in body
    assert "<b>bold</b>" not in body and "&lt;b&gt;bold&lt;/b&gt;" in body
    page = parse(body)
    assert page.query_value == "fever\"><script>alert(1)</script>"
    assert any(h["doc_id"] == "xss" for h in page.hits)


def test_page_without_query_and_with_a_failing_answerer(web_index):
    from fastapi.testclient import TestClient

    from embedkit.rag import create_web_app

    index, encoder = web_index
    empty = parse(TestClient(create_web_app(index, encoder)).get("/").text)
    assert empty.query_value == "" and empty.hits == []

    def broken(question, passages):
        raise RuntimeError("generator out of memory")

    client = TestClient(create_web_app(index, encoder, answerer=broken))
    page = parse(client.get("/?q=insulin").text)
    assert len(page.hits) == 5 and "generator out of memory" in page.error
    body = client.get("/api/search", params={"q": "insulin", "answer": "true"})  # the results stand, as on the page
    assert body.status_code == 200 and len(body.json()["results"]) == 5 and body.json()["answer"] is None
    assert body.json()["answer_error"] == "no answer: RuntimeError: generator out of memory"


def test_json_api(web_index):
    from fastapi.testclient import TestClient

    from embedkit.rag import create_web_app

    index, encoder = web_index
    client = TestClient(create_web_app(index, encoder, answerer=RecordingAnswerer()))
    body = client.get("/api/search", params={"q": "blood sugar", "k": 3, "answer": "true"}).json()
    assert [r["rank"] for r in body["results"]] == [1, 2, 3]
    assert [r["doc_id"] for r in body["results"]] == [h.doc_id for h in index.search(encoder, "blood sugar", k=3)]
    assert body["answer"].startswith("Fever and cough are covered by [1]")
    hybrid = client.get("/api/search", params={"q": "guitar stage", "k": 3, "hybrid": "true"}).json()
    assert hybrid["hybrid"] is True and hybrid["results"][0]["bm25_score"] is not None
    assert client.get("/api/search", params={"q": "x", "k": 0}).status_code == 422
    assert client.get("/health").json()["index"]["documents"] == len(index)


@pytest.mark.parametrize("store", ["faiss", "milvus"])
def test_filter_in_the_api_and_the_page(st_bert, tmp_path, store):
    """Bug caught: `rag web --filter` or a request's filter= ignored, a bad filter a 500, or the page losing the
    filter it searched with."""
    from fastapi.testclient import TestClient

    from embedkit.models import load_model
    from embedkit.rag import build_index, create_web_app

    encoder = load_model(st_bert)
    docs = {f"doc{i}": {"title": "", "text": t, "metadata": {"source": "manual" if i % 3 == 0 else "web"}}
            for i, t in enumerate(dict.fromkeys(CORPUS))}
    manual = {d for d, row in docs.items() if row["metadata"]["source"] == "manual"}
    index = build_index(encoder, docs, tmp_path / "idx", store=store)
    client = TestClient(create_web_app(index, encoder, filter='source == "manual"'))

    def ids(**params) -> set[str]:
        body = client.get("/api/search", params={"q": "fever", "k": 20, **params})
        assert body.status_code == 200, body.text
        return {r["doc_id"] for r in body.json()["results"]}

    assert ids() == manual  # the default filter
    assert ids(filter='source == "web"') == set(docs) - manual  # a request's filter replaces it
    assert ids(filter="") == set(docs)  # an empty one searches everything
    bad = client.get("/api/search", params={"q": "fever", "filter": "source ="})
    assert bad.status_code == 400 and "field 'filter'" in bad.json()["error"]
    page = client.get("/", params={"q": "fever", "k": 20, "filter": 'source == "web"'})
    parsed = parse(page.text)
    assert {h["doc_id"] for h in parsed.hits} == set(docs) - manual
    assert "value='source == &quot;web&quot;'" in page.text
    assert f"{store} flat index" in page.text
    assert "bad filter" in parse(client.get("/", params={"q": "fever", "filter": "(("}).text).error


def test_json_api_and_page_with_a_reranker(web_index, tiny_reranker, one_torch_thread):
    """Bug caught: `rag web --rerank` answers from the first stage's order (the reranker loaded but never asked),
    reranks fewer documents than a request's k, or does not say which reranker ordered the results."""
    from fastapi.testclient import TestClient

    from embedkit.models.reranker import load_reranker
    from embedkit.rag import create_web_app

    index, encoder = web_index
    reranker = load_reranker(tiny_reranker)
    answerer = RecordingAnswerer()
    client = TestClient(create_web_app(index, encoder, reranker=reranker, rerank_top=6, answerer=answerer,
                                       answer_passages=2))
    body = client.get("/api/search", params={"q": "blood sugar", "k": 3, "answer": "true"}).json()
    expected = index.search(encoder, "blood sugar", k=3, reranker=reranker, rerank_top=6)
    assert [r["doc_id"] for r in body["results"]] == [h.doc_id for h in expected]
    assert [r["score"] for r in body["results"]] == pytest.approx([h.score for h in expected], abs=1e-6)
    assert all(r["reranked"] for r in body["results"]) and body["reranker"] == str(tiny_reranker)
    top_two = [f"{h.title}\n{h.text}".strip() for h in expected[:2]]
    assert answerer.calls[-1] == ("blood sugar", top_two)  # the answer is written from the reranked passages
    wide = client.get("/api/search", params={"q": "blood sugar", "k": 8}).json()["results"]
    assert len(wide) == 8 and all(r["reranked"] for r in wide)  # k above rerank_top: all k reranked
    assert client.get("/health").json()["reranker"]["fingerprint"] == reranker.fingerprint
    page = client.get("/", params={"q": "blood sugar", "k": 3})
    assert "reranked by" in page.text
    assert [h["doc_id"] for h in parse(page.text).hits] == [h.doc_id for h in expected]


def test_highlight_and_citations_units():
    from embedkit.rag.index import Hit
    from embedkit.rag.web import highlight, query_terms, render_answer, render_page, snippet

    assert query_terms("What causes the Fever?") == ["causes", "fever"]
    assert highlight("Fevers <b> fever", ["fever"]) == "<mark>Fevers</mark> &lt;b&gt; <mark>fever</mark>"
    assert highlight("a < b", []) == "a &lt; b"
    assert highlight("one fracture, two fractures", ["fractures"]) == \
        "one <mark>fracture</mark>, two <mark>fractures</mark>"
    assert render_answer("x [1] [3] <y>", 2) == 'x <a class="cite" href="#hit-1">[1]</a> [3] &lt;y&gt;'
    hits = [Hit(rank=n, doc_id=f"d{n}", score=1 / n, title="", text=f"passage {n}") for n in range(1, 6)]
    page = parse(render_page(query="q", k=5, hybrid=False, hybrid_available=False, hits=hits, answer="[1] [3] [4]",
                             error=None, info={"documents": 5, "type": "flat", "model": "m"}, elapsed_ms=None,
                             answer_sources=3))  # the answerer saw 3 of the 5 hits: [4] is not one it was shown
    assert page.citations == [("#hit-1", "[1]"), ("#hit-3", "[3]")] and "[4]" in page.answer_text
    long = "word " * 300 + "needle here " + "word " * 300
    cut = snippet(long, ["needle"], limit=200)
    assert "needle" in cut and len(cut) < 220 and cut.startswith("... ")


def test_generator_wiring_of_rag_web(web_index, tiny_llama_dir, st_bert):
    """`rag web --generator` builds the answerer through embedkit.llm.generate; an embedding-only folder is refused."""
    from embedkit.errors import ConfigError
    from embedkit.rag.cli import _answerer

    index, _ = web_index
    assert _answerer(index, None, 8) is None  # the index's own model (a BERT encoder) has no generative head
    answer = _answerer(index, tiny_llama_dir, 4)
    assert answer.source == str(tiny_llama_dir)
    text = answer("what causes a fever?", ["the patient has a fever", "flu causes fever"])
    assert isinstance(text, str)
    with pytest.raises(ConfigError, match="no generative head"):
        _answerer(index, st_bert, 8)


@pytest.fixture(scope="module")
def joint_model(tmp_path_factory) -> Path:
    """A real `embedkit llm joint` folder: the tiny Llama through the joint trainer (contrastive + answer loss, LoRA
    merged on save), 2 steps, bidirectional embedding attention. One folder that embeds and answers (~3 s). Its
    context is 512 positions: the RAG prompt (system prompt + 3 passages) is ~300 tokens of this tiny vocabulary."""
    import yaml

    from conftest import build_tiny_llama

    from embedkit.llm.config import load_llm_recipe
    from embedkit.llm.joint import train_joint

    root = tmp_path_factory.mktemp("joint")
    base = build_tiny_llama(root / "base", max_positions=512)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"what about {t.split()[1]}?", "positive": t}) + "\n"
                             for t in dict.fromkeys(CORPUS)))
    # The embedding settings of recipes/llm/smollm2-joint.yaml: bidirectional attention, mean pooling, right padding.
    recipe = {"model": {"name": str(base), "max_length": 96, "embedding_attention": "bidirectional",
                        "pooling": "mean", "padding_side": "right"},
              "adapter": {"type": "lora", "r": 4, "alpha": 8}, "data": {"train": str(pairs)},
              "training": {"output_dir": str(root / "model"), "batch_size": 4, "lr": 1e-3, "max_steps": 2,
                           "progress": False, "threads": 1}}
    (root / "joint.yaml").write_text(yaml.safe_dump(recipe))
    stats = train_joint(load_llm_recipe(root / "joint.yaml", mode="joint"))
    assert stats["steps"] == 2 and stats["embedding_attention"] == "bidirectional"
    return Path(stats["output_dir"])


def test_rag_web_with_one_joint_model_in_headless_chromium(joint_model, tmp_path, monkeypatch, one_torch_thread):
    """Issue #17: one `llm joint` folder builds the index (`rag index --model DIR`) and, with no --generator, answers
    on the page (`rag web`): the hits are the index's ranking with that encoder, the answer comes from the same
    weights (through `_answerer`'s fall-back to the index's model), and its citations [n] can only link to the
    passages it was shown as [n]."""
    import urllib.request

    import torch
    from typer.testing import CliRunner

    import embedkit.rag.web as web
    from embedkit.cli import app
    from embedkit.models import load_model
    from embedkit.rag import create_web_app
    from embedkit.serve.server import BackgroundServer

    docs = {f"doc{i}": t for i, t in enumerate(dict.fromkeys(CORPUS))}
    corpus, index_dir = tmp_path / "corpus.jsonl", tmp_path / "idx"
    corpus.write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n" for i, t in docs.items()))
    built = CliRunner().invoke(app, ["rag", "index", "--model", str(joint_model), "--corpus", str(corpus),
                                     "--output", str(index_dir), "--no-bm25", "--quiet"])
    assert built.exit_code == 0, built.output
    served = {}  # `rag web` as typed, up to the server it would start
    monkeypatch.setattr(web, "serve_web", lambda index, encoder, host, port, **options: served.update(
        index=index, encoder=encoder, options=options))
    run = CliRunner().invoke(app, ["rag", "web", str(index_dir), "--max-new-tokens", "6"])
    assert run.exit_code == 0, run.output
    index, encoder, options = served["index"], served["encoder"], served["options"]
    answerer = options["answerer"]

    # One folder: the index's model, the query encoder and the answerer's source are all the joint folder.
    record = index.manifest["model"]
    assert record["path"] == str(joint_model) and record["architecture"] == "LlamaForCausalLM"
    assert record["attention"] == "bidirectional" == encoder.attention  # the joint model's embedding attention
    assert encoder.fingerprint == index.model_fingerprint and encoder.pooling == "mean"
    assert answerer is not None and answerer.source == record["path"]
    assert f"answers from {joint_model}" in run.output
    decoder = answerer.generator.model.model.state_dict()  # the generative side's decoder: the encoder's weights
    assert all(torch.equal(tensor, decoder[name]) for name, tensor in encoder.backbone.state_dict().items())
    # The index holds the bidirectional vectors: a causal read of the same weights embeds differently.
    texts = list(docs.values())
    causal = load_model(joint_model, attention="causal")
    assert causal.fingerprint != index.model_fingerprint
    assert abs(encoder.encode(texts, kind="document") - causal.encode(texts, kind="document")).max() > 1e-3

    prompts = []  # what the generator is given: recorded, then generated from as usual
    real_chat = answerer.generator.chat
    monkeypatch.setattr(answerer.generator, "chat", lambda messages, **kw: prompts.append(messages) or
                        real_chat(messages, **kw))
    query = "fever and cough"
    with BackgroundServer(create_web_app(index, encoder, **options)) as server:
        dom = chromium(f"{server.url}/?q=fever+and+cough&k=5", tmp_path / "profile", "--dump-dom")
        with urllib.request.urlopen(f"{server.url}/api/search?q=fever+and+cough&k=5&answer=true") as response:
            api = json.loads(response.read())
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = parse(dom.stdout)

    expected = index.search(encoder, query, k=5)
    assert [h["doc_id"] for h in page.hits] == [h.doc_id for h in expected] == [r["doc_id"] for r in api["results"]]
    assert [h["rank"] for h in page.hits] == [1, 2, 3, 4, 5]
    q = encoder.encode([query], kind="query")[0]  # the scores shown are cosines of this model's own vectors
    by_id = dict(zip(docs, encoder.encode(texts, kind="document")))
    assert [h["score"] for h in page.hits] == pytest.approx([float(by_id[h["doc_id"]] @ q) for h in page.hits],
                                                            abs=1e-4)

    # The generator saw the top --answer-passages (3) hits, numbered [1]..[3] in the page's order, and the question.
    assert options["answer_passages"] == 3 and len(prompts) == 2  # the page, then the JSON API
    shown = [docs[h["doc_id"]] for h in page.hits[:3]]
    assert prompts[0][1]["content"] == "Passages:\n" + "\n\n".join(f"[{n}] {t}" for n, t in enumerate(shown, 1)) \
        + f"\n\nQuestion: {query}"
    assert "[1], [2]" in prompts[0][0]["content"]  # the system prompt asks for these citations
    # The answer on the page is that greedy generation from the joint weights (a few tokens; the same over HTTP).
    answer = real_chat(prompts[0], max_new_tokens=6).text
    assert api["answer"] == answer
    assert page.answer_text.startswith("Answer")  # the answer section's heading, then the answer

    def visible(text: str) -> str:  # as the DOM holds it: control characters dropped, white space collapsed
        return " ".join(re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text).split())

    assert visible(page.answer_text[len("Answer"):]) == visible(answer)
    # Citations: each [n] the model wrote links to listed passage n when it was one of the 3 it saw, else stays text.
    cited = [n for n in re.findall(r"\[(\d+)\]", answer) if 1 <= int(n) <= 3]
    assert page.citations == [(f"#hit-{n}", f"[{n}]") for n in cited]
    assert {href[1:] for href, _ in page.citations} <= {h["id"] for h in page.hits}
