"""`rag web`: a small search page over a RAG index (FastAPI, rendered on the server; no JavaScript needed).

    GET /?q=...&k=5[&mode=hybrid][&filter=...]
                                 the page: search box, ranked passages with scores and <mark>ed query terms, and,
                                 when an answerer is given, a generated answer citing the passages as [1], [2];
                                 an empty q shows a message, not results
    GET /api/search?q=...&k=5[&filter=...]
                                 the same results as JSON; an empty or missing q, or a bad filter, is a 400 with
                                 {"error": ...}
    GET /health                  index and model summary (and the reranker's, when one orders the results)

A metadata filter (`rag web --filter`, embedkit.rag.filters) is the default of every search; a request's `filter=`
replaces it (an empty one searches everything).

With a reranker (`rag web --rerank`) every search, the page's and the API's, retrieves the first stage's top
`rerank_top` (at least k) and returns the reranker's best k with its scores: the answer is written from those.

Everything taken from the corpus, the query or the answer is HTML-escaped before it is marked up.
The app follows the index folder: `rag add` / `rag delete` (other processes) swap in a new folder, and the next
request sees the swap (two stat calls) and loads it, so deleted documents are never served.
"""

from __future__ import annotations

import html
import re
import threading
import time
from typing import Any, Callable, Sequence

from embedkit.errors import ConfigError, DataError, EmbedkitError
from embedkit.eval.runner import DEFAULT_TOP_K
from embedkit.rag.filters import parse_filter
from embedkit.rag.index import Hit, RagIndex

Answerer = Callable[[str, list[str]], str]
MAX_K = 50
SNIPPET_CHARS = 600  # longer passages are cut to a window around the first matched term
_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from has have how i in is it its of on or that the their this to "
    "was were what when where which who why will with".split())
_WORD = re.compile(r"\w+", re.UNICODE)
_CITATION = re.compile(r"\[(\d{1,2})\]")
EMPTY_QUERY = "Type a question or a few words to search for."


class IndexUnavailable(DataError):
    """The index folder was replaced on disk and the new one cannot be loaded (HTTP 503)."""


class LiveIndex:
    """The index a long-lived server searches: reloaded when a writer swaps in a new folder at its path.

    `current()` costs two stat calls when nothing changed. Requests already running keep the index they started
    with (its files stay open after the swap); the old one is closed when the last of them lets go of it.
    """

    def __init__(self, index: RagIndex) -> None:
        self._index = index
        self._lock = threading.Lock()

    def current(self) -> RagIndex:
        index = self._index
        if not index.changed_on_disk():
            return index
        with self._lock:  # one reload at a time; the others wait for it and take its result
            if self._index is not index and not self._index.changed_on_disk():
                return self._index
            try:
                fresh = RagIndex.load(self._index.path)
            except DataError as exc:
                raise IndexUnavailable(f"the index changed on disk and cannot be loaded: {exc.one_line()}") from None
            self._index = fresh
            return fresh


def query_terms(query: str) -> list[str]:
    """Lower-cased content words of the query (stopwords and 1-letter words dropped), longest first."""
    terms = {w.lower() for w in _WORD.findall(query) if len(w) > 1 and w.lower() not in _STOPWORDS}
    return sorted(terms, key=lambda t: (-len(t), t))


def _term_pattern(terms: Sequence[str]) -> re.Pattern | None:
    if not terms:
        return None
    # A term matches at a word start and may run on ("fever" marks "fevers"); a plural also marks its singular
    # ("fractures" marks "fracture"). Case-insensitive.
    stems = sorted({t[:-1] if len(t) > 3 and t.endswith("s") else t for t in terms}, key=lambda t: (-len(t), t))
    return re.compile(r"\b(?:" + "|".join(re.escape(t) for t in stems) + r")\w*", re.IGNORECASE | re.UNICODE)


