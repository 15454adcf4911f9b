"""Keep the test out of `embedkit tune`'s choices: a `data.dev` or a `--test` that overlaps the other, or the
training data, is refused before anything trains.

Why: the search keeps the trial with the best dev score and the engine restores the dev-best step, so a dev set
that shares queries with `--test` chooses on the test, and the tuned-vs-default comparison then measures the
choice, not the recipe; a dev query that also trains the model scores memorisation. Three kinds of sharing:

- the same judgments file (a qrels TSV, an STS file, the same embedded or mteb task): one split named twice;
- a query id, where two sides read the same queries.jsonl (ids of different folders are different namespaces);
- a query text (whitespace and case folded): a split copied under new ids, or a public split that repeats queries.
  Two of SciFact's 300 test claims are train claims with the same evidence, and 113 of MedQuAD's 1,495 test
  questions are, up to case, among its 14,805 training questions (10 in recipes/minilm-medquad.yaml's 1,000-pair
  sample): `--allow-train-overlap` accepts such texts between `--test` and the training data only (they train
  every compared model alike), and keeps them out of the carved dev split.

The training side is the data the recipe trains on (`data.max_examples` / `data.sample` applied): what the final
model sees and what the dev split is carved from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from embedkit.errors import ConfigError
from embedkit.train.config import parse_train_source


@dataclass
class Side:
    """One data set's identity: where its judgments live, which queries file its ids index, its queries."""

    name: str  # "data.train" | "data.dev" | "--test"
    spec: str
    judgments: str | None = None  # resolved path of the qrels / STS file, or the task's name
    queries_file: str | None = None  # resolved queries.jsonl (ids are comparable only within one file)
    ids: set[str] = field(default_factory=set)
    texts: dict[str, str] = field(default_factory=dict)  # folded text -> as written


def fold(text: str) -> str:
    return " ".join(text.split()).casefold()


def _resolved(path: Path) -> str:
    return str(Path(path).resolve())


def _queries_side(name: str, spec: str, judgments: str | None, queries_file: str | None, ids, queries) -> Side:
    ids = set(ids)
    return Side(name, spec, judgments, queries_file, ids, {fold(queries[q]): queries[q] for q in ids if q in queries})


def training_side(recipe) -> Side:
    """The queries the recipe trains on, with the qrels file and queries file of a `beir:` training set."""
    from embedkit.train.trainset import load_examples, subset_indices

    kind, path, split = parse_train_source(recipe.data.train)
    if kind == "beir":
        from embedkit.data.beir import QRELS_DIR, QUERIES_FILE, load_beir

        ds = load_beir(path, split)
        judgments = list(ds.relevant_pairs())  # the order load_examples and carve_dev_split use
        chosen = subset_indices(len(judgments), recipe.data, recipe.training.seed)
        if chosen is not None:
            judgments = [judgments[i] for i in chosen]
        return _queries_side("data.train", recipe.data.train, _resolved(path / QRELS_DIR / f"{split}.tsv"),
                             _resolved(path / QUERIES_FILE), (q for q, _, _ in judgments), ds.queries)
    examples, _ = load_examples(recipe)
    return Side("data.train", recipe.data.train, _resolved(path), None, set(),
                {fold(ex.query): ex.query for ex in examples})


def task_side(name: str, loaded) -> Side:
    """A loaded eval task (embedkit.eval.tasks.LoadedTask): a BEIR split, an STS file or a named task."""
    spec = loaded.spec
    data = loaded.data
    if spec.type == "retrieval" and spec.path is not None:
        from embedkit.data.beir import QRELS_DIR, QUERIES_FILE

        folder = Path(spec.path)
        return _queries_side(name, spec.spec, _resolved(folder / QRELS_DIR / f"{spec.split}.tsv"),
                             _resolved(folder / QUERIES_FILE), data.judged_query_ids(), data.queries)
    if spec.type == "retrieval":  # an embedded retrieval task
        return _queries_side(name, spec.spec, f"task {spec.name}", None, data.judged_query_ids(), data.queries)
    return Side(name, spec.spec, _resolved(Path(spec.path)) if spec.path else f"task {spec.name}")


def _example(values) -> str:
    text = sorted(values)[0]
    return repr(text if len(text) <= 60 else text[:57] + "...")


def shared(a: Side, b: Side) -> str | None:
    """What `a` shares with `b`, in words, or None."""
    if a.judgments is not None and a.judgments == b.judgments:
        return f"is the same split as {b.name} ({b.spec})"
    if a.queries_file is not None and a.queries_file == b.queries_file:
        ids = a.ids & b.ids
        if ids:
            return f"shares {len(ids)} of its {len(a.ids)} query ids with {b.name} ({b.spec}), e.g. {_example(ids)}"
    texts = a.texts.keys() & b.texts.keys()
    if texts:
        return (f"shares {len(texts)} of its {len(a.texts)} query texts with {b.name} ({b.spec}), e.g. "
                f"{_example(a.texts[t] for t in texts)}")
    return None


def check_held_out(train: Side, dev: Side | None, test: Side | None, *, source: str | Path | None = None,
                   allow_train_overlap: bool = False) -> set[str]:
    """Refuse (ConfigError naming the field) a dev or test set that overlaps the other or the training data.

    Returns the query texts (folded, see `fold`) `--test` shares with the training data when
    `allow_train_overlap` accepts them: the carved dev split must leave them out."""
    if test is not None and dev is not None:  # first: the search itself would choose on the test
        what = shared(test, dev)
        if what:
            raise ConfigError(f"{test.spec} {what}: the search would choose (and the engine restore) on the test; "
                              "leave data.dev out (tune carves a dev split from the training queries) or give it a "
                              "split of its own", field="--test")
    if dev is not None:
        what = shared(dev, train)
        if what:
            raise ConfigError(f"{dev.spec} {what}: a dev query the model trains on scores memorisation; leave "
                              "data.dev out and tune carves a query-disjoint dev split from the training queries",
                              path=source, field="data.dev")
    if test is None:
        return set()
    structural = Side(train.name, train.spec, train.judgments, train.queries_file, train.ids)  # without texts
    what, hint = shared(test, structural), ""
    if what is None and not allow_train_overlap:
        what = shared(test, train)
        hint = "; --allow-train-overlap accepts query texts a public split repeats (kept out of the dev split)"
    if what:
        raise ConfigError(f"{test.spec} {what}: the test must hold queries the model never trains on{hint}",
                          field="--test")
    return set(test.texts.keys() & train.texts.keys())
