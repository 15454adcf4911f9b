"""Text-level mining: build the problem from pairs or a BEIR folder, encode, mine, write JSONL rows.

A *task* is the pool of documents (corpus, or all positives when there is no corpus) and the distinct queries, each
with every document known to be relevant to it: a query text that occurs in several pairs (or under several BEIR
ids) has all of those documents as positives, and none of them is ever chosen as its negative. Output rows are one
per (query, positive): {query, positive, negatives, scores: [positive, negatives...], query_id, positive_id,
negative_ids}, which `embedkit.data.read_examples` reads as n-tuples with teacher scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from embedkit.data import is_beir_folder, load_beir, read_examples
from embedkit.data.beir import CORPUS_FILE, mteb_document_text, read_corpus
from embedkit.data.lines import iter_text_lines, require_file
from embedkit.device import resolve_device
from embedkit.errors import ConfigError, DataError
from embedkit.manifest import sha256_file
from embedkit.mine.core import MiningStats, mine_embeddings
from embedkit.mine.settings import MiningSettings
from embedkit.mine.vectors import NpyFileSource, VectorSource
from embedkit.models.ray_encode import VectorShards


@dataclass
class MiningTask:
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]  # one per distinct query text
    query_texts: list[str]
    pos_ptr: np.ndarray  # positives of query q: pos_idx[pos_ptr[q]:pos_ptr[q + 1]]
    pos_idx: np.ndarray
    description: dict[str, Any] = field(default_factory=dict)  # where the data came from (for the manifest)
    pos_grade: np.ndarray | None = None  # relevance grade of each pos_idx entry (BEIR qrels score); None: ungraded

    @property
    def n_queries(self) -> int:
        return len(self.query_texts)

    def positives_of(self, q: int) -> np.ndarray:
        return self.pos_idx[self.pos_ptr[q]:self.pos_ptr[q + 1]]


class _Groups:
    """Distinct query texts -> ordered, de-duplicated positive indices."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.ids: list[str] = []
        self.texts: list[str] = []
        self.positives: list[dict[int, int]] = []  # doc -> grade (the highest seen for that query)

    def add(self, query_id: str, text: str, doc: int, grade: int = 1) -> None:
        q = self.index.get(text)
        if q is None:
            q = self.index[text] = len(self.texts)
            self.ids.append(query_id)
            self.texts.append(text)
            self.positives.append({})
        self.positives[q][doc] = max(grade, self.positives[q].get(doc, grade))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pos_ptr, pos_idx, pos_grade)."""
        sizes = [len(p) for p in self.positives]
        ptr = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=ptr[1:])
        flat = np.fromiter((d for p in self.positives for d in p), dtype=np.int64, count=int(ptr[-1]))
        grades = np.fromiter((g for p in self.positives for g in p.values()), dtype=np.int64, count=int(ptr[-1]))
        return ptr, flat, grades


def task_from_pairs(examples: Iterable, corpus: dict[str, dict] | None = None,
                    description: dict | None = None) -> MiningTask:
    """Pairs (objects with .query and .positive) + an optional corpus {id: {"title", "text"}}.

    Without a corpus the pool is the set of distinct positives. A positive missing from the corpus is added to it
    (id "positive:N"); a positive whose text equals a corpus document *is* that document. Pairs that all carry a
    relevance grade (`.grade`, as `pairs_from_beir` gives them) make a graded task (see MiningSettings.margin_grade).
    """
    ids: list[str] = []
    texts: list[str] = []
    by_text: dict[str, int] = {}
    for doc_id, row in (corpus or {}).items():
        text = mteb_document_text(row.get("title", ""), row["text"])
        ids.append(doc_id)
        texts.append(text)
        by_text.setdefault(text, len(texts) - 1)
    groups = _Groups()
    added = 0
    graded = True
    for row_number, example in enumerate(examples, start=1):
        doc = by_text.get(example.positive)
        if doc is None:
            added += 1
            doc = by_text[example.positive] = len(texts)
            ids.append(f"positive:{added}")
            texts.append(example.positive)
        grade = getattr(example, "grade", None)
        graded = graded and grade is not None
        groups.add(f"row:{row_number}", example.query, doc, int(grade) if grade is not None else 1)
    if not groups.texts:
        raise DataError("no pairs to mine")
    ptr, flat, grades = groups.arrays()
    info = dict(description or {})
    info.update(pool="corpus + positives" if corpus else "positives", pool_size=len(texts), positives_added=added,
                queries=len(groups.texts), graded=graded)
    return MiningTask(ids, texts, groups.ids, groups.texts, ptr, flat, info, grades if graded else None)


def task_from_beir(ds, description: dict | None = None) -> MiningTask:
    """Judged queries of `ds.split` (score > 0 = positive) over the whole corpus; equal query texts are merged."""
    ids = list(ds.corpus)
    position = {doc_id: i for i, doc_id in enumerate(ids)}
    groups = _Groups()
    for qid, doc_id, score in ds.relevant_pairs():
        groups.add(qid, ds.queries[qid], position[doc_id], score)
    if not groups.texts:
        raise DataError(f"no judgments with score > 0 in split '{ds.split}'", path=ds.path)
    ptr, flat, grades = groups.arrays()
    info = dict(description or {})
    info.update(pool="corpus", pool_size=len(ids), queries=len(groups.texts), split=ds.split, graded=True,
                grades=sorted({int(g) for g in grades}))
    return MiningTask(ids, ds.document_texts(ids), groups.ids, groups.texts, ptr, flat, info, grades)


def load_task(data: str | Path, *, split: str = "train", corpus: str | Path | None = None,
              query: str = "query", positive: str = "positive") -> MiningTask:
    """A BEIR folder (positives from qrels/<split>.tsv) or a pairs file (any format read_examples reads)."""
    data = Path(data)
    if not data.exists():
        raise DataError("data not found (give a pairs file or a BEIR folder)", path=data)
    if is_beir_folder(data):
        if corpus is not None:
            raise ConfigError("a BEIR folder brings its own corpus; leave out --corpus", field="corpus")
        ds = load_beir(data, split)
        return task_from_beir(ds, {"kind": "beir", "path": str(data), "split": split, "data_hash": ds.data_hash()})
    if data.is_dir():
        raise DataError("a folder that is not a BEIR folder (needs corpus.jsonl and queries.jsonl)", path=data)
    description: dict[str, Any] = {"kind": "pairs", "path": str(data), "sha256": sha256_file(data)}
    corpus_rows = None
    if corpus is not None:
        corpus_path = Path(corpus)
        if corpus_path.is_dir():
            corpus_path = corpus_path / CORPUS_FILE
        corpus_rows = read_corpus(corpus_path)
        description["corpus"] = {"path": str(corpus_path), "sha256": sha256_file(corpus_path)}
    # Negatives already in the file are read (and validated) but not used: mining chooses its own.
    examples = read_examples(data, query=query, positive=positive)
    return task_from_pairs(examples, corpus_rows, description)


def read_ids(path: str | Path) -> list[str]:
    """Document ids, one per line (.txt) or a JSON list (.json), in the row order of the embeddings file."""
    path = Path(path)
    require_file(path, "ids file")
    if path.suffix.lower() == ".json":
        try:
            ids = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON ({exc.msg})", path=path, line=exc.lineno) from None
        if not isinstance(ids, list) or not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in ids):
            raise DataError("expected a JSON list of ids", path=path)
        return [str(i) for i in ids]
    ids = []
    for number, line in iter_text_lines(path):
        if not line.strip():
            raise DataError("empty line (every row of the embeddings needs an id)", path=path, line=number)
        ids.append(line.strip())
    return ids


def align_precomputed(task: MiningTask, embeddings: str | Path,
                      ids_path: str | Path | None) -> NpyFileSource | VectorShards:
    """Use precomputed corpus embeddings: reorder the task's pool to the rows of `embeddings` (ids from ids_path).

    `embeddings` is a float32 .npy with its ids in `ids_path`, or a folder of vector shards (`embedkit encode
    --ray`), which holds its own ids (`ids_path` then None)."""
    if Path(embeddings).is_dir():
        if ids_path is not None:
            raise ConfigError("a folder of vector shards holds its own ids: leave out --corpus-ids",
                              field="corpus_ids")
        source: NpyFileSource | VectorShards = VectorShards(embeddings)
        ids = source.ids
        ids_path = embeddings
    else:
        if ids_path is None:
            raise ConfigError("precomputed embeddings in a .npy need --corpus-ids", field="corpus_ids")
        source = NpyFileSource(embeddings)
        ids = read_ids(ids_path)
    if len(ids) != source.n:
        raise DataError(f"{len(ids)} ids for {source.n} embedding rows", path=ids_path)
    row_of = {}
    for line, doc_id in enumerate(ids, start=1):
        if doc_id in row_of:
            raise DataError(f"duplicate id '{doc_id}'", path=ids_path, line=line)
        row_of[doc_id] = line - 1
    text_of = dict(zip(task.corpus_ids, task.corpus_texts))
    for doc_id in task.corpus_ids:
        if doc_id not in row_of:
            raise DataError(f"document '{doc_id}' of the pool has no embedding row (precomputed embeddings need a "
                            "corpus with ids: a BEIR folder or --corpus, containing every positive)", path=ids_path)
    for line, doc_id in enumerate(ids, start=1):
        if doc_id not in text_of:
            raise DataError(f"id '{doc_id}' is not in the corpus", path=ids_path, line=line)
    old_to_new = np.array([row_of[d] for d in task.corpus_ids], dtype=np.int64)
    task.pos_idx = old_to_new[task.pos_idx]
    task.corpus_ids = ids
    task.corpus_texts = [text_of[d] for d in ids]
    task.description["precomputed_embeddings"] = {"path": str(embeddings), "ids": str(ids_path)}
    return source


class TeacherRescorer:
    """Rescore the window's candidates and the positives with a teacher reranker (embedkit.models.reranker).

    The teacher is loaded by `load_reranker`, so its pairs are tokenized, batched and scored exactly as
    `embedkit eval --rerank` and `embedkit rag --rerank` score them; a sentence-transformers CrossEncoder folder
    loads too (it is a Hugging Face sequence-classification folder), and an embedding model is refused in one line.

    Scores are the teacher's logits, not its sigmoid probabilities: they become the rows' teacher scores for
    `loss.distillation` (margin_mse compares positive - negative margins, kl a softmax over the scores), and the
    sigmoid squashes exactly the margins that matter, between a confident positive and a hard negative (logits 8 and
    12 both become ~1.0), while a reranker student's own scores are logits. A bi-encoder student compares cosine
    margins (at most 2) with them: margin_mse then matches the teacher's smaller margins and pushes the larger ones
    as far as cosine allows; kl with `loss.distillation_temperature` rescales the teacher instead. The mining margins
    (--absolute-margin, --relative-margin) are applied to these logits too.
    """

    def __init__(self, path: str | Path, task: MiningTask, *, batch_size: int = 32, device: Any = "cpu") -> None:
        from embedkit.models.reranker import load_reranker  # imports torch: only when a teacher is asked for

        path = Path(path)
        if not path.is_dir():
            raise ConfigError("teacher folder not found (no pretrained reranker ships with embedkit; give a "
                              "reranker folder from 'embedkit train' with task: rerank, or a sentence-transformers "
                              "CrossEncoder folder)", path=path, field="teacher")
        self.model = load_reranker(path, device=resolve_device(device, field="--device"))
        self.path = str(path)
        self.task = task
        self.batch_size = batch_size

    def describe(self) -> dict[str, Any]:
        """The teacher as the manifest records it (name, path, fingerprint, ...), plus what its scores are."""
        return {**self.model.describe(), "scores": "logits"}

    def _score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        return self.model.score([q for q, _ in pairs], [d for _, d in pairs], batch_size=self.batch_size,
                                logits=True)

    def score_candidates(self, query_positions: np.ndarray, cand_idx: np.ndarray, mask: np.ndarray) -> np.ndarray:
        rows, cols = np.nonzero(mask)
        pairs = [(self.task.query_texts[query_positions[r]], self.task.corpus_texts[cand_idx[r, c]])
                 for r, c in zip(rows, cols)]
        out = np.zeros(cand_idx.shape, dtype=np.float32)
        out[rows, cols] = self._score(pairs)
        return out

    def score_positives(self, query_positions: np.ndarray, pos_idx: np.ndarray) -> np.ndarray:
        return self._score([(self.task.query_texts[q], self.task.corpus_texts[d])
                            for q, d in zip(query_positions, pos_idx)])


def iter_rows(task: MiningTask, query_vectors: Callable[[int, int], np.ndarray] | np.ndarray,
              corpus: VectorSource, settings: MiningSettings, stats: MiningStats, *,
              rescorer=None, progress: bool = False) -> Iterator[dict[str, Any]]:
    """Output rows, one per (query, positive), block by block. Short queries follow settings.on_short."""
    n = settings.num_negatives
    for block in mine_embeddings(query_vectors, task.n_queries, corpus, task.pos_ptr, task.pos_idx, settings,
                                 pos_grade=task.pos_grade, stats=stats, rescorer=rescorer, progress=progress):
        offset = 0
        for r, (negs, neg_scores) in enumerate(zip(block.negatives, block.negative_scores)):
            q = block.start + r
            positives = task.positives_of(q)
            pos_scores = block.positive_scores[offset:offset + positives.size]
            offset += positives.size
            if negs.size < n and settings.on_short == "drop":
                continue
            negative_texts = [task.corpus_texts[i] for i in negs]
            negative_ids = [task.corpus_ids[i] for i in negs]
            tail = [round(float(s), 6) for s in neg_scores]
            for p, p_score in zip(positives, pos_scores):
                yield {"query": task.query_texts[q], "positive": task.corpus_texts[p], "negatives": negative_texts,
                       "scores": [round(float(p_score), 6), *tail], "query_id": task.query_ids[q],
                       "positive_id": task.corpus_ids[p], "negative_ids": negative_ids}


def query_encoder(encoder, task: MiningTask, batch_size: int) -> Callable[[int, int], np.ndarray]:
    def encode(a: int, b: int) -> np.ndarray:
        return np.asarray(encoder.encode(task.query_texts[a:b], kind="query", batch_size=batch_size, normalize=True),
                          dtype=np.float32)
    return encode


def short_report(task: MiningTask, stats: MiningStats, settings: MiningSettings) -> list[dict[str, Any]]:
    return [{"query_id": task.query_ids[s["query"]], "query": task.query_texts[s["query"]], "found": s["found"],
             "wanted": settings.num_negatives, "positives": int(task.positives_of(s["query"]).size),
             "rows": "dropped" if settings.on_short == "drop" else "kept"} for s in stats.short]
