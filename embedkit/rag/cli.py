"""`embedkit rag ...`: index a corpus, add/delete documents, query, evaluate, and serve a search page.

Registered by embedkit/cli.py as a typer sub-app. Heavy imports (torch, faiss, fastapi) stay inside the commands
so `embedkit --help` stays fast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import typer

from embedkit.atomic import write_json
from embedkit.device import DEVICE_HELP, resolve_device
from embedkit.errors import ConfigError, DataError
from embedkit.launch import (NNODES_OPTION, NODE_RANK_OPTION, NPROC_HELP, RAY_ADDRESS_OPTION, RAY_OPTION,
                             RAY_WORKERS_OPTION, RDZV_BACKEND_OPTION, RDZV_ENDPOINT_OPTION, RDZV_ID_OPTION,
                             SHARD_SIZE_OPTION, processes)
from embedkit.logs import quieten
from embedkit.manifest import base_manifest, device_fields, sha256_texts
from embedkit.rag.filters import parse_filter

log = logging.getLogger(__name__)

rag_app = typer.Typer(
    help="Retrieval-augmented generation: a vector index (FAISS, or Milvus with --store milvus) over your corpus, "
         "searched, evaluated and served as a web page.\n\nExample: embedkit rag index --model minilm --corpus ../shared/data/scifact --output runs/rag && "
         "embedkit rag query runs/rag \"does vitamin D prevent fractures?\"",
    no_args_is_help=True,
)

_MODEL_HELP = ("Model to embed the queries with. Default: the model the index was built with (recorded in its "
               "manifest). Any other model is refused: its vectors would not match the index.")
_HYBRID_HELP = ("Hybrid retrieval: fuse the dense ranking with BM25 (reciprocal rank fusion over the top 100 of each; "
                "needs bm25s: the rag extra of embedkit).")
_WEIGHT_HELP = "Hybrid only: BM25's share of the fusion, 0 (dense only) to 1 (BM25 first, dense breaks ties)."
_DEVICE_OPTION = typer.Option("auto", "--device", help=f"Where the embedding model runs: {DEVICE_HELP}")
_RERANK_HELP = ("A reranker (cross-encoder folder from 'embedkit train' with task: rerank, or a sentence-transformers "
                "CrossEncoder) that orders the first stage's top --rerank-top documents, as 'embedkit eval --rerank' "
                "does; results then show its score (0..1).")
_FILTER_HELP = ("Only documents whose metadata (the 'metadata' object of corpus.jsonl rows) passes this filter, e.g. "
                "'source == \"manual\" and year >= 2020' (== != < <= > >=, in [...], and / or / not; Milvus's "
                "syntax, on either store).")
# embedkit eval's default (eval.runner.DEFAULT_TOP_K, not imported: it would load numpy for `embedkit --help`), so
# `rag eval --rerank` and `embedkit eval --rerank` agree by default
_RERANK_TOP = 100


@rag_app.command("index")
def index_command(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", "-m", help="'minilm', 'smollm2-135m', a model folder or a hub id."),
    corpus: Path = typer.Option(
        ..., "--corpus", "-c",
        help="Documents: a BEIR folder (its corpus.jsonl), a corpus.jsonl ({\"_id\", \"title\", \"text\"} per line), "
             "a .txt (one passage per line; ids are FILE:LINE), or a folder of .txt / .md files (cut into passages "
             "of about 200 words at paragraph breaks; ids are PATH#N)."),
    output: Path = typer.Option(..., "--output", "-o", help="Index folder to write (an older index there is replaced)."),
    index_type: str = typer.Option(
        "auto", "--index-type",
        help="'flat' (exact inner product), 'hnsw' (graph, approximate, fast at scale), 'ivf' or 'ivf-flat' (inverted "
             "lists, approximate), 'ivfpq' or 'ivf-pq' (IVF over compressed vectors: a sixteenth of flat's memory, "
             "recall@10 ~0.72 of exact, ~0.93 within its top 100, what a reranker over it sees; FAISS only, 9,984 "
             "documents or more), "
             "or 'auto': flat below --hnsw-threshold documents, HNSW from there (the choice is printed)."),
    hnsw_threshold: int | None = typer.Option(
        None, "--hnsw-threshold", min=1,
        help="'auto': corpus size from which HNSW is used (default: 100,000 documents for a 384-d model, fewer for "
             "wider vectors: where exact search passes ~10 ms a query on one core; docs/rag.md, Choosing the index)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Documents per encoder forward pass (32 = the "
                                                                   "eval runner's, which keeps rag eval == eval)."),
    bm25: bool = typer.Option(True, "--bm25/--no-bm25", help="Also build the BM25 part for --hybrid (when bm25s is "
                                                             "installed)."),
    store: str = typer.Option(
        "faiss", "--store",
        help="Where the vectors live: 'faiss' (index.faiss in the folder) or 'milvus' (a Milvus Lite file in the "
             "folder, or a Milvus server with --milvus-uri; needs the milvus extra). Flat and HNSW on both; IVF and "
             "IVF-PQ on FAISS only."),
    milvus_uri: Optional[str] = typer.Option(
        None, "--milvus-uri",
        help="--store milvus: a Milvus server (http://host:19530; token from $MILVUS_TOKEN) or a Milvus Lite .db "
             "path outside the folder, instead of the Lite file inside it. Add and delete then change its "
             "collection in place."),
    milvus_collection: Optional[str] = typer.Option(
        None, "--milvus-collection", help="--milvus-uri: the collection (default embedkit_rag_<output folder name>)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress messages."),
    device: str = _DEVICE_OPTION,
    nproc: int = typer.Option(1, "--nproc", min=1, help=NPROC_HELP),
    nnodes: int = NNODES_OPTION,
    node_rank: int = NODE_RANK_OPTION,
    rdzv_endpoint: str | None = RDZV_ENDPOINT_OPTION,
    rdzv_backend: str = RDZV_BACKEND_OPTION,
    rdzv_id: str = RDZV_ID_OPTION,
    ray: bool = RAY_OPTION,
    ray_address: str | None = RAY_ADDRESS_OPTION,
    ray_workers: int | None = RAY_WORKERS_OPTION,
    shard_size: int = SHARD_SIZE_OPTION,
) -> None:
    """Embed a corpus and write a RAG index folder: vectors (FAISS or Milvus), document store (SQLite), BM25, manifest.

    The manifest records the model fingerprint (queries with another model are refused), the corpus hash, the index
    type and the counts. Documents can be added and deleted later without a rebuild (embedkit rag add / delete).
    --nproc N encodes the corpus in N processes (torch.distributed: gloo on the CPU, nccl with one GPU each); the
    first builds and writes the index, identical to a one-process build. --ray encodes it on Ray Data (a local Ray,
    or --ray-address) into vector shards beside the index (OUTPUT.shards/, removed once the index is written): run
    the same command again after an interruption and it resumes from the finished shards.

    Metadata of corpus.jsonl rows ("metadata": {...}) is stored and can be filtered on (--filter).

    Examples:

      embedkit rag index --model minilm --corpus ../shared/data/scifact --output runs/scifact-index

      embedkit rag index --model minilm --corpus docs.jsonl --output runs/docs-index --store milvus
    """
    from embedkit.models import load_model
    from embedkit.data.documents import load_documents
    from embedkit.rag.bm25 import bm25_available
    from embedkit.rag.index import build_index, canonical_index_type, check_store_index_type, choose_index_type
    from embedkit.models.ray_encode import check_ray_options, ray_settings

    index_type = canonical_index_type(index_type)
    check_ray_options(ray, ray_address, nproc)
    on_ray = ray_settings(ray, ray_address, ray_workers, shard_size, device)
    choose_index_type(0, index_type)  # bad options and a bad corpus fail before the model loads
    check_store_index_type(store, index_type)
    if store != "milvus" and (milvus_uri or milvus_collection):
        raise ConfigError("--milvus-uri and --milvus-collection need --store milvus", field="store")
    docs = load_documents(corpus)
    if quiet:
        quieten()
    with processes(nproc, device, ctx=ctx) as procs:
        log.info("read %d documents; loading model %s%s", len(docs), model,
                 f" ({procs.world} processes)" if procs.world > 1 else "")
        encoder = load_model(model, device=procs.device)
        with procs.shard(encoder):
            index = build_index(encoder, docs, output, index_type=index_type, hnsw_threshold=hnsw_threshold,
                                batch_size=batch_size, bm25=bm25 and bm25_available(), progress=True, source=corpus,
                                write=procs.is_main, store=store, milvus_uri=milvus_uri,
                                milvus_collection=milvus_collection,
                                ray=on_ray)
    if index is None:
        return
    info = index.describe()
    build = index.manifest.get("build", {})
    typer.echo(f"indexed {info['documents']} documents into {output} ({info['vector_store']} {info['type']} index, "
               f"{info['dim']}-d, "
               f"bm25 {'yes' if info['bm25'] else 'no'}; encode {build.get('encode_s', 0):.1f}s, index "
               f"{build.get('index_s', 0):.1f}s; model {info['model']}, fingerprint {info['fingerprint'][:12]})")


@rag_app.command("add")
def add_command(
    index_path: Path = typer.Argument(..., help="Index folder (from embedkit rag index)."),
    corpus: Path = typer.Option(..., "--corpus", "-c", help="Documents to add: corpus.jsonl, .txt or BEIR folder."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Documents per encoder forward pass."),
) -> None:
    """Add documents to an index without rebuilding it (only the new documents are encoded).

    Ids already in the index are refused (delete them first to replace a document).

    Example: embedkit rag add runs/scifact-index --corpus new_abstracts.jsonl
    """
    from embedkit.rag.index import RagIndex, load_index_encoder

    index = RagIndex.load(index_path)
    encoder = load_index_encoder(index, model)
    added = index.add(encoder, corpus, batch_size=batch_size)
    typer.echo(f"added {added} documents; the index now holds {len(index)}")


@rag_app.command("delete")
def delete_command(
    index_path: Path = typer.Argument(..., help="Index folder."),
    ids: Optional[List[str]] = typer.Argument(None, help="Document ids to delete."),
    ids_file: Optional[Path] = typer.Option(None, "--ids-file", help="Also delete the ids in this file (one a line)."),
    missing_ok: bool = typer.Option(False, "--missing-ok", help="Ignore ids that are not in the index."),
) -> None:
    """Delete documents by id (removed from flat/IVF/IVF-PQ indexes; tombstoned and filtered out in HNSW graphs).

    Example: embedkit rag delete runs/scifact-index 4983 5836
    """
    from embedkit.rag.index import RagIndex

    wanted = list(ids or [])
    if ids_file is not None:
        if not ids_file.is_file():
            raise DataError("ids file not found", path=ids_file)
        wanted += [line.strip() for line in ids_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not wanted:
        raise ConfigError("give document ids to delete (arguments or --ids-file)", field="ids")
    index = RagIndex.load(index_path)
    deleted = index.delete(wanted, missing_ok=missing_ok)
    typer.echo(f"deleted {deleted} documents; the index now holds {len(index)}")


@rag_app.command("query")
def query_command(
    index_path: Path = typer.Argument(..., help="Index folder."),
    question: str = typer.Argument(..., help="The query text."),
    k: int = typer.Option(5, "-k", "--top-k", min=1, help="Number of results."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    hybrid: bool = typer.Option(False, "--hybrid", help=_HYBRID_HELP),
    hybrid_weight: float = typer.Option(0.5, "--hybrid-weight", min=0.0, max=1.0, help=_WEIGHT_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    width: int = typer.Option(160, "--width", min=20, help="Characters of each passage to print."),
    rerank: Optional[str] = typer.Option(None, "--rerank", help=_RERANK_HELP),
    rerank_top: int = typer.Option(_RERANK_TOP, "--rerank-top", min=1,
                                   help="Documents the first stage retrieves for the reranker (at least -k)."),
    filter: Optional[str] = typer.Option(None, "--filter", help=_FILTER_HELP),
    device: str = typer.Option("auto", "--device", help=f"Where the models run: {DEVICE_HELP}"),
) -> None:
    """Search an index and print the top-k documents with their scores.

    Examples:

      embedkit rag query runs/scifact-index "does vitamin D prevent fractures?" -k 5 --hybrid

      embedkit rag query runs/scifact-index "does vitamin D prevent fractures?" --rerank runs/my-reranker

      embedkit rag query runs/docs-index "how do I reset it?" --filter 'source == "manual"'
    """
    from embedkit.rag.index import RagIndex, check_queries, check_rerank_top, load_index_encoder

    check_queries([question])  # an empty query fails before the model loads
    flt = parse_filter(filter)
    if rerank is not None:
        check_rerank_top(rerank_top, k)
    target = resolve_device(device)
    index = RagIndex.load(index_path)
    reranker = _load_reranker(rerank, target)
    encoder = load_index_encoder(index, model, device=target)
    hits = index.search(encoder, question, k=k, hybrid=hybrid, hybrid_weight=hybrid_weight, reranker=reranker,
                        rerank_top=rerank_top, filter=flt)
    if json_output:
        typer.echo(json.dumps([h.to_dict() for h in hits], indent=2, ensure_ascii=False))
        return
    for hit in hits:
        passage = " ".join(f"{hit.title} {hit.text}".split())
        passage = passage if len(passage) <= width else passage[:width - 3] + "..."
        typer.echo(f"{hit.rank:>3}. {hit.score:.4f}  {hit.doc_id}  {passage}")
    if not hits:
        typer.echo("no results")


@rag_app.command("eval")
def eval_command(
    index_path: Path = typer.Argument(..., help="Index folder."),
    beir: Optional[Path] = typer.Option(None, "--beir", help="BEIR folder giving queries.jsonl and qrels/<split>.tsv."),
    split: str = typer.Option("test", "--split", help="--beir: which qrels split."),
    queries: Optional[Path] = typer.Option(None, "--queries", help="queries.jsonl ({\"_id\", \"text\"} per line)."),
    qrels: Optional[Path] = typer.Option(None, "--qrels", help="qrels .tsv (query-id, corpus-id, score; header "
                                                               "optional); its corpus ids must be in the index."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    hybrid: bool = typer.Option(False, "--hybrid", help=_HYBRID_HELP),
    hybrid_weight: float = typer.Option(0.5, "--hybrid-weight", min=0.0, max=1.0, help=_WEIGHT_HELP),
    k_values: str = typer.Option("1,3,5,10,100", "--k-values", help="Recall cut-offs, comma-separated."),
    latency_queries: Optional[int] = typer.Option(
        None, "--latency-queries", min=0,
        help="Time only the first N queries one by one (default: all; 0: no latency pass)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Queries (and reranked pairs) per forward pass."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the full result (per-query "
                                                                       "metrics included) as JSON here."),
    rerank: Optional[str] = typer.Option(None, "--rerank", help=_RERANK_HELP + " The metrics and per-query values "
                                         "become the two-stage ones (first-stage metrics kept under first_stage)."),
    rerank_top: int = typer.Option(_RERANK_TOP, "--rerank-top", min=1,
                                   help="Documents per query the reranker orders (at most the largest of 100 and "
                                        "--k-values)."),
    filter: Optional[str] = typer.Option(None, "--filter", help=_FILTER_HELP + " Judged documents it excludes count "
                                                                               "as not found."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress messages."),
    device: str = typer.Option("auto", "--device", help=f"Where the models run: {DEVICE_HELP}"),
) -> None:
    """Evaluate retrieval through the index: Recall@k, nDCG@10, MRR@10, MAP@100, and latency per query.

    On an exact (flat) index of a BEIR corpus, FAISS or Milvus, nDCG@10 equals `embedkit eval` on the same folder
    and model, and
    with --rerank every query's values equal `embedkit eval --rerank`'s (same --rerank-top). Latency is measured
    per single query (encode + search + fetch, + rerank), median and p95.

    Examples:

      embedkit rag eval runs/scifact-index --beir ../shared/data/scifact --split test

      embedkit rag eval runs/my-index --queries queries.jsonl --qrels qrels.tsv --hybrid

      embedkit rag eval runs/scifact-index --beir ../shared/data/scifact --rerank runs/my-reranker --rerank-top 100
    """
    from embedkit.data.beir import synthetic_marker, synthetic_note
    from embedkit.rag.evaluate import evaluate_index
    from embedkit.rag.index import RagIndex, load_index_encoder

    try:
        ks = [int(x) for x in k_values.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--k-values must be integers separated by commas, not {k_values!r}",
                          field="k-values") from None
    flt = parse_filter(filter)
    target = resolve_device(device)
    index = RagIndex.load(index_path)
    query_texts, judgments = _read_eval_data(index, beir, split, queries, qrels)
    reranker = _load_reranker(rerank, target)  # a wrong kind fails in one line, before anything is logged
    if quiet:
        quieten()
    log.info("loading the index's model")
    encoder = load_index_encoder(index, model, device=target)
    result = evaluate_index(index, encoder, query_texts, judgments, ks, hybrid=hybrid,
                            hybrid_weight=hybrid_weight, batch_size=batch_size, latency_queries=latency_queries,
                            progress=True, reranker=reranker, rerank_top=rerank_top, filter=flt)
    synthetic = synthetic_marker(beir if beir is not None else queries.parent if queries is not None else None)
    if synthetic is not None:  # generated queries (embedkit synth --eval): the report and the output say so
        result["synthetic"] = synthetic
    if output is not None:
        write_json(output, base_manifest("rag_eval", **device_fields(target), **result))
    m, lat = result["metrics"], result["latency"]
    mode = f"hybrid (BM25 weight {hybrid_weight})" if hybrid else "dense"
    if reranker is not None:
        mode += (f", reranked by {rerank} (top {rerank_top}; first stage ndcg_at_10 "
                 f"{result['first_stage']['metrics']['ndcg_at_10']:.4f})")
    if flt is not None:
        mode += f", filter {flt.text}"
    typer.echo(f"{result['batch']['queries']} queries, {result['index']['documents']} documents, "
               f"{result['index']['vector_store']} {result['index']['type']} index, {mode}")
    if synthetic is not None:
        typer.echo(synthetic_note(synthetic))
    typer.echo(f"{'ndcg_at_10':<14} {m['ndcg_at_10']:.4f}")
    for k in sorted(int(name.rsplit('_', 1)[1]) for name in m if name.startswith("recall_at_")):
        typer.echo(f"{f'recall_at_{k}':<14} {m[f'recall_at_{k}']:.4f}")
    typer.echo(f"{'mrr_at_10':<14} {m['mrr_at_10']:.4f}")
    typer.echo(f"{'map_at_100':<14} {m['map_at_100']:.4f}")
    if lat["queries"]:
        reranking = f", rerank {lat['rerank_median_ms']:.1f} ms" if reranker is not None else ""
        typer.echo(f"latency per query (k={lat['k']}, {lat['queries']} queries one by one): median "
                   f"{lat['median_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms (encode {lat['encode_median_ms']:.1f} ms, "
                   f"search {lat['search_median_ms']:.2f} ms{reranking} median)")
    if output is not None:
        typer.echo(f"wrote {output}")


def _read_eval_data(index, beir: Path | None, split: str, queries: Path | None, qrels: Path | None):
    from embedkit.data.beir import load_beir, read_qrels, read_queries

    if beir is not None:
        if queries is not None or qrels is not None:
            raise ConfigError("give either --beir or --queries with --qrels, not both", field="beir")
        data = load_beir(beir, split)
        corpus_hash = sha256_texts(t for i, row in data.corpus.items() for t in (i, row["title"], row["text"]))
        if corpus_hash != index.manifest["corpus"].get("sha256"):
            # Not an error (an index may hold more or fewer documents on purpose), but the numbers then differ
            # from `embedkit eval` on this folder.
            log.warning("note: the index's documents are not exactly %s/corpus.jsonl", beir)
        return data.queries, data.qrels
    if queries is None or qrels is None:
        raise ConfigError("give --beir DIR, or both --queries and --qrels", field="queries")
    query_texts = read_queries(queries)
    # The index's document ids stand in for the corpus: a judged id missing from the index is named with its line.
    return query_texts, read_qrels(qrels, index.store.all_doc_ids(), query_texts)


@rag_app.command("web")
def web_command(
    index_path: Path = typer.Argument(..., help="Index folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8080, "--port", "-p", help="Port to listen on."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    k: int = typer.Option(5, "-k", "--top-k", min=1, max=50, help="Default number of results."),
    hybrid: bool = typer.Option(False, "--hybrid", help="Default to hybrid retrieval (the page can switch)."),
    hybrid_weight: float = typer.Option(0.5, "--hybrid-weight", min=0.0, max=1.0, help=_WEIGHT_HELP),
    generator: Optional[str] = typer.Option(
        None, "--generator",
        help="Model with a generative head ('smollm2-135m' or a folder from 'embedkit llm') that writes an answer "
             "citing the passages [1], [2] ... Default: the index's model, when it has one."),
    no_generator: bool = typer.Option(False, "--no-generator", help="Never generate answers."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Length limit of a generated answer."),
    answer_passages: int = typer.Option(3, "--answer-passages", min=1, help="Top passages given to the generator."),
    rerank: Optional[str] = typer.Option(None, "--rerank", help=_RERANK_HELP + " The generator is given the "
                                                                               "reranked passages."),
    rerank_top: int = typer.Option(_RERANK_TOP, "--rerank-top", min=1,
                                   help="Documents the first stage retrieves for the reranker (raised to a request's "
                                        "k when that is larger)."),
    filter: Optional[str] = typer.Option(None, "--filter", help=_FILTER_HELP + " The default of the page and the "
                                                                               "API (a request's filter= replaces it)."),
    device: str = typer.Option("auto", "--device",
                               help=f"Where the embedding model, the reranker and the generator run: {DEVICE_HELP}"),
) -> None:
    """Serve a search page over an index on 127.0.0.1: search box, ranked highlighted passages, generated answers.

    Results show their scores with the query terms highlighted; when a generative head is available (--generator,
    or the index's own model) an answer citing the passages [1], [2] ... is shown above them. With --rerank the
    reranker orders the results (and so the passages the answer is written from) and its score is shown. Also
    GET /api/search?q=...&k=5[&filter=...] (JSON; an empty q or a bad filter is a 400) and GET /health. When `rag add` / `rag delete` swap in a
    new index folder, the next request loads it: deleted documents are never served.

    Example: embedkit rag web runs/scifact-index --port 8080   then open http://127.0.0.1:8080/?q=vitamin+D
    """
    from embedkit.rag.index import RagIndex, load_index_encoder
    from embedkit.rag.web import serve_web

    flt = parse_filter(filter)
    target = resolve_device(device)
    index = RagIndex.load(index_path)
    reranker = _load_reranker(rerank, target)
    encoder = load_index_encoder(index, model, device=target)
    answerer = None if no_generator else _answerer(index, generator, max_new_tokens, str(target))
    log.info("serving %d documents at http://%s:%d/ (%s%s); Ctrl-C stops", len(index), host, port,
             f"answers from {answerer.source}" if answerer else "no generated answers",
             f", reranked by {rerank}" if reranker is not None else "")
    serve_web(index, encoder, host=host, port=port, answerer=answerer, default_k=k, hybrid=hybrid,
              hybrid_weight=hybrid_weight, answer_passages=answer_passages, reranker=reranker,
              rerank_top=rerank_top, filter=flt.text if flt is not None else None)


def _load_reranker(rerank: str | None, device):
    """The --rerank model, or None. An embedding model given here is a ModelError naming both kinds, which the
    command prints as one line (exit 2)."""
    if rerank is None:
        return None
    from embedkit.models.reranker import load_reranker

    return load_reranker(rerank, device=device)


class _GeneratorAnswerer:
    """(question, passages) -> answer, through embedkit.llm.generate (imported only when answers are wanted)."""

    def __init__(self, generator, source: str, max_new_tokens: int) -> None:
        self.generator, self.source, self.max_new_tokens = generator, source, max_new_tokens

    def __call__(self, question: str, passages: list[str]) -> str:
        return self.generator.answer(question, passages, max_new_tokens=self.max_new_tokens)


def _answerer(index, generator: str | Path | None, max_new_tokens: int,
              device: str = "cpu") -> _GeneratorAnswerer | None:
    try:
        from embedkit.llm.generate import load_generator
        from embedkit.llm.model import has_generative_head
    except ImportError as exc:
        if generator is not None:
            raise ConfigError(f"--generator needs embedkit.llm ({exc})", field="generator") from None
        return None
    if generator is not None:
        if Path(generator).is_dir() and not has_generative_head(generator):
            raise ConfigError("this model folder has no generative head (an embedding-only save?)", path=generator,
                              field="generator")
        return _GeneratorAnswerer(load_generator(generator, device=device), str(generator), max_new_tokens)  # names too
    model_path = index.manifest["model"].get("path")
    if model_path and Path(model_path).is_dir() and has_generative_head(model_path):
        return _GeneratorAnswerer(load_generator(model_path, device=device), model_path, max_new_tokens)
    return None
