"""Real model (embedded all-MiniLM-L6-v2), real data from ../shared/data and the embedded STS-B.

- STS-B test and SICK-R test Spearman equal an independent scipy computation, with cosines checked against
  SentenceTransformer's own embeddings of the same weights;
- on a SciFact subset, nDCG@10 etc. equal mteb's own evaluation (SentenceTransformer model, our data as an mteb
  custom task) within 0.001 (the full SciFact check is bench/bench_eval.py);
- the same eval twice gives identical metrics; compare gates 0 for the same model and 1 for a partly randomised one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from embedkit.eval.compare import compare
from embedkit.eval.runner import evaluate

pytestmark = pytest.mark.integration

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SICK_TEST = SHARED / "sts" / "sick" / "test.jsonl"
SCIFACT = SHARED / "scifact"


@pytest.fixture(scope="module", autouse=True)
def offline():
    mp = pytest.MonkeyPatch()
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        mp.setenv(var, "1")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def minilm():
    from embedkit.models import load_model

    return load_model("minilm")


@pytest.fixture(scope="module")
def st_minilm():
    from sentence_transformers import SentenceTransformer

    from embedkit.models.registry import minilm_path

    return SentenceTransformer(str(minilm_path()), device="cpu")


def test_sts_spearman_equals_independent_scipy(minilm, st_minilm, tmp_path):
    from embedkit.data.defaults import stsb_file

    report = evaluate(minilm, ["stsb", f"sts:{SICK_TEST}"], cache_dir=tmp_path)
    results = report["results"]

    # gold scores read here, independently of embedkit's loaders
    stsb_gold = [float(line.split("\t")[4]) for line in stsb_file("test").read_text(encoding="utf-8").splitlines()
                 if line.strip()]
    sick_rows = [json.loads(line) for line in SICK_TEST.read_text(encoding="utf-8").splitlines() if line.strip()]
    for name, gold in [("stsb", stsb_gold), ("sick-test", [r["score"] for r in sick_rows])]:
        predicted = results[name]["per_pair"]["predicted"]
        assert len(predicted) == len(gold)
        assert results[name]["metrics"]["cosine_spearman"] == pytest.approx(spearmanr(gold, predicted).statistic,
                                                                           abs=1e-12)
    # the cosines themselves: SentenceTransformer on the first 100 SICK pairs
    a = st_minilm.encode([r["sentence1"] for r in sick_rows[:100]], normalize_embeddings=True)
    b = st_minilm.encode([r["sentence2"] for r in sick_rows[:100]], normalize_embeddings=True)
    np.testing.assert_allclose(results["sick-test"]["per_pair"]["predicted"][:100], (a * b).sum(1), atol=1e-5)
    # published all-MiniLM-L6-v2 STSBenchmark (MTEB): 0.8203
    assert results["stsb"]["metrics"]["cosine_spearman"] == pytest.approx(0.8203, abs=0.005)
    assert 0.70 < results["sick-test"]["metrics"]["cosine_spearman"] < 0.85


def _scifact_subset(folder: Path, n_queries: int = 40, n_extra_docs: int = 300) -> Path:
    """The first test queries with their relevant abstracts plus the first corpus abstracts as distractors."""
    qrels = [line.split("\t") for line in (SCIFACT / "qrels" / "test.tsv").read_text().splitlines()[1:] if line]
    qids = list(dict.fromkeys(q for q, _, _ in qrels))[:n_queries]
    kept_qrels = [row for row in qrels if row[0] in qids]
    corpus_lines = (SCIFACT / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    wanted = {d for _, d, _ in kept_qrels}
    docs = [line for i, line in enumerate(corpus_lines) if i < n_extra_docs or json.loads(line)["_id"] in wanted]
    queries = [line for line in (SCIFACT / "queries.jsonl").read_text(encoding="utf-8").splitlines()
               if json.loads(line)["_id"] in qids]
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("\n".join(docs) + "\n", encoding="utf-8")
    (folder / "queries.jsonl").write_text("\n".join(queries) + "\n", encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join("\t".join(r) for r in kept_qrels) + "\n")
    return folder


def test_scifact_subset_matches_mteb_and_is_deterministic(minilm, st_minilm, tmp_path):
    import mteb
    from mteb.cache import ResultCache

    from embedkit.eval.mteb_adapter import to_mteb_task
    from embedkit.eval.tasks import load_task, parse_task_spec

    folder = _scifact_subset(tmp_path / "scifact")
    spec = parse_task_spec(f"beir:{folder}:test")
    first = evaluate(minilm, [spec], cache_dir=tmp_path / "cache")
    second = evaluate(minilm, [spec], cache_dir=tmp_path / "cache", use_cache=False)
    assert json.dumps(first["results"]) == json.dumps(second["results"])  # cache on/off, same bytes

    result = mteb.evaluate(st_minilm, to_mteb_task(load_task(spec)), cache=ResultCache(str(tmp_path / "mteb")),
                           show_progress_bar=False)
    theirs = next(iter(result.task_results[0].scores.values()))[0]
    ours = first["results"][spec.name]["metrics"]
    for metric in ("ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10", "map_at_100"):
        assert ours[metric] == pytest.approx(theirs[metric], abs=1e-3), metric


def test_compare_same_model_passes_and_randomised_model_regresses(minilm, tmp_path):
    import torch

    from embedkit.models import load_model

    from embedkit.data.defaults import load_stsb

    # the first 400 STS-B test pairs keep three evaluations affordable
    stsb = load_stsb("test")
    subset = tmp_path / "stsb400" / "test.jsonl"
    subset.parent.mkdir()
    subset.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": float(s)}) + "\n" for a, b, s in
                              list(zip(stsb.sentences1, stsb.sentences2, stsb.scores))[:400]), encoding="utf-8")
    tasks = [f"sts:{subset}"]
    base = evaluate(minilm, tasks, cache_dir=tmp_path)
    again = evaluate(minilm, tasks, cache_dir=tmp_path)
    assert compare(base, again).exit_code == 0

    damaged = load_model("minilm")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # randomise the last two transformer layers
        for name, param in damaged.named_parameters():
            if ".layer.4." in name or ".layer.5." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    damaged.invalidate_fingerprint()
    assert damaged.fingerprint != minilm.fingerprint
    worse = evaluate(damaged, tasks, cache_dir=tmp_path)
    gate = compare(base, worse)
    assert gate.exit_code == 1, gate.summary_lines()
    assert gate.tasks[0].difference < -0.05
