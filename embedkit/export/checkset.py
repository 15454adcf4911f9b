"""The small retrieval check set an export is verified on (nDCG@10 of the exported graph vs the torch model).

The built-in set is 40 questions, each with one answering passage, among 40 passages from mixed domains (medicine,
law, finance, science, everyday life), written for embedkit. It needs no files, so an export can be verified
anywhere; pass a BEIR folder (`--check-set DIR`) to verify on your own domain instead.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from embedkit.errors import DataError

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
    """Queries, documents and relevance judgements for a quick retrieval check."""

    name: str
    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]


def builtin_check_set() -> CheckSet:
    queries = {f"q{i}": q for i, (q, _) in enumerate(_PAIRS)}
    corpus = {f"d{i}": d for i, (_, d) in enumerate(_PAIRS)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(len(_PAIRS))}
    return CheckSet("builtin-40", queries, corpus, qrels)


def load_check_set(path: str | Path | None, *, max_queries: int = 200, max_docs: int = 2000,
                   split: str = "test", seed: int = 0) -> CheckSet:
    """The built-in set when `path` is None, else a sample of a BEIR folder (corpus.jsonl, queries.jsonl, qrels/).

    Sampling keeps every judged document of the sampled queries and fills up with other documents to `max_docs`.
    """
    if path is None:
        return builtin_check_set()
    root = Path(path)
    qrels_path = root / "qrels" / f"{split}.tsv"
    for needed in (root / "corpus.jsonl", root / "queries.jsonl", qrels_path):
        if not needed.is_file():
            raise DataError("a check set must be a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)",
                            path=needed)
    qrels: dict[str, dict[str, int]] = {}
    with open(qrels_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            parts = line.rstrip("\n").split("\t")
            if number == 1 and not parts[-1].strip().lstrip("-").isdigit():
                continue  # header
            if len(parts) < 3:
                raise DataError("expected query-id, corpus-id, score", path=qrels_path, line=number)
            if int(parts[2]) > 0:
                qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    queries = _read_jsonl_texts(root / "queries.jsonl", with_title=False)
    corpus = _read_jsonl_texts(root / "corpus.jsonl", with_title=True)
    rng = random.Random(seed)
    qids = sorted(q for q in qrels if q in queries)
    rng.shuffle(qids)
    qids = sorted(qids[:max_queries])
    judged = sorted({d for q in qids for d in qrels[q] if d in corpus})
    others = sorted(set(corpus) - set(judged))
    rng.shuffle(others)
    doc_ids = judged + others[: max(0, max_docs - len(judged))]
    return CheckSet(root.name, {q: queries[q] for q in qids}, {d: corpus[d] for d in doc_ids},
                    {q: {d: g for d, g in qrels[q].items() if d in corpus} for q in qids})


def _read_jsonl_texts(path: Path, *, with_title: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["text"]
                if with_title and row.get("title"):
                    text = f"{row['title']}. {text}"
                out[str(row["_id"])] = text
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError("expected a JSON object with _id and text", path=path, line=number) from None
    return out


def ndcg_at_10(check: CheckSet, encode) -> float:
    """nDCG@10 of `encode(texts, kind) -> vectors` on the check set (exact dot-product search)."""
    import numpy as np

    from embedkit.eval.metrics import retrieval_metrics

    qids, dids = list(check.queries), list(check.corpus)
    q = np.asarray(encode([check.queries[i] for i in qids], "query"), dtype=np.float32)
    d = np.asarray(encode([check.corpus[i] for i in dids], "document"), dtype=np.float32)
    scores = q @ d.T
    k = min(100, len(dids))
    run = {}
    for row, qid in enumerate(qids):
        top = np.argpartition(-scores[row], k - 1)[:k]
        run[qid] = {dids[j]: float(scores[row, j]) for j in top}
    return retrieval_metrics(check.qrels, run).metrics["ndcg_at_10"]
