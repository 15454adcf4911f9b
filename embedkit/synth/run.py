"""`embedkit synth` end to end: documents -> (query, positive) rows -> filters -> training pairs or an eval set.

    OUT/generated.jsonl   every generated row, append-only (resume; see store.py)
    OUT/settings.json     what the rows were generated with (a re-run with other settings is refused)
    OUT/corpus.jsonl      the documents as read (chunked), BEIR layout: the pool for `embedkit mine --corpus`
    OUT/pairs.jsonl       the rows the filters kept: {query, positive, doc_id, style, source}; `embedkit train` and
                          `tune` read it as it is (data.train), `embedkit mine -d` mines negatives for it
    OUT/filters.json      each filter's settings, removal count and a few removed queries
    OUT/embedkit_manifest.json   generator and its hash, prompt, style, seed, filters, counts, command line

With --eval, OUT is a BEIR folder instead of training data: queries.jsonl and qrels/test.tsv (each query judges
its source document relevant) beside corpus.jsonl, and `synthetic.json`, which `embedkit eval` copies into every
report that uses the folder. No pairs.jsonl then: an eval set's queries must not leak into training.

Filters run on every re-run over the whole log, so changing a filter (or adding --round-trip-k) re-filters without
generating again. Each final file is written atomically: a failure leaves the previous version or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from embedkit.atomic import atomic_path, write_json
from embedkit.data.beir import CORPUS_FILE, QRELS_DIR, QUERIES_FILE, SYNTHETIC_FILE
from embedkit.data.documents import Document, empty_document_error, load_documents
from embedkit.errors import ConfigError, DataError
from embedkit.logs import progress
from embedkit.manifest import MANIFEST_NAME, base_manifest, sha256_texts
from embedkit.mine.cache import corpus_vectors
from embedkit.synth.filters import FilterReport, FilterSettings, cheap_filters, round_trip_filter
from embedkit.synth.generators import GeneratorSpec
from embedkit.synth.generators.base import GeneratorError, QueryGenerator
from embedkit.synth.prompts import MAX_DOCUMENT_WORDS, Prompt, clean_query
from embedkit.synth.store import GENERATED_FILE, GeneratedLog, check_settings, item_key, record_settings
from embedkit.synth.styles import FREE_STYLES, make_pair, queries_available

log = logging.getLogger(__name__)

PAIRS_FILE = "pairs.jsonl"
FILTERS_FILE = "filters.json"
EVAL_SPLIT = "test"


@dataclass
class SynthSettings:
    style: str = "question"  # a FREE_STYLES name, a named prompt, or "custom" (prompt given)
    queries_per_doc: int = 1
    sample: int | None = None  # documents drawn (seeded) from the corpus; None: every document
    seed: int = 42
    prompt: Prompt | None = None  # generator styles only
    max_document_words: int = MAX_DOCUMENT_WORDS
    filters: FilterSettings = field(default_factory=FilterSettings)
    filter_model: str = "minilm"
    eval_set: bool = False
    restart: bool = False
    device: str = "auto"

    def check(self) -> None:
        if self.queries_per_doc < 1:
            raise ConfigError("must be at least 1", field="queries-per-doc")
        if self.sample is not None and self.sample < 1:
            raise ConfigError("must be at least 1 (leave it out for every document)", field="sample")
        if self.style not in FREE_STYLES and self.prompt is None:
            raise ConfigError(f"style {self.style!r} needs a prompt", field="style")
        if self.eval_set and self.style in FREE_STYLES:
            raise ConfigError(f"--eval needs a generator style: a {self.style} query is a part of the document the "
                              "evaluation encodes, so every model would find it (use question, keyword, claim or "
                              "--prompt-file)", field="eval")


def select_documents(docs: Sequence[Document], sample: int | None, seed: int) -> list[Document]:
    """A seeded sample of `sample` documents, in corpus order (all of them when sample is None or larger)."""
    if sample is None or sample >= len(docs):
        return list(docs)
    chosen = set(random.Random(seed).sample(range(len(docs)), sample))
    return [d for i, d in enumerate(docs) if i in chosen]


def plan(docs: Sequence[Document], style: str, k: int) -> list[tuple[Document, int]]:
    """(document, query index) of every query the run makes, in corpus order."""
    if style in FREE_STYLES:
        return [(d, i) for d in docs for i in range(queries_available(style, d, k))]
    return [(d, i) for d in docs for i in range(k)]


def batch_seed(seed: int, first: tuple[str, int]) -> int:
    """The sampling seed of a batch: fixed by the run's seed and the batch's first item, so a resumed run draws
    the same for the same batch."""
    digest = hashlib.sha256(f"{seed}\0{first[0]}\0{first[1]}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big")


def _corpus_sha256(docs: Sequence[Document]) -> str:
    return sha256_texts(part for d in docs for part in (d.doc_id, d.title, d.text))


def _row(doc: Document, index: int, query: str, positive: str, style: str, source: str) -> dict[str, Any]:
    return {"doc_id": doc.doc_id, "index": index, "query": query, "positive": positive, "style": style,
            "source": source}


def generate_free(items: Sequence[tuple[Document, int]], store: GeneratedLog, style: str, seed: int,
                  bar, chunk: int = 1000) -> None:
    for start in range(0, len(items), chunk):
        rows = []
        for doc, index in items[start:start + chunk]:
            pair = make_pair(style, doc, index, seed)
            rows.append(_row(doc, index, pair.query, pair.positive, style, style))
        store.append(rows)
        bar.update(len(rows))


def generate_with_model(items: Sequence[tuple[Document, int]], store: GeneratedLog, generator: QueryGenerator,
                        settings: SynthSettings, source: str, bar) -> None:
    prompt = settings.prompt
    rendered = [prompt.render(doc.embed_text, doc.title, max_document_words=settings.max_document_words)
                for doc, _ in items]
    # Length-sorted batches: a batch of similar lengths wastes little compute on padding.
    lengths = [generator.prompt_length(p) for p in rendered]
    order = sorted(range(len(items)), key=lambda i: (lengths[i], i))
    size = max(1, generator.settings.batch_size)
    for start in range(0, len(order), size):
        batch = order[start:start + size]
        first = item_key(items[batch[0]][0].doc_id, items[batch[0]][1])
        replies = generator.generate([rendered[i] for i in batch], seed=batch_seed(settings.seed, first))
        if len(replies) != len(batch):
            raise GeneratorError(f"the generator returned {len(replies)} replies for {len(batch)} prompts")
        queries = [clean_query(r or "") for r in replies]
        if not any(queries):
            ids = ", ".join(sorted({items[i][0].doc_id for i in batch})[:3])
            raise GeneratorError(f"the generator returned no text for any of the {len(batch)} prompts of a batch "
                                 f"(documents {ids}, ...); check the model and the prompt (what it generated so "
                                 f"far is kept in {GENERATED_FILE})")
        rows = []
        for i, query in zip(batch, queries):
            doc, index = items[i]
            rows.append(_row(doc, index, query, doc.embed_text, settings.style, source))
        store.append(rows)
        bar.update(len(rows))


def round_trip(rows: list[dict[str, Any]], docs: Sequence[Document], settings: SynthSettings,
               report: FilterReport) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The round-trip filter with `settings.filter_model`; the corpus vectors go through the embedding cache that
    `embedkit eval` and `embedkit mine` share, so mining the output afterwards with the same model encodes only the
    passages synth added (row reuse: the documents' vectors are copied from this entry)."""
    from embedkit.models import load_model

    encoder = load_model(settings.filter_model, device=settings.device)
    ids, texts = [d.doc_id for d in docs], [d.embed_text for d in docs]
    with corpus_vectors(encoder, ids, texts, progress=True) as (doc_vectors, cache):
        queries = encoder.encode([r["query"] for r in rows], kind="query", normalize=True)
        kept = round_trip_filter(rows, ids, doc_vectors, queries, settings.filters.round_trip_k, report)
    return kept, {"name": settings.filter_model, "fingerprint": encoder.fingerprint, "cached": cache["cached"]}


