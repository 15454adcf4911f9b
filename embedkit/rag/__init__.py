"""RAG: a vector index over a corpus (FAISS or Milvus, plus a document store and optional BM25), searched,
evaluated and served.

    from embedkit.models import load_model
    from embedkit.rag import build_index, RagIndex, evaluate_index
    encoder = load_model("minilm")
    index = build_index(encoder, "../shared/data/scifact", "runs/scifact-index")   # flat below 50k docs, else HNSW
    index.search(encoder, "does vitamin D prevent fractures?", k=5)               # -> [Hit(rank, doc_id, score, ...)]
    index.search(encoder, "...", k=5, reranker=load_reranker("runs/my-reranker"), rerank_top=50)  # two stages
    index.add(encoder, {"new-1": {"title": "", "text": "...", "metadata": {"source": "manual"}}})
    index.delete(["new-1"])
    index.search(encoder, "...", k=5, filter='source == "manual"')                # metadata filters (rag.filters)
    build_index(encoder, corpus, "runs/idx", store="milvus")                      # Milvus Lite file in the folder
    evaluate_index(index, encoder, queries, qrels)["metrics"]["ndcg_at_10"]

Names are imported lazily so that importing the package does not import faiss, pymilvus, torch or fastapi.
"""

from __future__ import annotations

from embedkit._lazy import lazy_exports

_EXPORTS = {
    "build_index": "embedkit.rag.index",
    "RagIndex": "embedkit.rag.index",
    "Hit": "embedkit.rag.index",
    "choose_index_type": "embedkit.rag.index",
    "load_index_encoder": "embedkit.rag.index",
    "HNSW_THRESHOLD": "embedkit.rag.index",
    "evaluate_index": "embedkit.rag.evaluate",
    "parse_filter": "embedkit.rag.filters",
    "Filter": "embedkit.rag.filters",
    "load_documents": "embedkit.data.documents",
    "Document": "embedkit.data.documents",
    "create_web_app": "embedkit.rag.web",
    "serve_web": "embedkit.rag.web",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
