"""`embedkit synth` (registered by embedkit/cli.py): training pairs or an eval set from documents alone.
Heavy imports (torch, the generator, the filter model) happen only when a run needs them."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import typer

from embedkit.device import DEVICE_HELP
from embedkit.errors import ConfigError
from embedkit.synth.filters import FILTER_NAMES, FilterSettings
from embedkit.synth.generators import ENGINES, GenerationSettings, GeneratorSpec
from embedkit.synth.prompts import CUSTOM, MAX_DOCUMENT_WORDS, NAMED_PROMPTS, load_prompt_file, named_prompt
from embedkit.synth.run import SynthSettings, synthesize
from embedkit.synth.styles import FREE_STYLES

log = logging.getLogger(__name__)
STYLES = (*NAMED_PROMPTS, *FREE_STYLES)
API_KEY_ENV = "EMBEDKIT_API_KEY"


def synth_command(
    corpus: Path = typer.Argument(
        ..., help="Your documents: a BEIR folder (its corpus.jsonl), a corpus.jsonl ({\"_id\", \"title\", \"text\"} "
        "per line), a .txt (one passage per line), or a folder of .txt / .md files (cut into passages of about 200 "
        "words at paragraph breaks, as `embedkit rag index` cuts them)."),
    output: Path = typer.Option(
        ..., "--output", "-o",
        help="Output folder. Training run: pairs.jsonl (query, positive) for `embedkit train` / `tune` / `mine`, "
        "corpus.jsonl, filters.json, embedkit_manifest.json, and generated.jsonl (every generated row; a re-run "
        "resumes from it). With --eval: a BEIR folder for `embedkit eval`."),
    style: str = typer.Option(
        "question", "--style", "-s",
        help="What a query looks like. With a generator: 'question' (a question the document answers: search, "
        "RAG), 'keyword' (2-6 search words), 'claim' (a statement the document supports: fact checking). Without "
        "one, free and instant: 'title' (the title is the query), 'ict' (one sentence is the query, the rest of "
        "the passage the positive), 'crop' (two random spans, Contriever). Measure a generator against these: on "
        "a CPU a 135M generator may not beat them."),
    prompt_file: Optional[Path] = typer.Option(
        None, "--prompt-file",
        help="Your own prompt instead of a named style: a text file with {document} (and optionally {title}), "
        "str.format syntax, or Jinja2 ({{ document }}). Asks the generator for one query; reply with it alone."),
    queries_per_doc: int = typer.Option(
        1, "--queries-per-doc", "-k",
        help="Queries per document. Several per document add variety when documents are few; with a generator "
        "they are sampled (--temperature), and near-duplicates are filtered. ict: distinct sentences; title: one."),
    sample: Optional[int] = typer.Option(
        None, "--sample", "-n",
        help="Use a seeded sample of N documents (default: all). Start small: a 135M generator makes about one "
        "query a second on a CPU."),
    seed: int = typer.Option(42, "--seed", help="Seeds the document sample, the sampling of the generator and the "
                                                "generator-free styles: the same seed, the same output."),
    model: str = typer.Option(
        "smollm2-135m", "--model", "-m",
        help="Generator (in-process): 'smollm2-135m' (embedded, no hub), a causal-LM folder (an `embedkit llm "
        "sft` output), or a Hugging Face id. Zero-shot, SmolLM2-135M writes vague queries; fine-tune it on "
        "(document -> query) pairs, or use a bigger model through --api-base or --engine vllm."),
    engine: str = typer.Option("transformers", "--engine",
                               help=f"In-process engine: {', '.join(ENGINES)}. vllm needs the vllm package and an "
                               "NVIDIA GPU."),
    api_base: Optional[str] = typer.Option(
        None, "--api-base",
        help="Generate through an OpenAI-compatible chat endpoint instead (POST /v1/chat/completions): a vLLM or "
        "LMDeploy server, a hosted API. E.g. http://gpu-box:8000 or https://api.example.com/v1."),
    api_model: Optional[str] = typer.Option(None, "--api-model",
                                            help="The model name the endpoint serves (default: the first of its "
                                            "/v1/models)."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar=API_KEY_ENV, show_default=False,
        help=f"Bearer token for --api-base. Prefer the environment variable {API_KEY_ENV} (kept out of shell "
        "history); never written to any file."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for one endpoint reply."),
    batch_size: int = typer.Option(8, "--batch-size", min=1,
                                   help="Prompts per generate call (length-sorted); parallel requests with "
                                   "--api-base. Each batch is saved before the next starts."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1,
                                       help="Generation budget per query: a query is short, a long budget only "
                                       "buys rambling."),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0,
                                      help="Sampling temperature (0: greedy, then k > 1 repeats itself)."),
    top_p: float = typer.Option(0.9, "--top-p", min=0.0, max=1.0, help="Nucleus sampling."),
    max_document_words: int = typer.Option(MAX_DOCUMENT_WORDS, "--max-document-words", min=1,
                                           help="Words of the document put into the prompt (a longer prompt "
                                           "costs generation time)."),
    min_words: int = typer.Option(2, "--min-words", min=1, help="Filter: drop queries with fewer words."),
    max_words: int = typer.Option(48, "--max-words", min=1, help="Filter: drop queries with more words."),
    max_copy: float = typer.Option(
        0.8, "--max-copy", min=0.0, max=1.0,
        help="Filter: drop a query whose longest word run shared with its positive covers this fraction of it (and "
        "is at least 6 words long): a copied sentence teaches nothing. 1.0 keeps all but exact copies."),
    duplicate_jaccard: float = typer.Option(
        0.8, "--duplicate-jaccard", min=0.0, max=1.0,
        help="Filter: drop a query repeated in the run, or sharing this fraction of its words with an earlier query "
        "of the same document. 1.0: exact repeats only."),
    round_trip_k: int = typer.Option(
        0, "--round-trip-k", min=0,
        help="Filter (Promptagator): keep a query only if --filter-model ranks its source document within the top "
        "K of the whole corpus. Catches vague queries ('What is the answer?'). 0: off. Try 3-10."),
    filter_model: str = typer.Option("minilm", "--filter-model",
                                     help="Embedding model of the round-trip filter: the model you will fine-tune."),
    eval_set: bool = typer.Option(
        False, "--eval",
        help="Write an eval set instead of training data: OUT becomes a BEIR folder (queries.jsonl, "
        "qrels/test.tsv, corpus.jsonl) marked synthetic (synthetic.json), which every `embedkit eval` report on it "
        "carries. Use another --seed or --sample than your training run. Generator styles only."),
    restart: bool = typer.Option(False, "--restart", help="Discard what OUT already holds instead of resuming."),
    device: str = typer.Option("auto", "--device", help=f"Where the generator and the filter model run: "
                                                        f"{DEVICE_HELP}"),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Make (query, document) training pairs, or a synthetic eval set, from documents alone.

    For a team with documents and no labelled queries: a generator writes k queries per document (or a
    generator-free style cuts them out of the document), filters remove the bad ones, and the rest train the
    embedding model like human pairs. Generated-query adaptation (GPL, Promptagator, InPars) is established; its
    known failure is a model worse than the base, so measure it: `embedkit eval` on human queries when you have a
    few, else on a synthetic eval set from a separate run (--eval).

    Interrupted? Run the same command again: it resumes where it stopped (generated.jsonl is appended a batch at a
    time) and never writes a query twice. Changing only the filters re-filters without generating again.

    Exit codes: 0 done; 2 bad input or options (the file, line and field are named); 3 the generator failed (an
    endpoint unreachable or answering an error, vllm unavailable, a model that returns nothing).

    Examples:

      embedkit synth docs/ -o runs/synth-ict --style ict -k 2

      embedkit synth corpus.jsonl -o runs/synth-q --sample 200 --round-trip-k 5

      embedkit synth corpus.jsonl -o runs/synth-q --api-base http://gpu-box:8000 --api-model Qwen/Qwen3-8B

      embedkit synth corpus.jsonl -o runs/synth-eval --eval --sample 300 --seed 7 --round-trip-k 10

      then: embedkit mine -m minilm -d runs/synth-q/pairs.jsonl --corpus runs/synth-q/corpus.jsonl -o mined.jsonl
    """
    if prompt_file is not None:
        if style in FREE_STYLES:
            raise ConfigError(f"--prompt-file replaces a generator style's prompt; --style {style} uses none",
                              field="prompt-file")
        prompt, style_name = load_prompt_file(prompt_file), CUSTOM
    elif style in NAMED_PROMPTS:
        prompt, style_name = named_prompt(style), style
    elif style in FREE_STYLES:
        prompt, style_name = None, style
    else:
        raise ConfigError(f"unknown style {style!r} (choose from: {', '.join(STYLES)})", field="style")
    filters = FilterSettings(min_words=min_words, max_words=max_words, max_copy=max_copy,
                             duplicate_jaccard=None if duplicate_jaccard >= 1.0 else duplicate_jaccard,
                             round_trip_k=round_trip_k)
    settings = SynthSettings(style=style_name, queries_per_doc=queries_per_doc, sample=sample, seed=seed,
                             prompt=prompt, max_document_words=max_document_words, filters=filters,
                             filter_model=filter_model, eval_set=eval_set, restart=restart, device=device)
    generation = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    batch_size=batch_size)
    spec = None
    if prompt is not None:  # a generator-free style loads no generator: its options are not even checked
        spec = GeneratorSpec(model=model, engine=engine, settings=generation, device=device, api_base=api_base,
                             api_model=api_model, api_key=api_key or os.environ.get(API_KEY_ENV), timeout_s=timeout)
    summary = synthesize(corpus, output, settings, spec)
    if json_output:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    rate = f", {summary['queries_per_s']:.2f} queries/s" if summary["queries_per_s"] else ""
    typer.echo(f"{summary['generated_total']} queries from {summary['documents_chosen']} of {summary['documents']} "
               f"documents ({summary['generated_now']} generated now{rate}); {summary['kept']} kept")
    for name in FILTER_NAMES:
        typer.echo(f"  filter {name:<15} removed {summary['removed'][name]}")
    typer.echo("wrote " + ", ".join(summary["files"]))
