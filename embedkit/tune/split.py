"""The dev split `embedkit tune` scores its trials on: carved from the training queries, or the recipe's data.dev.

Carving (when the recipe has no `data.dev`): the distinct query *texts* of the training examples the recipe uses
(after `data.max_examples` / `data.sample`) are drawn with a seeded generator; a drawn query goes to dev with every
one of its pairs, so no query text is on both sides (a BEIR query repeated under another id follows its text).
`--dev-fraction` of the queries (at least 1, at most `--max-dev-queries`) go to dev, the rest train the trials.

What is written (folder `split/` of the tune output, atomically):

- a `beir:` training set: `split/train/` with the original corpus.jsonl and queries.jsonl (symbolic links) and
  `qrels/tune-train.tsv` holding the training queries' judgments, graded as they were, so a trial reads exactly
  the pairs (and, for online mining, the pool and the grades) the final run reads minus the dev queries;
- a pairs file: `split/train.jsonl` with the training queries' rows (query, positive, negatives[, scores]), and,
  when the recipe mines online from its positives, `split/pool.jsonl`: every positive of the used data, so the
  trials mine from the same pool as the final run;
- `split/dev/`: a BEIR folder with the dev queries, their judgments (graded for a BEIR source, 1 otherwise) and a
  corpus of `--dev-docs` documents (0: every document): their positives (and, for pairs files, their negatives),
  then the documents the base model ranks highest for them (`rank`, see below), then seeded random others.
  Scoring every trial against ~1,000 documents keeps dev evaluation cheap (it runs several times per trial).

Why the base model's neighbours (`hard_dev`, the default) and not a random sample: a random sample of a large corpus
holds few documents close to a query, so every trial scores near the ceiling and the dev ranks them by noise (the
first MedQuAD search: 1,000 sampled training pairs of 14,805, every trial between 0.925 and 0.941 on dev, while the
test set, whose topics come with all their question types, separated the same settings by 0.06). The documents the
base model confuses with a query's positives are what fine-tuning has to move, on any corpus: near-duplicates and
siblings (other questions on the same topic, other clauses of the same contract, other tickets of the same product),
and the same holds for short keyword queries (many near matches) and for queries with many positives (every
positive is kept, so none of them counts as a confuser). They come from every document of the training data (the
whole BEIR corpus; every text of a pairs file, also the rows `data.max_examples` leaves out, and the documents of
`mining.corpus`, the team's collection beside its labelled pairs), because the final
model retrieves over the whole corpus, not the sample it trains on. A quarter of the slots stays random, so that a
trial that drifts far from the base model still meets documents the base model did not rank. Dev scores are then
lower than test scores would suggest on a sparse sample and higher than on the full corpus: they rank the trials.

Folds (`carve_dev_splits(folds=k)`, chosen by `embedkit tune` when the training queries are few): every query
text is in exactly one of k seeded folds; fold i's trials train on the other folds and score fold i, all folds
against one dev corpus built as above from all the queries. Every training query then scores once, out of fold: a
trial's dev score stands on all of them instead of a fifth (with 100 queries, 100 instead of 20), at k trainings
per trial, each on as much data as one split's training part.

The final model trains on all of it again (training + dev queries): the recipe's own `data.train`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from embedkit.atomic import atomic_dir
from embedkit.data.beir import CORPUS_FILE, QUERIES_FILE, load_beir, mteb_document_text, read_corpus
from embedkit.data.tuples import read_examples
from embedkit.errors import ConfigError
from embedkit.train.config import parse_train_source
from embedkit.train.trainset import load_examples, subset_indices
from embedkit.tune.leakage import fold
from embedkit.tune.space import can_turn_on_mining

TRAIN_SPLIT = "tune-train"
DEV_SPLIT = "dev"
HARD_SHARE = 0.75  # of the dev corpus slots left after the positives: the base model's neighbours; the rest random
MAX_RANKED_DOCUMENTS = 100_000  # a bigger source is ranked on a seeded sample of this many documents (plus positives)

# rank(queries, documents, k) -> for each query, the indices of its k best documents, best first (the base model)
Ranker = Callable[[Sequence[str], Sequence[str], int], list[list[int]]]


@dataclass
class DevSplit:
    """Where the trials train and are scored (recipe values), and what went where."""

    carved: bool
    train_spec: str  # data.train of the trials
    dev_spec: str  # data.dev of the trials
    mining_corpus: str | None = None  # mining.corpus of the trials (None: the recipe's)
    pairs_file: bool = False  # train_spec is a JSONL written here (columns reset to their defaults)
    seed: int | None = None
    train_queries: int | None = None
    dev_queries: int | None = None
    train_pairs: int | None = None
    dev_pairs: int | None = None
    dev_documents: int | None = None
    pool_documents: int | None = None
    hard_documents: int | None = None  # of dev_documents: the base model's neighbours of the dev queries
    dev_query_texts: list[str] = field(default_factory=list, repr=False)
    fold: int | None = None  # which of `folds` dev folds this is (None: the only split)
    folds: int = 1

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DevSplit":
        """Back from `asdict` (the search state of --resume)."""
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("dev_query_texts")
        return out

    def describe(self) -> str:
        if not self.carved:
            return f"dev = the recipe's data.dev ({self.dev_spec}); the trials train on all of data.train"
        hard = (f", {self.hard_documents:,} of them the base model's nearest to the dev queries"
                if self.hard_documents else "")
        if self.folds > 1:
            return (f"{self.folds} dev folds of ~{self.dev_queries:,} of the {self.train_queries + self.dev_queries:,} "
                    f"training queries: each fold's trial trains on the others and scores its own against "
                    f"{self.dev_documents:,} of {self.pool_documents:,} documents{hard}; every query is scored once, "
                    f"out of fold (seed {self.seed})")
        return (f"{self.train_queries:,} training queries ({self.train_pairs:,} pairs) train the trials; "
                f"{self.dev_queries:,} dev queries ({self.dev_pairs:,} pairs) score them against "
                f"{self.dev_documents:,} of {self.pool_documents:,} documents{hard} (seed {self.seed}; query-disjoint)")


def choose_dev_queries(query_texts: list[str], *, fraction: float, max_queries: int, seed: int,
                       exclude: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """The dev query texts: a seeded sample of the distinct texts (first-appearance order drawn from), none of
    whose folded form (embedkit.tune.leakage.fold) is in `exclude`: queries --test shares with the training data
    train the trials but never score them."""
    distinct = list(dict.fromkeys(query_texts))
    n = len(distinct)
    candidates = [t for t in distinct if fold(t) not in exclude] if exclude else distinct
    if n < 2 or not candidates:
        raise ConfigError(f"the training data has {n} distinct quer{'y' if n == 1 else 'ies'}"
                          f"{f' ({n - len(candidates)} of them test queries)' if exclude else ''}: too few to carve "
                          "a dev split; give the recipe a data.dev", field="data.train")
    n_dev = min(max_queries, max(1, round(fraction * n)), n - 1, len(candidates))
    return set(random.Random(seed).sample(candidates, n_dev))


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.symlink(source.resolve(), target)
    except OSError:  # a file system without symbolic links
        shutil.copyfile(source, target)


def _write_jsonl(path: Path, rows) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def _write_qrels(path: Path, judgments) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, doc_id, score in judgments:
            f.write(f"{qid}\t{doc_id}\t{score}\n")


def _sample_documents(all_ids: list[str], keep: set[str], limit: int, seed: int) -> list[str]:
    """`keep` plus seeded random others, `limit` in all (0: everything), in `all_ids` order."""
    if not limit or limit >= len(all_ids):
        return list(all_ids)
    others = [d for d in all_ids if d not in keep]
    extra = set(random.Random(seed).sample(others, max(0, min(len(others), limit - len(keep)))))
    return [d for d in all_ids if d in keep or d in extra]


def nearest_documents(rank: Ranker, queries: list[str], doc_ids: list[str], text_of: dict[str, str],
                      positives: set[str], slots: int, seed: int) -> list[str]:
    """Up to `slots` documents the ranker puts highest for the dev `queries`, positives excluded: every query's
    best one first, then every query's second, ... (round robin, so no query's neighbourhood crowds out the rest).
    A source of more than MAX_RANKED_DOCUMENTS is ranked on a seeded sample of that many."""
    if slots <= 0 or not queries:
        return []
    candidates = [d for d in doc_ids if d not in positives]
    if len(candidates) > MAX_RANKED_DOCUMENTS:
        candidates = random.Random(seed).sample(candidates, MAX_RANKED_DOCUMENTS)
    depth = min(len(candidates), -(-slots // len(queries)) * 2)  # shared neighbours leave gaps: rank deeper
    if depth == 0:
        return []
    ranked = rank(queries, [text_of[d] for d in candidates], depth)
    chosen: dict[str, None] = {}
    for position in range(depth):
        for row in ranked:
            if position < len(row):
                chosen.setdefault(candidates[row[position]])
                if len(chosen) >= slots:
                    return list(chosen)
    return list(chosen)


def _dev_documents(all_ids: list[str], keep: set[str], limit: int, seed: int, *, rank: Ranker | None,
                   queries: list[str], text_of: dict[str, str]) -> tuple[list[str], int]:
    """The dev corpus (see the module docstring) in `all_ids` order, and how many of it are ranked neighbours."""
    if not limit or limit >= len(all_ids):
        return list(all_ids), 0
    hard: list[str] = []
    if rank is not None:
        hard = nearest_documents(rank, queries, all_ids, text_of, keep, int(HARD_SHARE * (limit - len(keep))),
                                 seed)
    return _sample_documents(all_ids, keep | set(hard), limit, seed), len(hard)


def carve_dev_split(recipe, folder: Path, *, fraction: float = 0.2, max_queries: int = 500, dev_docs: int = 1000,
                    seed: int = 42, rank: Ranker | None = None,
                    exclude: set[str] | frozenset[str] = frozenset()) -> DevSplit:
    """Carve one query-disjoint dev split from `recipe`'s training data into `folder` (replaced atomically).

    `rank`: the base model's ranking (see the module docstring); None: the dev corpus is positives plus random.
    `exclude`: folded query texts never drawn for dev (the test queries the training data repeats)."""
    (split,) = carve_dev_splits(recipe, folder, folds=1, fraction=fraction, max_queries=max_queries,
                                dev_docs=dev_docs, seed=seed, rank=rank, exclude=exclude)
    return split


def fold_query_texts(query_texts: list[str], *, folds: int, seed: int,
                     exclude: set[str] | frozenset[str] = frozenset()) -> list[set[str]]:
    """The distinct query texts in `folds` seeded folds of (nearly) equal size; the `exclude`d ones in none (they
    always train)."""
    distinct = list(dict.fromkeys(query_texts))
    candidates = [t for t in distinct if fold(t) not in exclude]
    if len(candidates) < folds:
        raise ConfigError(f"the training data has {len(candidates)} distinct queries that can score: too few for "
                          f"{folds} dev folds; give the recipe a data.dev", field="data.train")
    random.Random(seed).shuffle(candidates)
    return [set(candidates[i::folds]) for i in range(folds)]


def carve_dev_splits(recipe, folder: Path, *, folds: int = 1, fraction: float = 0.2, max_queries: int = 500,
                     dev_docs: int = 1000, seed: int = 42, rank: Ranker | None = None,
                     exclude: set[str] | frozenset[str] = frozenset()) -> list[DevSplit]:
    """`folds` == 1: one dev split of `fraction` of the queries, written into `folder`. `folds` > 1: every query
    text in exactly one of `folds` dev folds (`fold_query_texts`), fold i written into `folder`/fold-i, its trials
    training on the other folds' queries. The folds share one dev corpus, built as for one split from all their
    queries (so a fold's score and the pooled score are over the same documents)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"the dev fraction must be between 0 and 1 (exclusive), got {fraction}",
                          field="--dev-fraction")
    kind, path, split = parse_train_source(recipe.data.train)
    folder = Path(folder)

    def dev_sets(texts: list[str]) -> list[set[str]]:
        if folds == 1:
            return [choose_dev_queries(texts, fraction=fraction, max_queries=max_queries, seed=seed,
                                       exclude=exclude)]
        return fold_query_texts(texts, folds=folds, seed=seed, exclude=exclude)

    def place(tmp: Path, i: int) -> Path:
        return tmp if folds == 1 else tmp / f"fold-{i}"

    def final(i: int) -> Path:
        return folder if folds == 1 else folder / f"fold-{i}"

    if kind == "beir":
        ds = load_beir(path, split)
        judgments = list(ds.relevant_pairs())  # the order pairs_from_beir (and so load_examples) uses
        chosen = subset_indices(len(judgments), recipe.data, recipe.training.seed)
        if chosen is not None:
            judgments = [judgments[i] for i in chosen]
        sets = dev_sets([ds.queries[q] for q, _, _ in judgments])
        every_dev = set().union(*sets)
        all_dev_j = [j for j in judgments if ds.queries[j[0]] in every_dev]
        all_dev_qids = list(dict.fromkeys(q for q, _, _ in all_dev_j))
        text_of = {d: mteb_document_text(row["title"], row["text"]) for d, row in ds.corpus.items()}
        docs, hard = _dev_documents(list(ds.corpus), {d for _, d, _ in all_dev_j}, dev_docs, seed, rank=rank,
                                    queries=[ds.queries[q] for q in all_dev_qids], text_of=text_of)
        out: list[DevSplit] = []
        with atomic_dir(folder) as tmp:
            for i, dev_texts in enumerate(sets):
                train_j = [j for j in judgments if ds.queries[j[0]] not in dev_texts]
                dev_j = [j for j in judgments if ds.queries[j[0]] in dev_texts]
                dev_qids = list(dict.fromkeys(q for q, _, _ in dev_j))
                base = place(tmp, i)
                train_dir, dev_dir = base / "train", base / "dev"
                train_dir.mkdir(parents=True)
                _link_or_copy(path / CORPUS_FILE, train_dir / CORPUS_FILE)
                _link_or_copy(path / QUERIES_FILE, train_dir / QUERIES_FILE)
                _write_qrels(train_dir / "qrels" / f"{TRAIN_SPLIT}.tsv", train_j)
                dev_dir.mkdir()
                if len(docs) == len(ds.corpus):
                    _link_or_copy(path / CORPUS_FILE, dev_dir / CORPUS_FILE)
                else:
                    _write_jsonl(dev_dir / CORPUS_FILE, ({"_id": d, "title": ds.corpus[d]["title"],
                                                           "text": ds.corpus[d]["text"]} for d in docs))
                _write_jsonl(dev_dir / QUERIES_FILE, ({"_id": q, "text": ds.queries[q]} for q in dev_qids))
                _write_qrels(dev_dir / "qrels" / f"{DEV_SPLIT}.tsv", dev_j)
                train_texts = {ds.queries[q] for q, _, _ in train_j}
                where = final(i)
                out.append(DevSplit(carved=True, train_spec=f"beir:{where / 'train'}:{TRAIN_SPLIT}",
                                    dev_spec=f"beir:{where / 'dev'}:{DEV_SPLIT}", seed=seed,
                                    train_queries=len(train_texts), dev_queries=len(dev_texts),
                                    train_pairs=len(train_j), dev_pairs=len(dev_j), dev_documents=len(docs),
                                    pool_documents=len(ds.corpus), hard_documents=hard,
                                    dev_query_texts=sorted(dev_texts), fold=i if folds > 1 else None,
                                    folds=folds))
        return out

    examples, _source = load_examples(recipe)
    sets = dev_sets([ex.query for ex in examples])
    every_dev = set().union(*sets)
    # The pool: every distinct positive and negative text of the used data, positives first; then, as candidates
    # for the dev corpus only, the texts of the rows data.max_examples left out.
    doc_id: dict[str, str] = {}
    for text in [ex.positive for ex in examples] + [n for ex in examples for n in ex.negatives]:
        doc_id.setdefault(text, f"d{len(doc_id)}")
    if rank is not None and recipe.data.max_examples:
        for text in _all_texts(recipe):
            doc_id.setdefault(text, f"d{len(doc_id)}")
    if rank is not None and recipe.mining.corpus is not None:  # the team's documents: the final model's corpus too
        corpus = Path(recipe.mining.corpus)
        for row in read_corpus(corpus / CORPUS_FILE if corpus.is_dir() else corpus).values():
            doc_id.setdefault(mteb_document_text(row["title"], row["text"]), f"d{len(doc_id)}")
    all_dev_ex = [ex for ex in examples if ex.query in every_dev]
    keep = {doc_id[ex.positive] for ex in all_dev_ex} | {doc_id[n] for ex in all_dev_ex for n in ex.negatives}
    text_of = {v: k for k, v in doc_id.items()}
    docs, hard = _dev_documents(list(doc_id.values()), keep, dev_docs, seed, rank=rank,
                                queries=list(dict.fromkeys(ex.query for ex in all_dev_ex)), text_of=text_of)
    # The trials' mining pool (the recipe mines, or a trial may turn mining on): every positive, as training would use

    negatives = max((len(ex.negatives) for ex in examples), default=0)
    # (a reranker whose rows carry no negatives mines them from that pool at the start of every run: train_reranker)
    mines = recipe.mining.online or can_turn_on_mining(recipe, negatives) or (recipe.task == "rerank" and not negatives)
    mines_positives = recipe.mining.corpus is None and mines
    out = []
    with atomic_dir(folder) as tmp:
        if mines_positives:
            positives = list(dict.fromkeys(ex.positive for ex in examples))
            _write_jsonl(tmp / "pool.jsonl", ({"_id": doc_id[t], "title": "", "text": t} for t in positives))
        for i, dev_texts in enumerate(sets):
            train_ex = [ex for ex in examples if ex.query not in dev_texts]
            dev_ex = [ex for ex in examples if ex.query in dev_texts]
            with_scores = all(ex.scores is not None for ex in train_ex)
            base = place(tmp, i)
            dev_dir = base / "dev"
            dev_dir.mkdir(parents=True)
            _write_jsonl(base / "train.jsonl", (
                {"query": ex.query, "positive": ex.positive, "negatives": list(ex.negatives),
                 **({"scores": list(ex.scores)} if with_scores else {})} for ex in train_ex))
            query_id = {text: f"q{j}" for j, text in enumerate(dict.fromkeys(ex.query for ex in dev_ex))}
            _write_jsonl(dev_dir / "corpus.jsonl", ({"_id": d, "title": "", "text": text_of[d]} for d in docs))
            _write_jsonl(dev_dir / "queries.jsonl", ({"_id": q, "text": t} for t, q in query_id.items()))
            judged = dict.fromkeys((query_id[ex.query], doc_id[ex.positive]) for ex in dev_ex)
            _write_qrels(dev_dir / "qrels" / f"{DEV_SPLIT}.tsv", ((q, d, 1) for q, d in judged))
            where = final(i)
            out.append(DevSplit(carved=True, train_spec=str(where / "train.jsonl"),
                                dev_spec=f"beir:{where / 'dev'}:{DEV_SPLIT}",
                                mining_corpus=str(folder / "pool.jsonl") if mines_positives else None,
                                pairs_file=True, seed=seed, train_queries=len({ex.query for ex in train_ex}),
                                dev_queries=len(dev_texts), train_pairs=len(train_ex), dev_pairs=len(dev_ex),
                                dev_documents=len(docs), pool_documents=len(doc_id), hard_documents=hard,
                                dev_query_texts=sorted(dev_texts), fold=i if folds > 1 else None, folds=folds))
    return out


def _all_texts(recipe):
    """Every positive and negative text of the recipe's pairs file, all rows (not only the data.max_examples kept)."""

    _kind, path, _split = parse_train_source(recipe.data.train)
    cols = recipe.data.columns
    for ex in read_examples(path, query=cols.query, positive=cols.positive, negatives=cols.negatives,
                            scores=cols.scores):
        yield ex.positive
        yield from ex.negatives


def given_dev_split(recipe) -> DevSplit:
    """The recipe names its own dev set: the trials train on all of data.train and are scored on data.dev."""
    return DevSplit(carved=False, train_spec=recipe.data.train, dev_spec=recipe.data.dev)
