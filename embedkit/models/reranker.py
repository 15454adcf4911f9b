"""The second stage: a cross-encoder that scores (query, document) pairs, for training, evaluation and serving.

A reranker reads the query and the document together (one forward per pair) and gives one relevance logit; the
score a user sees is its sigmoid (0..1), as sentence-transformers' CrossEncoder gives it. The same `pair_ids` /
`collate` (embedkit.models.tokenization) feed training, `embedkit eval --rerank`, `embedkit rag --rerank` and the
server's `/v1/rerank`, so a pair gets the same score everywhere.

Folders. `Reranker.save` writes a Hugging Face sequence-classification folder (one label) that
`sentence_transformers.CrossEncoder(folder)` loads with the same scores, plus `config_sentence_transformers.json`
(model_type CrossEncoder, the sigmoid activation), the embedkit manifest, a model card and probe scores
(`rerank_probes.json`: fixed pairs and the scores the trained model gave them; whatever loads the folder later can
re-score them). Where a model kind is expected and the other kind is given, loading fails in one line naming both
(`model_kind`): an embedding model (a sentence-transformers folder with a Pooling module) is not a reranker, and a
cross-encoder folder is not an embedding model.

Starting a reranker from an embedding model (MiniLM when no trained cross-encoder is at hand) is allowed only for
training (`start=True`): the encoder's weights are kept and a one-logit head is added, initialised from the
training seed. That head knows nothing yet: the README and bench/bench_rerank.py say what this start costs.

The yes/no LLM reranker (`YesNoReranker`, Qwen3-Reranker's formulation): a causal LM reads the pair in an
instruction prompt (embedkit.models.rerank_template: one template, tokenized as one string, the document cut first)
and its next-token logits give the relevance logit logit("yes") - logit("no") at the last position, so its sigmoid
is P(yes) under the two-way softmax over (no, yes): Qwen3-Reranker's score. Pairs are padded on the left with
position ids from the attention mask, so a pair's logit does not depend on its batch. Its folder is the Hugging Face
causal-LM folder (a LoRA adapter merged), the tokenizer, `rerank_template.json` (the instruction and the rendered
prompt) and the same manifest and probe scores; sentence-transformers (>= 6) loads it as a CrossEncoder with the
same scores: modules.json names its Transformer (text-generation) and LogitScore (yes, no) modules, and the saved
tokenizer's chat template renders the pair messages into the same prompt. A plain causal LM folder is a start for
training only (`start=True`), like an embedding model for the cross-encoder.

Why not sentence-transformers' CrossEncoder as the runtime: its `predict` tokenizes inside, with its own padding
and batching, and its trainer owns the loop; embedkit needs the pair ids before batching (length-sorted batches,
the server's micro-batches and 413 checks) and one training engine for every model kind (DDP, ZeRO-3, LoRA,
checkpoints). The saved folder stays the ecosystem's format, so CrossEncoder still loads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from embedkit.atomic import atomic_dir, write_json
from embedkit.device import resolve_device
from embedkit.errors import ModelError
from embedkit.manifest import MANIFEST_NAME, base_manifest
from embedkit.models.encoder import backbone_load_kwargs, is_causal_config, parse_dtype
from embedkit.models.registry import model_kind, resolve_model_path
from embedkit.models.rerank_template import (DEFAULT_INSTRUCTION, RerankTemplate, answer_token_ids, build_template,
                                             pair_token_ids, read_template, template_length, write_template)
from embedkit.models.tokenization import collate, ensure_pad_token, length_sorted_batches, tokenize_pairs

log = logging.getLogger(__name__)

RERANK_PROBES_NAME = "rerank_probes.json"
RERANK_PROBES_FORMAT = "embedkit-rerank-probes/1"
PROBE_ATOL = 1e-4
SIGMOID = "torch.nn.modules.activation.Sigmoid"  # sentence-transformers' name of the activation it applies
LOGIT_SCORE = "sentence_transformers.cross_encoder.modules.logit_score.LogitScore"
ST_TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"

# Queries and documents of several domains and lengths: every query is paired with every document.
PROBE_QUERIES = ("what are the symptoms of diabetes?", "how do interest rates affect inflation",
                 "Is it safe?")
PROBE_DOCUMENTS = ("Insulin lowers the level of glucose in the blood; thirst and frequent urination are early signs.",
                   "The central bank raised rates to slow rising prices.",
                   "a",
                   "The court ruled that the contract was void because one party had been misled about the price.")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _transformer_dir(path: Path) -> Path:
    """The folder of the transformer weights: a sentence-transformers folder may keep them in a module subfolder."""
    for module in _read_json(path / "modules.json") or []:
        if isinstance(module, dict) and str(module.get("type", "")).endswith("Transformer"):
            return path / module.get("path", "")
    return path


class Reranker(nn.Module):
    """(query, document) -> relevance. `score` / `rerank` for inference, `pair_ids` + `forward` for training."""

    kind = "cross-encoder"  # describe()'s and the manifest's name of what scores the pairs

    def __init__(self, model: nn.Module, tokenizer, *, max_length: int = 512, name: str = "reranker",
                 source_path: str | None = None, base_model: dict | None = None,
                 quantization: str | None = None) -> None:
        super().__init__()
        self._check_backbone(model, source_path)
        self.backbone = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.name = name
        self.source_path = source_path
        self.quantization = quantization  # "nf4": a 4-bit base (QLoRA), which adapters.prepare_kbit reads
        ensure_pad_token(tokenizer, path=source_path)
        # Token type ids only where the model takes them (BERT: 0 for the query, 1 for the document).
        self.uses_type_ids = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
        self._fingerprint: str | None = None
        self.base_model = base_model or {"name": name, "path": source_path, "fingerprint": self.fingerprint}
        # The weights the start did not train (names as in this module's named_parameters): a cross-encoder's new
        # one-logit head, and an embedding model's unused pooler. What `training.head_lr` trains.
        self.new_parameter_names: frozenset[str] = frozenset()

    def _check_backbone(self, model: nn.Module, source_path: str | None) -> None:
        if getattr(model.config, "num_labels", 1) != 1:
            raise ModelError(f"a reranker has one output (a relevance logit); this model has "
                             f"{model.config.num_labels} labels", path=source_path)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, max_length: int | None = None, dtype: str | None = None,
                        device: str | torch.device = "cpu", start: bool = False, instruction: str | None = None,
                        quantization: str | None = None, adapter: str | Path | None = None,
                        sharded_storage: bool = False) -> "Reranker":
        """Load a reranker folder (or an embedded name / Hugging Face id resolving to one): a cross-encoder, or a
        yes/no LLM reranker (a folder with `rerank_template.json`), as `YesNoReranker`.

        `start=True` (training only): an embedding or plain transformer folder is a valid start; its encoder weights
        are kept and a new one-logit head is initialised (from torch's RNG: seed it first). A causal LM folder
        starts a YesNoReranker (no new weights: its LM head already scores "yes" and "no").
        For the yes/no reranker only: `instruction` (None: the saved one, else Qwen3-Reranker's default),
        `quantization` "nf4" (QLoRA), `adapter` (a PEFT adapter folder loaded on top, not trainable),
        `sharded_storage` (see embedkit.models.encoder.backbone_load_kwargs)."""
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model_path(name_or_path)
        kind = model_kind(path)
        weights = _transformer_dir(path)
        template = read_template(path)
        if kind != "reranker" and not start:
            what = ("an embedding model (a sentence-transformers folder with a Pooling module)" if kind == "embedding"
                    else "a transformer without a relevance head (a causal LM becomes a yes/no reranker by training "
                         "it with task: rerank)")
            raise ModelError(f"{name_or_path} is {what}, not a reranker (cross-encoder): give a folder that "
                             "'embedkit train' wrote with task: rerank, or a sentence-transformers CrossEncoder",
                             path=path)
        try:
            config = AutoConfig.from_pretrained(weights)
        except (OSError, ValueError) as exc:
            raise ModelError(f"not a model folder: {exc}".splitlines()[0], path=weights) from exc
        if template is not None or is_causal_config(config):
            return YesNoReranker.load(path, template, name=str(name_or_path), max_length=max_length, dtype=dtype,
                                      device=device, instruction=instruction, quantization=quantization,
                                      adapter=adapter, sharded_storage=sharded_storage)
        if quantization or adapter is not None:
            raise ModelError(f"{name_or_path} is a cross-encoder: 4-bit loading and adapters are for the yes/no "
                             "(causal LM) reranker", path=path)
        kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype)}
        if kind != "reranker":
            kwargs.update(num_labels=1)  # a new head: from torch's RNG, which training seeds
        try:
            model, loading = AutoModelForSequenceClassification.from_pretrained(weights, output_loading_info=True,
                                                                                **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load a sequence-classification model: {exc}".splitlines()[0],
                             path=weights) from exc
        model.config.architectures = [type(model).__name__]
        tokenizer = AutoTokenizer.from_pretrained(weights)
        sbert = _read_json(weights / "sentence_bert_config.json") or _read_json(path / "sentence_bert_config.json")
        tokenizer_max = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
        chosen = max_length or (sbert or {}).get("max_seq_length") or tokenizer_max
        manifest = _read_json(path / MANIFEST_NAME) or {}
        base = manifest.get("base_model") if kind == "reranker" else None
        reranker = cls(model, tokenizer, max_length=int(chosen), name=str(name_or_path), source_path=str(path),
                       base_model=base)
        # transformers' missing keys are the new weights: the classifier of an embedding-model start (and BERT's
        # pooler where the checkpoint has none), nothing for a trained cross-encoder. An embedding model's pooler is
        # new in all but name: sentence-transformers pools the token states, so its training never ran the pooler
        # (all-MiniLM-L6-v2's gives near-zero tanh outputs), and the head reads the pair only through it.
        names = {name for name, _ in reranker.named_parameters()}
        new = {f"backbone.{key}" for key in loading["missing_keys"]}
        if kind == "embedding":
            new |= {name for name in names if ".pooler." in name}
        reranker.new_parameter_names = frozenset(new & names)
        target = resolve_device(device, field="device")
        return reranker.to(target) if target.type != "cpu" else reranker

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def config(self):
        model = self.backbone
        return getattr(model, "config", None) or model.get_base_model().config

    @property
    def fingerprint(self) -> str:
        """sha256 over weights, tokenizer vocabulary and max length: equal fingerprints -> equal scores."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for key, tensor in sorted(self.backbone.state_dict().items()):
                if hasattr(tensor, "full_tensor"):
                    tensor = tensor.full_tensor()
                data = tensor.detach().cpu().contiguous()
                h.update(key.encode())
                h.update(str(data.dtype).encode())
                h.update(data.view(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
            h.update(json.dumps(self._fingerprint_settings()).encode())
            h.update(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _fingerprint_settings(self) -> dict[str, Any]:
        """What besides the weights and the vocabulary decides a score."""
        return {"max_length": self.max_length, "kind": "cross-encoder"}

    def invalidate_fingerprint(self) -> None:
        self._fingerprint = None

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.backbone, "peft_config")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.source_path, "fingerprint": self.fingerprint,
                "kind": self.kind,
                "architecture": (getattr(self.config, "architectures", None) or [self.config.model_type])[0],
                "max_length": self.max_length, "activation": "sigmoid",
                "dtype": str(next(self.backbone.parameters()).dtype).replace("torch.", ""),
                "base_model": self.base_model}

    # ------------------------------------------------------------------ tokenization (the one path)
    def pair_ids(self, queries: Sequence[str], documents: Sequence[str], *,
                 truncate: bool = True) -> tuple[list[list[int]], list[list[int]]]:
        """(input ids, token type ids) of the pairs, cut to max_length (longest side first) unless `truncate`."""
        return tokenize_pairs(self.tokenizer, queries, documents, max_length=self.max_length if truncate else None)

    def collate(self, ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]] | None = None
                ) -> dict[str, torch.Tensor]:
        """A right-padded batch (BERT-style positions), with token type ids where the model takes them."""
        return collate(ids, self.tokenizer.pad_token_id, "right", to="torch",
                       type_ids=type_ids if self.uses_type_ids else None)

    # ------------------------------------------------------------------ forward / score
    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Relevance logits [B] (float32) of a collated batch of pairs."""
        device = self.device
        inputs = {k: v.to(device) for k, v in features.items()}
        return self.backbone(**inputs).logits[:, 0].float()

    def score(self, queries: Sequence[str], documents: Sequence[str], *, batch_size: int = 32,
              logits: bool = False) -> np.ndarray:
        """Scores of the pairs (queries[i], documents[i]): sigmoid probabilities, or raw logits with `logits`.
        Batches are length-sorted; a pair's score does not depend on its neighbours."""
        queries, documents = list(queries), list(documents)
        out = np.empty(len(queries), dtype=np.float32)
        if not queries:
            return out
        ids, types = self.pair_ids(queries, documents)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for rows in length_sorted_batches(ids, batch_size):
                    values = self(self.collate([ids[i] for i in rows], [types[i] for i in rows]))
                    out[rows] = (values if logits else torch.sigmoid(values)).cpu().numpy()
        finally:
            self.train(was_training)
        return out

    def rerank(self, query: str, documents: Sequence[str], *, top_n: int | None = None,
               batch_size: int = 32) -> list[tuple[int, float]]:
        """(document index, score) pairs, best first (ties: the earlier document first)."""
        scores = self.score([query] * len(documents), documents, batch_size=batch_size)
        order = sorted(range(len(documents)), key=lambda i: (-float(scores[i]), i))
        return [(i, float(scores[i])) for i in order[:top_n]]

    # ------------------------------------------------------------------ saving
    def save(self, path: str | Path, *, manifest: dict | None = None, card: str | None = None,
             write_extra: Callable[[Path], Any] | None = None) -> Path:
        """The folder sentence-transformers' CrossEncoder loads with the same scores, plus manifest and probe scores,
        written atomically. A LoRA adapter is merged first. `write_extra(folder)` adds files (the training log)
        before the folder appears."""
        model = self.backbone
        if hasattr(model, "peft_config"):
            model = model.merge_and_unload()
        target = Path(path)
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            # sentence-transformers' CrossEncoder cuts pairs at the tokenizer's model_max_length: make it ours
            self.tokenizer.model_max_length = self.max_length
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / "sentence_bert_config.json", {"max_seq_length": self.max_length})
            write_json(tmp / "config_sentence_transformers.json", {
                "model_type": "CrossEncoder", "activation_fn": SIGMOID, "prompts": {},
                "default_prompt_name": None, "embedkit": {"kind": "cross-encoder"}})
            config = json.loads((tmp / "config.json").read_text())
            config["sentence_transformers"] = {"activation_fn": SIGMOID}  # sentence-transformers < 6 reads it here
            write_json(tmp / "config.json", config)
            self._write_records(tmp, target, manifest, card, write_extra)
        self.source_path = str(target)
        return target

    def _write_records(self, tmp: Path, target: Path, manifest: dict | None, card: str | None,
                       write_extra: Callable[[Path], Any] | None) -> None:
        """Beside the weights: the manifest (recording the final path), probe scores, model card, extra files."""
        self.invalidate_fingerprint()
        record = base_manifest("reranker", base_model=self.base_model, model=self.describe(), **(manifest or {}))
        record["model"]["path"] = str(target)
        write_json(tmp / MANIFEST_NAME, record)
        write_rerank_probes(self, tmp)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        if write_extra is not None:
            write_extra(tmp)


