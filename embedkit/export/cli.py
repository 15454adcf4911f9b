"""`embedkit export`: a trained model -> an ONNX folder (CPU serving) or a merged HF folder (vLLM / TEI)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from embedkit.errors import ConfigError
from embedkit.models.registry import model_kind, resolve_model_path


def export_command(
    model: str = typer.Option(..., "--model", "-m",
                              help="The model to export: a trained model folder, 'minilm', 'smollm2-135m' or a hub id."),
    output: Path = typer.Option(..., "--output", "-o",
                                help="Folder to write. Replaced only after the export passed its parity checks."),
    format: str = typer.Option("onnx", "--format", "-f",
                               help="'onnx': one graph (transformer + pooling + normalisation) for onnxruntime and "
                                    "`embedkit serve --backend onnx`. 'openvino': that graph as OpenVINO IR "
                                    "(`embedkit serve --backend openvino`; embedding models). 'hf': LoRA merged, "
                                    "sentence-transformers layout for vLLM (`--runner pooling`) and TEI, with "
                                    "launch.txt/launch.json."),
    quantize: Optional[str] = typer.Option(None, "--quantize", "-q",
                                           help="ONNX and OpenVINO: 'int8' adds an int8 graph and makes it the "
                                                "default. ONNX: per-token activation scales, so a text's vector does "
                                                "not depend on its batch; 7-bit per-channel weights; ~4x smaller, ~2x "
                                                "faster than fp32 on CPU. OpenVINO: NNCF static int8 calibrated on "
                                                "the check set (fixed scales: batch-independent too). "
                                                "On the check set it must keep mean cosine >= 0.99 to fp32, every "
                                                "text >= 0.95, and nDCG@10 within --max-ndcg-drop. A reranker's int8 graph "
                                                "must pick torch's top document for >= 90% of the check-set "
                                                "queries and keep Spearman >= 0.99 of the pairs' logits."),
    adapter: Optional[Path] = typer.Option(None, "--adapter",
                                           help="A LoRA adapter folder to merge into --model before exporting."),
    check_set: Optional[str] = typer.Option(None, "--check-set",
                                            help="Retrieval set for the int8 checks, sampled to <=300 queries and "
                                                 "<=1,000 documents: beir:DIR[:SPLIT] (or a BEIR folder), "
                                                 "pairs:FILE, stsb-paraphrase or builtin-40. Default: the model's own "
                                                 "dev or training data named in its manifest, else builtin-40 (OpenVINO "
                                                 "int8 then calibrates on STS-B: 80 texts are too few). A "
                                                 "reranker is checked on each query with its judged documents and "
                                                 "random others, 8 pairs in all."),
    max_ndcg_drop: float = typer.Option(0.005, "--max-ndcg-drop", min=0.0,
                                        help="int8 only: the largest nDCG@10 drop from fp32 on the check set that "
                                             "still passes. Lower it for a stricter release gate. Embedding "
                                             "models only."),
    precision: str = typer.Option("f32", "--precision",
                                  help="OpenVINO only: the float precision the served IR runs at. 'f32' (default): "
                                       "the same vectors on every CPU. 'bf16': the float ops around the int8 "
                                       "products (or all of them without --quantize) in bf16, on CPUs with "
                                       "avx512_bf16 or AMX (refused on others); checked against the fp32 IR at f32 "
                                       "with the int8 bounds. Recorded in the folder; serve and eval use it."),
    exporter: str = typer.Option("torchscript", "--exporter",
                                 help="torch.onnx exporter: 'torchscript' (fast, default) or 'dynamo' (slower)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version (the dynamo exporter uses >= 18)."),
    served_name: Optional[str] = typer.Option(None, "--served-name",
                                              help="HF only: the model name in the launch commands (default: the "
                                                   "output folder's name)."),
    allow_probe_mismatch: bool = typer.Option(False, "--allow-probe-mismatch",
                                              help="Export even if the model no longer reproduces its own "
                                                   "probe_vectors.json (it changed after training)."),
) -> None:
    """Export a model for serving, and prove the export computes the same vectors (or, for a reranker, scores).

    After every export a parity check runs and is recorded in embedkit_manifest.json: ONNX fp32 must match torch
    within 1e-5 (max abs diff); int8 must keep mean cosine >= 0.99 to fp32, every check-set text >= 0.95 and
    nDCG@10 within 0.005 on the check set; the served graph must give each text the same vector alone and inside
    batches of 8 and 32 (max abs diff <= 1e-4). A failed check exits with code 3 and leaves no output folder behind.

    A reranker (cross-encoder) folder exports with --format onnx to a graph giving the pairs' logits: fp32 must
    match torch within 1e-4; int8 must pick the same top document as torch for >= 90% of the check-set queries and
    keep Spearman >= 0.99 of the check pairs' logits; the same batch-vs-alone bound holds.

    Examples:

      embedkit export --model runs/medquad/model --format onnx --quantize int8 --output runs/medquad/onnx

      embedkit export --model runs/medquad/model --format openvino --quantize int8 --output runs/medquad/openvino

      embedkit export --model minilm --adapter runs/lora --format hf --output runs/hf   (then see runs/hf/launch.txt)

      embedkit export --model runs/minilm-rerank-scifact --format onnx --quantize int8 --output runs/rerank-onnx
    """
    if precision != "f32" and format != "openvino":
        raise ConfigError("--precision applies to --format openvino only", field="precision")
    reranker = format in ("onnx", "openvino", "hf") and model_kind(resolve_model_path(model)) == "reranker"
    if format == "onnx":
        from embedkit.export.onnx import export_onnx

        if served_name:
            raise ConfigError("--served-name applies to --format hf only", field="served-name")
        if reranker:
            _export_reranker(model, output, quantize=quantize, adapter=adapter, exporter=exporter, opset=opset,
                             check_set=check_set, allow_probe_mismatch=allow_probe_mismatch)
            return
        manifest = export_onnx(model, output, quantize=quantize, adapter=adapter, exporter=exporter, opset=opset,
                               check_set=check_set, allow_probe_mismatch=allow_probe_mismatch,
                               max_ndcg_drop=max_ndcg_drop)
        summary = _parity_summary(manifest["parity"], quantize)
        typer.echo(f"exported {model} -> {output} (onnx{', int8' if quantize else ''}; parity passed: {summary})")
        typer.echo(f"serve it:  embedkit serve --model {output} --backend onnx")
    elif format == "openvino":
        _export_openvino(model, output, quantize=quantize, adapter=adapter, exporter=exporter, opset=opset,
                         check_set=check_set, allow_probe_mismatch=allow_probe_mismatch, max_ndcg_drop=max_ndcg_drop,
                         reranker=reranker, served_name=served_name, precision=precision)
    elif format == "hf":
        from embedkit.export.hf import export_hf

        if reranker:
            raise ConfigError(f"{model} is a reranker (cross-encoder): its folder is already the Hugging Face layout "
                              "that sentence-transformers' CrossEncoder loads; --format hf exports embedding models",
                              field="format")
        if quantize:
            raise ConfigError("--quantize applies to --format onnx and openvino only (vLLM/TEI quantise on their own)",
                              field="quantize")
        export_hf(model, output, adapter=adapter, served_name=served_name,
                  allow_probe_mismatch=allow_probe_mismatch)
        typer.echo(f"exported {model} -> {output} (hf); launch commands in {output / 'launch.txt'}")
    else:
        raise ConfigError(f"unknown format {format!r}; choose 'onnx', 'openvino' or 'hf'", field="format")


def _export_reranker(model: str, output: Path, *, quantize: Optional[str], adapter: Optional[Path], exporter: str,
                     opset: int, check_set: Optional[str], allow_probe_mismatch: bool) -> None:
    """`embedkit export --format onnx` of a reranker folder (embedkit.export.onnx_rerank)."""
    from embedkit.export.onnx_rerank import export_onnx_reranker

    if adapter is not None:
        raise ConfigError("--adapter merges LoRA into an embedding model; a reranker's folder is saved merged",
                          field="adapter")
    manifest = export_onnx_reranker(model, output, quantize=quantize, exporter=exporter, opset=opset,
                                    check_set=check_set, allow_probe_mismatch=allow_probe_mismatch)
    parity = manifest["parity"]
    summary = f"fp32 max |logit diff| {parity['fp32_max_abs_diff']:.1e}"
    if quantize:
        summary += (f", int8 on {parity['check_set_pairs']} pairs of {parity['check_set']}: top-1 agreement "
                    f"{parity['int8_top1_agreement']:.3f}, Spearman {parity['int8_spearman']:.4f}, MRR torch "
                    f"{parity['mrr_torch']:.4f} / int8 {parity['mrr_int8']:.4f}")
    summary += f", batch vs alone {parity['batch_invariance_max_abs_diff']:.1e}"
    typer.echo(f"exported reranker {model} -> {output} (onnx{', int8' if quantize else ''}; parity passed: {summary})")
    typer.echo(f"load it:  embedkit.export.OnnxReranker({str(output)!r}).score(queries, documents)")


def _parity_summary(parity: dict, quantize: Optional[str]) -> str:
    summary = f"fp32 max |diff| {parity['fp32_max_abs_diff']:.1e}"
    label = "int8" if quantize else ("bf16" if "bf16_mean_cosine" in parity else None)
    if label:
        shown = label if label == "bf16" or parity.get("int8_precision", "f32") == "f32" else "int8 (bf16)"
        summary += (f", {shown} cosine mean {parity[label + '_mean_cosine']:.4f} / min "
                    f"{parity[label + '_min_cosine']:.4f}, nDCG@10 on {parity['check_set']} fp32 "
                    f"{parity['ndcg_at_10_fp32']:.4f} / {shown} {parity['ndcg_at_10_' + label]:.4f}")
    return summary + f", batch vs alone {parity['batch_invariance_max_abs_diff']:.1e}"


def _export_openvino(model: str, output: Path, *, quantize: Optional[str], adapter: Optional[Path], exporter: str,
                     opset: int, check_set: Optional[str], allow_probe_mismatch: bool, max_ndcg_drop: float,
                     reranker: bool, served_name: Optional[str], precision: str = "f32") -> None:
    """`embedkit export --format openvino` (embedkit.export.openvino): embedding models only."""
    from embedkit.export.openvino import check_openvino_quantize, check_precision, describe_runtime, export_openvino

    if served_name:
        raise ConfigError("--served-name applies to --format hf only", field="served-name")
    if reranker:
        raise ConfigError(f"{model} is a reranker (cross-encoder); --format openvino exports embedding models "
                          "(export a reranker with --format onnx)", field="format")
    check_openvino_quantize(quantize)
    check_precision(precision)
    manifest = export_openvino(model, output, quantize=quantize, adapter=adapter, exporter=exporter, opset=opset,
                               check_set=check_set, allow_probe_mismatch=allow_probe_mismatch,
                               max_ndcg_drop=max_ndcg_drop, precision=precision)
    typer.echo(describe_runtime(manifest["cpu"]))
    typer.echo(f"exported {model} -> {output} (openvino{', int8 (NNCF static)' if quantize else ''}, {precision} "
               "float ops; parity passed: "
               f"{_parity_summary(manifest['parity'], quantize)})")
    typer.echo(f"serve it:  embedkit serve --model {output}   (evaluate it: embedkit eval --model {output})")
