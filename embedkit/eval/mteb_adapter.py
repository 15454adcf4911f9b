"""Bridges to mteb: our Encoder as an mteb model, our local tasks as mteb custom tasks.

So a user can run `mteb.evaluate(MtebEncoder(enc), [to_mteb_task(task)])` on embedkit data, and we can run
any installed mteb task (`mteb:NAME`) with an embedkit encoder. Everything here imports mteb lazily:
the module itself is cheap to import, and mteb is only loaded when a bridge is built.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embedkit.errors import ConfigError, EmbedkitError

_TASK_METADATA_DEFAULTS = {
    "reference": "https://github.com/embeddings-benchmark/mteb",
    "category": "t2t",
    "eval_langs": ["eng-Latn"],
    "date": ("2020-01-01", "2020-01-01"),
    "dialect": ["Written"],
    "domains": [],
    "task_subtypes": [],
    "license": "not specified",
    "annotations_creators": "derived",
    "modalities": ["text"],
    "sample_creation": "found",
    "bibtex_citation": "",
}


def mteb_encoder(encoder: Any) -> Any:
    """Wrap an embedkit Encoder (`encode(texts, kind=...)`, `describe()`) as an mteb EncoderProtocol model.

    mteb calls it with prompt_type=query for queries, document for documents, and None for symmetric tasks
    (STS): None maps to kind="query", the same choice `embedkit.eval.runner` makes for STS.
    """
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType

    describe = encoder.describe()

    class MtebEncoder(AbsEncoder):
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            raw_name = str(describe.get("name") or "model").replace("/", "-")
            self.mteb_model_meta = ModelMeta.create_empty(
                overwrites=dict(
                    name=f"embedkit/{raw_name}",
                    revision=str(describe.get("fingerprint", ""))[:12] or None,
                    embed_dim=describe.get("dim"),
                    max_tokens=describe.get("max_length"),
                    similarity_fn_name=ScoringFunction.COSINE,
                    framework=["PyTorch"],
                )
            )

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):  # noqa: ANN001
            kind = "document" if prompt_type == PromptType.document else "query"
            texts = [text for batch in inputs for text in batch["text"]]
            batch_size = int(kwargs.get("batch_size", 32) or 32)
            return np.asarray(self.inner.encode(texts, kind=kind, batch_size=batch_size, normalize=True), dtype=np.float32)

    return MtebEncoder(encoder)


def to_mteb_task(loaded: Any) -> Any:
    """An mteb custom task (AbsTaskRetrieval / AbsTaskSTS subclass) holding a LoadedTask's data in memory."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    spec, data = loaded.spec, loaded.data
    split = spec.split or "test"
    common = dict(
        name=f"embedkit-{spec.name}",
        description=spec.description or spec.name,
        dataset={"path": spec.path or spec.name, "revision": (loaded.data_hash or "NA")[:40]},
        eval_splits=[split],
        **_TASK_METADATA_DEFAULTS,
    )
    if spec.type == "retrieval":
        judged = data.judged_query_ids()
        queries = Dataset.from_dict({"id": judged, "text": [data.queries[q] for q in judged]})
        doc_ids = list(data.corpus)
        corpus = Dataset.from_dict({
            "id": doc_ids,
            "title": [data.corpus[d]["title"] for d in doc_ids],
            "text": [data.corpus[d]["text"] for d in doc_ids],
        })
        qrels = {q: dict(data.qrels[q]) for q in judged}

        class EmbedkitRetrievalTask(AbsTaskRetrieval):
            metadata = TaskMetadata(type="Retrieval", main_score="ndcg_at_10", **common)

            def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
                self.dataset = {"default": {split: RetrievalSplitData(
                    queries=queries, corpus=corpus, relevant_docs=qrels, top_ranked=None)}}
                self.data_loaded = True

        return EmbedkitRetrievalTask()
    if spec.type == "sts":
        gold = [float(x) for x in data.scores]
        low, high = min(gold), max(gold)

        class EmbedkitStsTask(AbsTaskSTS):
            metadata = TaskMetadata(type="STS", main_score="cosine_spearman", **common)
            min_score = low
            max_score = high

            def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
                self.dataset = DatasetDict({split: Dataset.from_dict(
                    {"sentence1": list(data.sentences1), "sentence2": list(data.sentences2), "score": gold})})
                self.data_loaded = True

        return EmbedkitStsTask()
    raise ConfigError(f"task '{spec.name}' of type '{spec.type}' has no mteb custom-task form", field="task")


def get_mteb_task(name: str) -> Any:
    """The installed mteb task called `name`; an unknown name is a one-line ConfigError."""
    import mteb

    try:
        return mteb.get_task(name)
    except Exception as exc:  # mteb raises KeyError/ValueError variants for unknown names
        raise ConfigError(f"unknown mteb task '{name}' ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})",
                          field="task") from None


def mteb_data_hash(task: Any) -> str:
    """mteb tasks pin their data by dataset revision: name + revision stand in for a content hash."""
    return f"mteb:{task.metadata.name}@{task.metadata.dataset.get('revision', 'unknown')}"


def run_mteb_task(encoder: Any, task: Any, *, batch_size: int, cache_dir: Any) -> dict[str, float]:
    """Evaluate an mteb task object; returns its scores for the first evaluated split and subset.

    Offline, this works only when the task's data is already in the local Hugging Face cache; otherwise the
    hub download fails and we say so in one line instead of a traceback.
    """
    import mteb
    from mteb.cache import ResultCache

    name = task.metadata.name
    try:
        result = mteb.evaluate(
            mteb_encoder(encoder), task, cache=ResultCache(str(cache_dir)), overwrite_strategy="always",
            encode_kwargs={"batch_size": batch_size}, show_progress_bar=False,
        )
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise EmbedkitError(
            f"mteb task '{name}' could not run: {type(exc).__name__}: {first}. Offline, mteb tasks only work when their "
            "data is already in the local Hugging Face cache; use beir:DIR or sts:FILE for local data"
        ) from None
    task_result = result.task_results[0]
    split_scores = next(iter(task_result.scores.values()))
    scores = split_scores[0]
    metrics = {k: float(v) for k, v in sorted(scores.items()) if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics["main_score"] = float(scores["main_score"])
    return metrics
