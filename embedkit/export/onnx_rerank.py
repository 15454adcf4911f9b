"""ONNX export of a reranker (cross-encoder), verified against torch, and `OnnxReranker`, its onnxruntime runtime.

Folder layout written by `export_onnx_reranker(model, out)` (`embedkit export --format onnx` on a reranker folder):

    model.onnx              fp32 graph: input_ids, attention_mask[, token_type_ids] (int64 [batch, seq])
                            -> logits [batch]
    model_int8.onnx         with --quantize int8: the folder's default graph
    tokenizer files         the reranker's tokenizer (pairs are cut to max_length, longest side first)
    config.json, config_sentence_transformers.json, sentence_bert_config.json
                            the reranker's own configs: what it is (`model_kind` reads "reranker"), its max length
    embedkit_onnx.json      "kind": "reranker", the graph inputs, max_length, the default graph
    rerank_probes.json      logits the default graph gave the probe pairs
    embedkit_manifest.json  what it was exported from (the reranker's fingerprint) + the parity results

The graph, the quantisation (per-token int8, `quantize_int8`; why: embedkit.export.onnx) and the exporter settings
are the embedding export's; only the head differs: the logit of the one-label classifier, no pooling. The pooler
and classifier run on [batch, hidden] (Gemm nodes) and stay fp32; every encoder layer's products are int8.

Parity (an export that misses a bound is not written, exit 3):
- fp32 vs torch: max |logit diff| < RERANK_FP32_MAX_ABS_DIFF on the probe pairs, pairs of very different lengths
  (batches of 16 and alone) and the check pairs (`check_pairs`: each check-set query with its judged documents and
  random distractors, 8 in all).
- int8 vs torch, on the check pairs: the ranking must agree, not the logits (a reranker's output is an order):
  the same top-1 document for >= INT8_MIN_TOP1_AGREEMENT of the queries, and Spearman's rho of all the pairs'
  logits >= INT8_MIN_SPEARMAN. Reported, not bounded: the largest logit difference (logits have no fixed scale) and
  the MRR of the judged documents among the candidates, torch and int8 (what a flipped top-1 costs, if anything).
- the default graph gives a pair the same logit alone and inside batches of 8 and 32 (BATCH_INVARIANCE_ATOL).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from embedkit.atomic import atomic_dir, write_json
from embedkit.export.checkset import check_pairs, load_check_set, mrr_of_pairs
from embedkit.export.onnx import (FP32_GRAPH, KIND_RERANKER, ONNX_CONFIG_NAME, ExportError, OnnxGraph, check_quantize,
                                  export_graph, features_module, record_batch_invariance, refuse_changed_source,
                                  write_export_manifest, write_graphs)
from embedkit.models.probes import BATCH_INVARIANCE_ATOL, batch_invariance
from embedkit.models.tokenization import collate, ensure_pad_token, length_sorted_batches, tokenize_pairs

log = logging.getLogger(__name__)

LOGITS_NAME = "logits"
PAIR_INPUTS = ("input_ids", "attention_mask")
TYPE_IDS_INPUT = "token_type_ids"
# The reranker's probe tolerance (embedkit.models.reranker.PROBE_ATOL): logits are not normalised, so the bound is
# looser than the embedding export's 1e-5 on unit vectors. Measured: the tiny test model 8e-9, a MiniLM reranker
# 1.8e-7.
RERANK_FP32_MAX_ABS_DIFF = 1e-4
# A top-1 flips wherever torch's two best candidates are closer than the int8 rounding (~0.01 logit on MiniLM), so
# the bound leaves room for a weakly trained reranker: MiniLM after 25 steps (logits' sd 0.033) kept 0.943 of 300
# queries of its training data and of MedQuAD's test split alike, every flip between candidates within 0.008 of each
# other and MRR unchanged or better; Spearman 0.9948 / 0.9946.
# A damaged graph falls near chance (tests/test_export_rerank.py, int8 embedding rows shuffled: top-1 0.20 of 40
# queries with 8 candidates each, Spearman 0.09).
INT8_MIN_TOP1_AGREEMENT = 0.9
INT8_MIN_SPEARMAN = 0.99
# The int8 graph's probe scores are re-checked on other CPUs, whose int8 kernels round the float steps differently.
INT8_PROBE_ATOL = 1e-3
# How many check pairs are also scored one at a time against torch (batches of 1 take the unpadded path).
ALONE_CHECK_PAIRS = 64
SENTENCE_TRANSFORMERS_FILES = ("config_sentence_transformers.json", "sentence_bert_config.json")

# Pairs of very different lengths (both sides cut to max_length in the last two), so parity batches carry padding.
_PARITY_PAIRS = (
    ("a", "a"),
    ("Is it safe?", "42"),
    ("résumé naïve café – “quotes” and emoji 🙂", "The committee postponed its decision on the new drug."),
    ("what did the committee decide", "The committee postponed its decision on the new drug until the long-term "
     "safety data from the third trial phase, which followed more than four thousand patients for five years, had "
     "been reviewed by independent experts. " * 4),
    ("why did the committee postpone its decision on the new drug after the third trial phase " * 6,
     "The committee postponed its decision. " * 6),
)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x) without overflow for large |x| (torch.sigmoid's values, as Reranker.score gives them)."""
    logits = np.asarray(logits, dtype=np.float32)
    return np.exp(-np.logaddexp(0.0, -logits)).astype(np.float32)