def _earlier_generator(output: Path, spec: GeneratorSpec | None) -> dict[str, Any] | None:
    """The generator block of the folder's manifest when nothing was left to generate (no model loaded)."""
    if spec is None:
        return None
    try:
        earlier = json.loads((output / MANIFEST_NAME).read_text(encoding="utf-8")).get("generator")
    except (OSError, ValueError):
        earlier = None
    return earlier if isinstance(earlier, dict) else {**spec.identity(), "loaded": False}


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_eval_set(output: Path, rows: Sequence[dict[str, Any]], marker: dict[str, Any]) -> None:
    """queries.jsonl, qrels/test.tsv and synthetic.json beside corpus.jsonl: a BEIR folder `embedkit eval` reads."""
    queries = [{"_id": f"synth:{r['doc_id']}:{r['index']}", "text": r["query"]} for r in rows]
    _write_jsonl(output / QUERIES_FILE, queries)
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q['_id']}\t{r['doc_id']}\t1" for q, r in zip(queries, rows)]
    with atomic_path(output / QRELS_DIR / f"{EVAL_SPLIT}.tsv") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_json(output / SYNTHETIC_FILE, marker)


def synthesize(corpus: str | Path, output: str | Path, settings: SynthSettings,
               generator: GeneratorSpec | None = None, *, show_progress: bool = True) -> dict[str, Any]:
    """Run synth with `generator` (generator styles only; it is opened only when something is left to generate).
    Returns the summary (also in the manifest)."""
    settings.check()
    if settings.style not in FREE_STYLES and generator is None:
        raise ConfigError(f"style {settings.style!r} needs a generator", field="style")
    generator = generator if settings.style not in FREE_STYLES else None
    output = Path(output)
    started = time.monotonic()
    docs = load_documents(corpus)
    if not docs:
        raise DataError("the corpus has no documents", path=corpus)
    problem = empty_document_error(docs, corpus)
    if problem is not None:
        raise problem
    chosen = select_documents(docs, settings.sample, settings.seed)
    items = plan(chosen, settings.style, settings.queries_per_doc)
    if not items:
        raise DataError(f"no document can give a {settings.style} query (title: none has a title; ict: none has "
                        "two sentences; crop: none has 8 words)", path=corpus)
    corpus_sha = _corpus_sha256(docs)
    resume_settings = {
        "corpus_sha256": corpus_sha, "style": settings.style, "queries_per_doc": settings.queries_per_doc,
        "sample": settings.sample, "seed": settings.seed, "max_document_words": settings.max_document_words,
        "prompt_sha256": settings.prompt.sha256 if settings.prompt else None,
        "generator": generator.identity() if generator is not None else None,
        # An eval set's queries must not become training pairs by a re-run without --eval in the same folder.
        "eval_set": settings.eval_set,
    }
    check_settings(output, resume_settings, restart=settings.restart)  # before any model loads
    if settings.restart:
        (output / GENERATED_FILE).unlink(missing_ok=True)
    store = GeneratedLog(output / GENERATED_FILE)
    pending = [(d, i) for d, i in items if item_key(d.doc_id, i) not in store.keys]
    without = len(chosen) - len({d.doc_id for d, _ in items})
    log.info("%d documents, %d chosen, %d queries planned (%s)%s, %d already generated in %s", len(docs),
             len(chosen), len(items), settings.style, f"; {without} chosen documents give none" if without else "",
             len(items) - len(pending), output / GENERATED_FILE)

    model = generator.open() if generator is not None and pending else None
    generator_info = model.describe() if model is not None else _earlier_generator(output, generator)
    record_settings(output, resume_settings)
    gen_started = time.monotonic()
    source = settings.style if generator is None else f"{generator_info['engine']}:{generator_info['model']}"
    try:
        with progress(total=len(items), initial=len(items) - len(pending), desc="synth", unit="queries",
                      enabled=show_progress) as bar:
            if generator is None:
                generate_free(pending, store, settings.style, settings.seed, bar)
            elif model is not None:
                generate_with_model(pending, store, model, settings, source, bar)
    finally:
        if model is not None:
            model.close()
    gen_seconds = time.monotonic() - gen_started

    position = {d.doc_id: n for n, d in enumerate(docs)}
    wanted = {item_key(d.doc_id, i) for d, i in items}
    rows = sorted((r for r in store.records() if item_key(r["doc_id"], r["index"]) in wanted),
                  key=lambda r: (position[r["doc_id"]], r["index"]))
    report = FilterReport()
    kept = cheap_filters(rows, settings.filters, report)
    filter_model_info = None
    if settings.filters.round_trip_k > 0 and kept:
        kept, filter_model_info = round_trip(kept, docs, settings, report)
    if not kept:
        log.warning("the filters removed every query (%s): nothing to train or evaluate on", report.counts)

    summary = {
        "documents": len(docs), "documents_chosen": len(chosen), "documents_without_query": without,
        "queries_planned": len(items),
        "generated_now": len(pending), "generated_total": len(rows), "kept": len(kept),
        "generation_seconds": round(gen_seconds, 3),
        "queries_per_s": round(len(pending) / gen_seconds, 3) if pending and gen_seconds > 0 else None,
    }
    filters_report = {"input": len(rows), "kept": len(kept), "removed": report.counts,
                      "removed_examples": report.examples, "settings": settings.filters.to_dict(),
                      "filter_model": filter_model_info}
    _write_jsonl(output / CORPUS_FILE, [{"_id": d.doc_id, "title": d.title, "text": d.text} for d in docs])
    common = {"style": settings.style, "generator": generator_info,
              "prompt": settings.prompt.describe() if settings.prompt else None}
    if settings.eval_set:
        _write_eval_set(output, kept, {"synthetic": True, "made_by": "embedkit synth", **common,
                                       "seed": settings.seed, "queries": len(kept)})
        files = [CORPUS_FILE, QUERIES_FILE, f"{QRELS_DIR}/{EVAL_SPLIT}.tsv", SYNTHETIC_FILE]
    else:
        _write_jsonl(output / PAIRS_FILE, [{"query": r["query"], "positive": r["positive"], "doc_id": r["doc_id"],
                                            "style": r["style"], "source": r["source"]} for r in kept])
        files = [PAIRS_FILE, CORPUS_FILE]
    write_json(output / FILTERS_FILE, filters_report)
    files += [FILTERS_FILE, GENERATED_FILE, MANIFEST_NAME]
    manifest = base_manifest(
        "synth", corpus={"path": str(corpus), "sha256": corpus_sha, "documents": len(docs)},
        **common, seed=settings.seed, queries_per_doc=settings.queries_per_doc, sample=settings.sample,
        max_document_words=settings.max_document_words, eval_set=settings.eval_set,
        filters=filters_report, counts=summary, files=[str(output / f) for f in files],
        wall_time_s=round(time.monotonic() - started, 3))
    write_json(output / MANIFEST_NAME, manifest)
    return {**summary, "removed": report.counts, "files": manifest["files"], "style": settings.style,
            "filter_settings": settings.filters.to_dict()}