def snippet(text: str, terms: Sequence[str], limit: int = SNIPPET_CHARS) -> str:
    """The passage, or for a long one a window of about `limit` characters around the first matched term."""
    if len(text) <= limit:
        return text
    pattern = _term_pattern(terms)
    match = pattern.search(text) if pattern else None
    start = max(0, (match.start() if match else 0) - limit // 4)
    end = min(len(text), start + limit)
    return ("... " if start else "") + text[start:end] + (" ..." if end < len(text) else "")


def highlight(text: str, terms: Sequence[str]) -> str:
    """HTML-escaped `text` with every match of `terms` wrapped in <mark>."""
    pattern = _term_pattern(terms)
    if pattern is None:
        return html.escape(text)
    out, last = [], 0
    for match in pattern.finditer(text):
        out.append(html.escape(text[last:match.start()]))
        out.append(f"<mark>{html.escape(match.group(0))}</mark>")
        last = match.end()
    out.append(html.escape(text[last:]))
    return "".join(out)


def render_answer(answer: str, n_hits: int) -> str:
    """Escaped answer text; citations [n] of listed passages become links to them."""
    def link(match: re.Match) -> str:
        n = int(match.group(1))
        return f'<a class="cite" href="#hit-{n}">[{n}]</a>' if 1 <= n <= n_hits else match.group(0)

    return _CITATION.sub(link, html.escape(answer))


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;
color:#1d2430;background:#fafbfc}
h1{font-size:1.4rem;margin:0 0 .2rem}.sub{color:#5b6575;font-size:.85rem;margin-bottom:1rem}
form{display:flex;gap:.5rem;align-items:center;margin-bottom:1.2rem;flex-wrap:wrap}
input[type=search]{flex:1;min-width:18rem;font-size:1.05rem;padding:.5rem .7rem;border:1px solid #b8c0cc;border-radius:6px}
button{font-size:1rem;padding:.5rem 1rem;border:0;border-radius:6px;background:#2457c5;color:#fff}
label{font-size:.9rem;color:#333}select{font-size:.95rem;padding:.3rem}
.answer{background:#eef4ff;border:1px solid #c9d8f5;border-radius:8px;padding:.8rem 1rem;margin-bottom:1.2rem}
.answer h2{font-size:1rem;margin:0 0 .4rem}.cite{font-weight:600;text-decoration:none;color:#2457c5}
ol.results{list-style:none;padding:0;margin:0}
li.hit{background:#fff;border:1px solid #e1e5eb;border-radius:8px;padding:.7rem 1rem;margin-bottom:.7rem}
li.hit:target{border-color:#2457c5;box-shadow:0 0 0 2px #c9d8f5}
.meta{font-size:.8rem;color:#5b6575;display:flex;gap:1rem}.rank{font-weight:700;color:#2457c5}
.title{font-size:1rem;margin:.3rem 0}.passage{margin:.2rem 0;line-height:1.45}
mark{background:#ffe58a;padding:0 .1em;border-radius:2px}.empty,.error{color:#8a3b12}
"""


def render_page(*, query: str, k: int, hybrid: bool, hybrid_available: bool, hits: list[Hit] | None,
                answer: str | None, error: str | None, info: dict[str, Any], elapsed_ms: float | None,
                notice: str | None = None, answer_sources: int | None = None, reranker: str | None = None,
                filter: str = "") -> str:
    """The page. `answer_sources`: how many of the top hits the answer was given (default: all); only citations
    of those become links, so an answer's [n] always points to the passage it was shown as [n]. `reranker`: the
    name of the reranker that ordered the hits."""
    e = html.escape
    terms = query_terms(query)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{e(query) + ' - ' if query else ''}embedkit search</title><style>{_CSS}</style></head><body>",
        "<h1>embedkit search</h1>",
        f"<div class='sub'>{e(str(info['documents']))} documents &middot; "
        f"{e(str(info.get('vector_store', 'faiss')))} {e(info['type'])} index &middot; model "
        f"{e(str(info.get('model')))}{' &middot; reranked by ' + e(reranker) if reranker else ''}</div>",
        "<form method='get' action='/' role='search'>",
        f"<input type='search' id='q' name='q' value='{e(query, quote=True)}' placeholder='Ask a question' "
        "autofocus aria-label='Search'>",
        "<label>k <select name='k'>",
        *[f"<option value='{n}'{' selected' if n == k else ''}>{n}</option>" for n in sorted({3, 5, 10, 20, k})],
        "</select></label>",
    ]
    if hybrid_available:
        parts.append("<label>retrieval <select name='mode'>"
                     f"<option value='dense'{'' if hybrid else ' selected'}>dense</option>"
                     f"<option value='hybrid'{' selected' if hybrid else ''}>hybrid (dense + BM25)</option>"
                     "</select></label>")
    parts.append(f"<label>filter <input type='text' name='filter' id='filter' value='{e(filter, quote=True)}' "
                 "placeholder='source == \"manual\"' aria-label='Metadata filter'></label>")
    parts.append("<button type='submit'>Search</button></form>")
    if notice:
        parts.append(f"<p class='empty' id='notice'>{e(notice)}</p>")
    if error:
        parts.append(f"<p class='error' id='error'>{e(error)}</p>")
    if answer is not None:
        cited = len(hits or []) if answer_sources is None else min(answer_sources, len(hits or []))
        parts.append(f"<section class='answer' id='answer'><h2>Answer</h2><p>{render_answer(answer, cited)}"
                     "</p></section>")
    if hits is not None:
        if not hits:
            parts.append("<p class='empty'>No results.</p>")
        else:
            took = f" in {elapsed_ms:.0f} ms" if elapsed_ms is not None else ""
            parts.append(f"<div class='sub' id='summary'>{len(hits)} results{took}"
                         f"{' (hybrid: dense + BM25, reciprocal rank fusion)' if hybrid else ''}"
                         f"{' (ordered by the reranker; its scores, 0 to 1)' if reranker else ''}</div>")
            parts.append("<ol class='results'>")
            for hit in hits:
                title = f"<h3 class='title'>{highlight(hit.title, terms)}</h3>" if hit.title else ""
                parts.append(
                    f"<li class='hit' id='hit-{hit.rank}' data-rank='{hit.rank}' data-score='{hit.score:.6f}' "
                    f"data-doc-id='{e(hit.doc_id, quote=True)}'>"
                    f"<div class='meta'><span class='rank'>[{hit.rank}]</span>"
                    f"<span class='score'>score {hit.score:.4f}</span><span class='doc-id'>{e(hit.doc_id)}</span></div>"
                    f"{title}<p class='passage'>{highlight(snippet(hit.text, terms), terms)}</p></li>")
            parts.append("</ol>")
    parts.append("</body></html>")
    return "".join(parts)


def create_web_app(index: RagIndex, encoder, *, answerer: Answerer | None = None, default_k: int = 5,
                   hybrid: bool = False, hybrid_weight: float = 0.5, answer_passages: int | None = None,
                   reranker=None, rerank_top: int = DEFAULT_TOP_K, filter: str | None = None):
    """The FastAPI app. `answerer(question, passages) -> str` adds a generated answer citing passages [1], [2] ...

    answer_passages: how many of the top hits the answerer sees (default: all shown). reranker: orders each
    search's first-stage top max(rerank_top, k) (RagIndex.search's reranking, as `rag query --rerank`).
    filter: the default metadata filter (a request's filter= replaces it).
    """
    from fastapi import FastAPI, Query
    from fastapi.responses import HTMLResponse, JSONResponse

    index.check_encoder(encoder)  # fail at start-up, not on the first query
    default_filter = parse_filter(filter)  # and a bad filter too
    live = LiveIndex(index)
    app = FastAPI(title="embedkit RAG search", docs_url=None, redoc_url=None)

    reranker_name = str(reranker.describe().get("name")) if reranker is not None else None

    def run(current: RagIndex, q: str, k: int, use_hybrid: bool, flt: str | None) -> tuple[list[Hit], float]:
        t0 = time.perf_counter()
        hits = current.search(encoder, q, k=k, hybrid=use_hybrid and current.has_bm25, hybrid_weight=hybrid_weight,
                              reranker=reranker, rerank_top=max(rerank_top, k),
                              filter=default_filter if flt is None else flt)
        return hits, (time.perf_counter() - t0) * 1000

    def passages(hits: list[Hit]) -> list[str]:
        chosen = hits if answer_passages is None else hits[:answer_passages]
        return [f"{h.title}\n{h.text}".strip() for h in chosen]

    def answer_for(q: str, hits: list[Hit]) -> tuple[str | None, str | None]:
        """(answer, None), or (None, one-line error): a failing generator never takes the results down with it."""
        try:
            return answerer(q, passages(hits)), None
        except Exception as exc:
            return None, f"no answer: {type(exc).__name__}: {exc}"

    # Sync handlers: FastAPI runs them in its thread pool, so a slow encode or answer does not block the loop.
    @app.get("/", response_class=HTMLResponse)
    def page(q: str | None = None, k: int = default_k, mode: str = "",
             filter: str | None = None) -> HTMLResponse:
        k = max(1, min(k, MAX_K))
        use_hybrid = hybrid if mode not in ("dense", "hybrid") else mode == "hybrid"
        hits = answer = error = elapsed = notice = None
        current, status = index, 200
        try:
            current = live.current()
            if q is not None and not q.strip():  # submitted empty: say so (no q at all is the start page)
                notice = EMPTY_QUERY
            elif q is not None:
                hits, elapsed = run(current, q, k, use_hybrid, filter)
                if answerer is not None and hits:
                    answer, error = answer_for(q, hits)
        except IndexUnavailable as exc:
            error, status = exc.one_line(), 503
        except EmbedkitError as exc:
            error = exc.one_line()
        body = render_page(query=q or "", k=k, hybrid=use_hybrid and current.has_bm25,
                           hybrid_available=current.has_bm25, hits=hits, answer=answer, error=error,
                           info=current.describe(), elapsed_ms=elapsed, notice=notice,
                           answer_sources=answer_passages, reranker=reranker_name,
                           filter=(default_filter.text if default_filter else "") if filter is None else filter)
        return HTMLResponse(body, status_code=status)

    @app.get("/api/search")
    def api_search(q: str | None = None, k: int = Query(default_k, ge=1, le=MAX_K),
                   hybrid_param: bool = Query(hybrid, alias="hybrid"), answer: bool = False,
                   filter: str | None = None) -> JSONResponse:
        if q is None or not q.strip():
            return JSONResponse({"error": "field 'q': the query is empty: give some words to search for"},
                                status_code=400)
        try:
            current = live.current()
            hits, elapsed = run(current, q, k, hybrid_param, filter)
        except IndexUnavailable as exc:
            return JSONResponse({"error": exc.one_line()}, status_code=503)
        except EmbedkitError as exc:
            return JSONResponse({"error": exc.one_line()}, status_code=400)
        body: dict[str, Any] = {"query": q, "k": k, "hybrid": hybrid_param and current.has_bm25,
                                "reranker": reranker_name, "elapsed_ms": elapsed,
                                "filter": (default_filter.text if default_filter else None) if filter is None
                                else (filter or None),
                                "results": [h.to_dict() for h in hits]}
        if answer and answerer is not None and hits:
            body["answer"], failure = answer_for(q, hits)
            if failure:
                body["answer_error"] = failure
        return JSONResponse(body)

    @app.get("/health")
    def health() -> JSONResponse:
        try:
            current = live.current()
        except IndexUnavailable as exc:
            return JSONResponse({"status": "unavailable", "error": exc.one_line()}, status_code=503)
        return JSONResponse({"status": "ok", "index": current.describe(), "answers": answerer is not None,
                             "reranker": reranker.describe() if reranker is not None else None})

    return app


def serve_web(index: RagIndex, encoder, host: str = "127.0.0.1", port: int = 8080, answerer: Answerer | None = None,
              **options: Any) -> None:
    """Serve the search page with uvicorn until interrupted."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range", field="port")
    app = create_web_app(index, encoder, answerer=answerer, **options)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)).run()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