class YesNoReranker(Reranker):
    """A causal LM as reranker: the relevance logit of a pair is logit("yes") - logit("no") at the last position of
    its prompt (embedkit.models.rerank_template), the same in training, evaluation and serving."""

    kind = "yes-no"

    def __init__(self, model: nn.Module, tokenizer, template: RerankTemplate, *, max_length: int = 512,
                 name: str = "reranker", source_path: str | None = None, base_model: dict | None = None,
                 quantization: str | None = None) -> None:
        self.template = template  # before Reranker.__init__, whose base-model record takes the fingerprint
        self.yes_id, self.no_id = answer_token_ids(tokenizer, template, path=source_path)
        prompt = template_length(tokenizer, template)
        if prompt >= int(max_length):
            raise ModelError(f"max_length {max_length} leaves no room for the pair: the reranker's prompt alone is "
                             f"{prompt} tokens (raise model.max_length)", path=source_path)
        super().__init__(model, tokenizer, max_length=max_length, name=name, source_path=source_path,
                         base_model=base_model, quantization=quantization)
        self.uses_type_ids = False

    def _check_backbone(self, model: nn.Module, source_path: str | None) -> None:
        if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
            raise ModelError("the yes/no reranker needs a causal LM with its LM head (AutoModelForCausalLM)",
                             path=source_path)

    @classmethod
    def load(cls, path: Path, template: RerankTemplate | None, *, name: str, max_length: int | None = None,
             dtype: str | None = None, device: str | torch.device = "cpu", instruction: str | None = None,
             quantization: str | None = None, adapter: str | Path | None = None,
             sharded_storage: bool = False) -> "YesNoReranker":
        """A causal LM folder as a yes/no reranker: a saved one (its template and max length), or a base to train
        (`template` None: the prompt is rendered with the tokenizer's chat template and `instruction`)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        saved = template is not None
        target = resolve_device(device, field="device")
        kwargs = backbone_load_kwargs(parse_dtype(dtype), quantization, target, sharded_storage=sharded_storage)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load a causal LM: {exc}".splitlines()[0], path=path) from exc
        tokenizer = AutoTokenizer.from_pretrained(path)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        if template is None:
            template = build_template(tokenizer, instruction or DEFAULT_INSTRUCTION, path=path)
        elif instruction is not None and instruction != template.instruction:
            template = template.with_instruction(instruction, path=path)
        sbert = (_read_json(path / "sentence_bert_config.json") or {}) if saved else {}
        tokenizer_max = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
        chosen = int(max_length or sbert.get("max_seq_length") or tokenizer_max)
        manifest = (_read_json(path / MANIFEST_NAME) or {}) if saved else {}  # a base's record is made afresh
        reranker = cls(model, tokenizer, template, max_length=chosen, name=name, source_path=str(path),
                       base_model=manifest.get("base_model"), quantization=quantization)
        # A 4-bit model is already where device_map put it (bitsandbytes' weights cannot be moved with .to()).
        return reranker.to(target) if target.type != "cpu" and not quantization else reranker

    # ------------------------------------------------------------------ properties
    def _fingerprint_settings(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "kind": self.kind, "template": self.template.to_dict()}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "instruction": self.template.instruction, "template": self.template.source,
                "answers": {self.template.yes: self.yes_id, self.template.no: self.no_id},
                "quantization": self.quantization, "adapter": self.has_adapter}

    # ------------------------------------------------------------------ tokenization (the one path)
    def pair_ids(self, queries: Sequence[str], documents: Sequence[str], *,
                 truncate: bool = True) -> tuple[list[list[int]], list[list[int]]]:
        """(input ids, token type ids) of the pairs' prompts, the document cut first to fit max_length unless
        `truncate`. A causal LM has no token types: the second list holds one empty list per pair."""
        ids = pair_token_ids(self.tokenizer, self.template, queries, documents,
                             max_length=self.max_length if truncate else None, path=self.source_path)
        return ids, [[] for _ in ids]

    def collate(self, ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]] | None = None
                ) -> dict[str, torch.Tensor]:
        """A left-padded batch: every pair's last token (where the answer is read) in the last column."""
        return collate(ids, self.tokenizer.pad_token_id, "left", to="torch")

    # ------------------------------------------------------------------ forward
    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Relevance logits [B] (float32): logit(yes) - logit(no) at the last position."""
        device = self.device
        input_ids = features["input_ids"].to(device)
        attention_mask = features["attention_mask"].to(device)
        # Position ids from the mask: a left-padded pair sees the positions it would see alone.
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        # logits_to_keep=1: the LM head runs on the last position only (a [B, vocab] product, not [B, L, vocab])
        last = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             use_cache=False, logits_to_keep=1).logits[:, -1]
        return last[:, self.yes_id].float() - last[:, self.no_id].float()

    # ------------------------------------------------------------------ saving
    def save(self, path: str | Path, *, manifest: dict | None = None, card: str | None = None,
             write_extra: Callable[[Path], Any] | None = None) -> Path:
        """The Hugging Face causal-LM folder (a LoRA adapter merged first), the tokenizer, `rerank_template.json`,
        the sentence-transformers CrossEncoder layout (Transformer text-generation + LogitScore yes/no; the saved
        tokenizer's chat template renders sentence-transformers' query/document messages into this prompt), the
        manifest and probe scores, written atomically."""
        if self.has_adapter:
            if self.quantization:
                raise ModelError("merging into a 4-bit base is lossy: load the base in full precision with the "
                                 "adapter (YesNoReranker.load(..., adapter=...)), then save")
            self.backbone = self.backbone.merge_and_unload()
            self.invalidate_fingerprint()
        target = Path(path)
        tokenizer = self.tokenizer
        saved_state = (tokenizer.model_max_length, tokenizer.padding_side, tokenizer.chat_template)
        with atomic_dir(target) as tmp:
            self.backbone.save_pretrained(tmp, safe_serialization=True)
            # What sentence-transformers reads: it cuts pairs at model_max_length and pads on the left
            tokenizer.model_max_length, tokenizer.padding_side = self.max_length, "left"
            tokenizer.chat_template = self.template.chat_template()
            try:
                tokenizer.save_pretrained(tmp)
            finally:
                tokenizer.model_max_length, tokenizer.padding_side, tokenizer.chat_template = saved_state
            write_template(self.template, tmp)
            write_json(tmp / "modules.json", [
                {"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER},
                {"idx": 1, "name": "1", "path": "1_LogitScore", "type": LOGIT_SCORE}])
            write_json(tmp / "sentence_bert_config.json", {
                "transformer_task": "text-generation", "max_seq_length": self.max_length,
                "modality_config": {"text": {"method": "forward", "method_output_name": "logits"},
                                    "message": {"method": "forward", "method_output_name": "logits",
                                                "format": "flat"}},
                "module_output_name": "causal_logits"})
            (tmp / "1_LogitScore").mkdir()
            write_json(tmp / "1_LogitScore" / "config.json", {
                "true_token_id": self.yes_id, "false_token_id": self.no_id, "module_input_name": "causal_logits"})
            write_json(tmp / "config_sentence_transformers.json", {
                "model_type": "CrossEncoder", "activation_fn": SIGMOID, "prompts": {}, "default_prompt_name": None,
                "embedkit": {"kind": self.kind}})
            self._write_records(tmp, target, manifest, card, write_extra)
        self.source_path = str(target)
        return target


def reranker_kind(name_or_path: str | Path) -> str:
    """What `Reranker.from_pretrained(name_or_path, start=True)` builds, from the folder's files alone (no weights
    load): "yes-no" for a yes/no reranker folder or a causal LM, else "cross-encoder"."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    if read_template(path) is not None:
        return YesNoReranker.kind
    try:
        config = AutoConfig.from_pretrained(_transformer_dir(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"not a model folder: {exc}".splitlines()[0], path=path) from exc
    return YesNoReranker.kind if is_causal_config(config) else Reranker.kind


def load_reranker(name_or_path: str | Path, **kwargs) -> Reranker:
    """Load a reranker folder, a cross-encoder or a yes/no LLM reranker; see Reranker.from_pretrained."""
    return Reranker.from_pretrained(name_or_path, **kwargs)


# ---------------------------------------------------------------------------------------------------- probe scores
def probe_pairs() -> tuple[list[str], list[str]]:
    pairs = [(q, d) for q in PROBE_QUERIES for d in PROBE_DOCUMENTS]
    return [q for q, _ in pairs], [d for _, d in pairs]


def write_rerank_probes(reranker, folder: str | Path, *, atol: float = PROBE_ATOL) -> Path:
    """Score the probe pairs with `reranker` (a Reranker, or anything with its `score(..., logits=True)` and
    `fingerprint`: the ONNX runtime) and write `rerank_probes.json` (logits, and the `atol` a re-check allows)."""
    queries, documents = probe_pairs()
    logits = reranker.score(queries, documents, logits=True)
    return write_json(Path(folder) / RERANK_PROBES_NAME, {
        "format": RERANK_PROBES_FORMAT, "queries": queries, "documents": documents,
        "logits": [float(x) for x in logits], "atol": float(atol), "model_fingerprint": reranker.fingerprint},
        indent=None)


def check_rerank_probes(score_fn, folder: str | Path, atol: float | None = None) -> dict[str, Any]:
    """Re-score the folder's probe pairs with `score_fn(queries, documents) -> logits`; {"ok", "max_abs_diff",
    "atol", "n"}. A folder without probes, or a malformed file, is a ModelError."""
    path = Path(folder) / RERANK_PROBES_NAME
    data = _read_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("queries", "documents", "logits")):
        raise ModelError("no readable probe scores (queries, documents, logits)", path=path)
    expected = np.asarray(data["logits"], dtype=np.float32)
    got = np.asarray(score_fn(data["queries"], data["documents"]), dtype=np.float32).reshape(-1)
    if got.shape != expected.shape:
        raise ModelError(f"{len(expected)} probe scores but the model gave {got.size}", path=path)
    tolerance = float(atol if atol is not None else data.get("atol", PROBE_ATOL))
    diff = float(np.abs(got - expected).max())
    return {"ok": bool(np.isfinite(got).all() and diff <= tolerance), "max_abs_diff": diff, "atol": tolerance,
            "n": int(expected.size)}