class OnnxReranker(OnnxGraph):
    """Score (query, document) pairs with an exported cross-encoder graph: `score` as Reranker.score, the pairs
    tokenised by the one path (tokenize_pairs + collate), batches length-sorted."""

    kind = KIND_RERANKER

    def __init__(self, folder: str | Path, *, variant: str | None = None, threads: int | None = None,
                 device: Any = "cpu") -> None:
        super().__init__(folder, variant=variant, threads=threads, device=device)
        self.uses_type_ids = TYPE_IDS_INPUT in self.config["inputs"]
        self.pad_id = ensure_pad_token(self.tokenizer, path=self.folder)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.folder), "backend": "onnx", "kind": "cross-encoder",
                "variant": self.variant, "max_length": self.max_length, "activation": "sigmoid",
                "fingerprint": self.fingerprint, "providers": self.session.get_providers()}

    def pair_ids(self, queries: Sequence[str], documents: Sequence[str], *,
                 truncate: bool = True) -> tuple[list[list[int]], list[list[int]]]:
        """As Reranker.pair_ids: (input ids, token type ids), cut to max_length (longest side first)."""
        return tokenize_pairs(self.tokenizer, queries, documents, max_length=self.max_length if truncate else None)

    def collate(self, ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]] | None = None
                ) -> dict[str, np.ndarray]:
        """As Reranker.collate, as numpy arrays: right-padded, token type ids where the graph takes them."""
        return collate(ids, self.pad_id, "right", to="numpy", type_ids=type_ids if self.uses_type_ids else None)

    def logits_of(self, ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Run the graph on one padded batch of pairs: logits [len(ids)]."""
        return self.session.run([LOGITS_NAME], self.collate(ids, type_ids))[0].reshape(-1)

    def score(self, queries: Sequence[str], documents: Sequence[str], *, batch_size: int = 32,
              logits: bool = False) -> np.ndarray:
        """Scores of the pairs (queries[i], documents[i]): sigmoid probabilities, or raw logits with `logits`."""
        queries, documents = list(queries), list(documents)
        out = np.empty(len(queries), dtype=np.float32)
        if not queries:
            return out
        ids, types = self.pair_ids(queries, documents)
        for rows in length_sorted_batches(ids, batch_size):
            out[rows] = self.logits_of([ids[i] for i in rows], [types[i] for i in rows])
        return out if logits else sigmoid(out)


# ---------------------------------------------------------------------------------------------------------- checks
def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of `values`, ties sharing their mean rank (as scipy.stats.rankdata, less one)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values))
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return np.bincount(inverse, weights=ranks)[inverse] / counts[inverse]


def ranking_agreement(reference: np.ndarray, got: np.ndarray, groups: Sequence[Sequence[int]]) -> dict[str, float]:
    """How far `got` ranks like `reference`: the share of groups (queries) whose top-1 row is the same, and
    Spearman's rho of all the values (nan when either side is constant)."""
    reference, got = np.asarray(reference, dtype=np.float64), np.asarray(got, dtype=np.float64)
    groups = [list(g) for g in groups if len(g)]
    same = [g[int(np.argmax(reference[g]))] == g[int(np.argmax(got[g]))] for g in groups]
    a, b = average_ranks(reference), average_ranks(got)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 else float("nan")
    return {"top1_agreement": float(np.mean(same)) if same else float("nan"), "spearman": rho}


def _batch_logits(score, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """Logits of `pairs` run as ONE batch, shaped [n, 1] as batch_invariance takes vectors."""
    return score([q for q, _ in pairs], [d for _, d in pairs], batch_size=max(1, len(pairs)), logits=True)[:, None]


# ---------------------------------------------------------------------------------------------------------- export
def export_onnx_reranker(
    model: str | Path,
    output: str | Path,
    *,
    quantize: str | None = None,
    exporter: str = "torchscript",
    opset: int = 17,
    check_set: str | Path | None = None,
    max_abs_diff: float = RERANK_FP32_MAX_ABS_DIFF,
    min_top1_agreement: float = INT8_MIN_TOP1_AGREEMENT,
    min_spearman: float = INT8_MIN_SPEARMAN,
    max_batch_diff: float = BATCH_INVARIANCE_ATOL,
    allow_probe_mismatch: bool = False,
) -> dict[str, Any]:
    """Export the reranker `model` (a folder or hub id) to `output` and verify it (module docstring). Returns the
    manifest; raises ExportError, writing nothing, when a bound is missed.

    `check_set`: a spec for `embedkit.export.checkset.load_check_set` (default: the data named in the reranker's
    manifest, else builtin-40), turned into pairs by `check_pairs`."""
    import torch

    from embedkit.models.reranker import (RERANK_PROBES_NAME, check_rerank_probes, load_reranker, probe_pairs,
                                          write_rerank_probes)

    check_quantize(quantize)
    started = time.time()
    reranker = load_reranker(model)
    reranker.eval()
    source = Path(reranker.source_path) if reranker.source_path else None
    source_probes = None
    if source is not None and (source / RERANK_PROBES_NAME).is_file():
        source_probes = check_rerank_probes(lambda q, d: reranker.score(q, d, logits=True), source)
        what = f"probe scores (max |diff| {source_probes['max_abs_diff']:.1e}, atol {source_probes['atol']:.0e})"
        log.info(f"source model: {what}: {'ok' if source_probes['ok'] else 'MISMATCH'}")
        refuse_changed_source(source_probes["ok"], what, source / RERANK_PROBES_NAME, allow_probe_mismatch)
    check = load_check_set(check_set, model_folders=[source] if source else [])
    pairs = check_pairs(check)
    log.info(f"check set: {check.name} ({check.source}): {len(pairs.groups)} queries, {len(pairs.queries)} pairs")
    probe_queries, probe_documents = probe_pairs()
    parity_pairs = (list(zip(probe_queries, probe_documents)) + list(_PARITY_PAIRS)
                    + list(zip(pairs.queries, pairs.documents))[:ALONE_CHECK_PAIRS])
    parity_queries, parity_documents = [q for q, _ in parity_pairs], [d for _, d in parity_pairs]
    with torch.inference_mode():
        reference = reranker.score(parity_queries, parity_documents, batch_size=16, logits=True)
        reference_check = reranker.score(pairs.queries, pairs.documents, batch_size=32, logits=True)

    output = Path(output)
    inputs = list(PAIR_INPUTS) + ([TYPE_IDS_INPUT] if reranker.uses_type_ids else [])
    with atomic_dir(output) as tmp:
        log.info(f"exporting {reranker.name} to ONNX ({exporter}, opset {opset}) ...")
        ids, types = reranker.pair_ids(["a short query", "a somewhat longer query with more tokens in it"],
                                       ["a document", "a longer document with several more tokens than the other"])
        example = reranker.collate(ids, types)
        export_graph(features_module(reranker), tuple(example[name] for name in inputs), tmp / FP32_GRAPH,
                     input_names=inputs, output_name=LOGITS_NAME, exporter=exporter, opset=opset)
        reranker.tokenizer.save_pretrained(tmp)
        reranker.config.to_json_file(tmp / "config.json")
        for name in SENTENCE_TRANSFORMERS_FILES:  # as the reranker's folder has them: CrossEncoder, max length
            if source is not None and (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        graphs = write_graphs(tmp, quantize)
        default_variant = "int8" if quantize == "int8" else "fp32"
        write_json(tmp / ONNX_CONFIG_NAME, {
            "format": "embedkit-onnx/1", "kind": KIND_RERANKER, "name": reranker.name,
            "fingerprint": reranker.fingerprint, "graphs": graphs, "default_variant": default_variant,
            "inputs": inputs, "output": LOGITS_NAME, "max_length": reranker.max_length, "padding_side": "right",
            "activation": "sigmoid",
        })

        # --- parity: the whole path (saved tokenizer + graph) against torch, batches with and without padding
        parity: dict[str, Any] = {"pairs": len(parity_pairs), "check_set": check.name,
                                  "check_set_source": check.source, "check_set_queries": len(pairs.groups),
                                  "check_set_pairs": len(pairs.queries)}
        fp32 = OnnxReranker(tmp, variant="fp32")
        diff = max(float(np.abs(fp32.score(parity_queries, parity_documents, batch_size=size, logits=True)
                                - reference).max()) for size in (16, 1))
        got_check = fp32.score(pairs.queries, pairs.documents, batch_size=32, logits=True)
        diff = max(diff, float(np.abs(got_check - reference_check).max()))
        parity.update({"fp32_max_abs_diff": diff, "fp32_max_abs_diff_bound": max_abs_diff})
        log.info(f"parity fp32 vs torch: max |logit diff| {diff:.2e} (bound {max_abs_diff:.0e})")
        if not diff < max_abs_diff:
            raise ExportError(f"ONNX fp32 logits differ from torch by {diff:.2e} (bound {max_abs_diff:.0e}); "
                              "nothing was written", path=output)
        default = fp32
        if quantize == "int8":
            default = OnnxReranker(tmp, variant="int8")
            int8_check = default.score(pairs.queries, pairs.documents, batch_size=32, logits=True)
            agreement = ranking_agreement(reference_check, int8_check, pairs.groups)
            top1, rho = agreement["top1_agreement"], agreement["spearman"]
            parity.update({
                "int8_method": "per-token activation scales, 7-bit per-channel weights",
                "int8_top1_agreement": top1, "int8_top1_agreement_bound": min_top1_agreement,
                "int8_spearman": rho, "int8_spearman_bound": min_spearman,
                "int8_max_abs_logit_diff": float(np.abs(int8_check - reference_check).max()),
                "mrr_torch": mrr_of_pairs(pairs, reference_check), "mrr_int8": mrr_of_pairs(pairs, int8_check),
            })
            log.info(f"parity int8 vs torch on {len(pairs.queries)} pairs of {check.name}: top-1 agreement "
                     f"{top1:.3f} of {len(pairs.groups)} queries (bound {min_top1_agreement}), Spearman {rho:.4f} "
                     f"(bound {min_spearman}), max |logit diff| {parity['int8_max_abs_logit_diff']:.2e}; MRR of the "
                     f"judged documents: torch {parity['mrr_torch']:.4f}, int8 {parity['mrr_int8']:.4f}")
            if not top1 >= min_top1_agreement:
                raise ExportError(f"int8 graph: the top-1 document agrees with torch on {top1:.3f} of the queries "
                                  f"< {min_top1_agreement}; nothing was written", path=output)
            if not rho >= min_spearman:
                raise ExportError(f"int8 graph: Spearman of its logits to torch's {rho:.4f} < {min_spearman}; "
                                  "nothing was written", path=output)
        # The graph this folder serves must give a pair the same logit alone and inside any batch.
        batch_pairs = parity_pairs[:len(probe_queries) + len(_PARITY_PAIRS)]
        batch_diff = batch_invariance(lambda p: _batch_logits(default.score, p), batch_pairs)
        record_batch_invariance(parity, default.variant, batch_diff, max_batch_diff,
                                count_key="batch_invariance_pairs", count=len(batch_pairs), unit="pairs",
                                subject="a pair's logit", output=output)
        parity["passed"] = True
        write_rerank_probes(default, tmp, atol=INT8_PROBE_ATOL if quantize else RERANK_FP32_MAX_ABS_DIFF)
        manifest = write_export_manifest(tmp, model, reranker, graphs, exporter=exporter, opset=opset,
                                         quantize=quantize, default_variant=default_variant, started=started,
                                         parity=parity, source_probes=source_probes)
    log.info(f"wrote {output} ({', '.join(graphs.values())}) in {time.time() - started:.1f}s")
    return manifest

