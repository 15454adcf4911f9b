"""One encoder for BERT-style and causal-LLM embedding models.

Loads a sentence-transformers folder (modules.json + pooling config), a plain Hugging Face folder, or an embedded
default; encodes with length-sorted batches; saves back in the sentence-transformers layout with the explicit pooling
config and an embedkit manifest. The same `tokenize` / `forward` are used for training, so what is trained is what
is evaluated, exported and served.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from embedkit import logs
from embedkit.atomic import atomic_dir, write_json
from embedkit.device import resolve_device
from embedkit.errors import ModelError
from embedkit.manifest import MANIFEST_NAME, base_manifest
from embedkit.models import adapters
from embedkit.models.distributed import encode_sharded, sharded_encoding, sharding_group
from embedkit.models.pooling import POOLINGS, get_pooling, mode_from_st_config, pool, st_pooling_config
from embedkit.models.prompts import resolve_prompts
from embedkit.models.registry import model_kind, resolve_model_path
from embedkit.models.tokenization import collate, length_sorted_batches, prepare_tokenizer, tokenize

log = logging.getLogger(__name__)

# How many texts are tokenized and length-sorted together; bounds memory on huge inputs.
_SORT_CHUNK = 16384
_SUPPORTED_ST_MODULES = ("Transformer", "Pooling", "Normalize")


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.exists() else None


def is_causal_config(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return bool(getattr(config, "is_decoder", False)) or any("CausalLM" in a for a in archs) or (
        config.model_type in {"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "gpt2"}
    )


class Encoder(nn.Module):
    """Text -> vector. `encode` for inference, `tokenize` + `forward` for training."""

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        *,
        pooling: str,
        prompts: dict[str, str] | None = None,
        max_length: int = 512,
        normalize: bool = True,
        name: str = "model",
        source_path: str | None = None,
        padding_side: str | None = None,
        base_model: dict | None = None,
        quantization: str | None = None,
        attention: str = "causal",
    ) -> None:
        super().__init__()
        if attention not in ("causal", "bidirectional"):
            raise ModelError(f"attention must be 'causal' or 'bidirectional', not {attention!r}")
        # 'bidirectional': a causal LM embeds with full attention (GritLM-style); generation stays causal.
        self.attention = attention
        if pooling not in POOLINGS:
            raise ModelError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.prompts = resolve_prompts(prompts)
        self.max_length = int(max_length)
        self.normalize = normalize
        self.name = name
        self.source_path = source_path
        self.quantization = quantization
        self.is_causal = is_causal_config(self.base_config)
        if self.attention == "bidirectional" and not self.is_causal:
            raise ModelError("attention 'bidirectional' is for causal LLM encoders; this model already attends both "
                             "ways", path=source_path)
        # Encoders pad on the right (RoBERTa-style position ids would break on the left); causal models may use
        # either side because position ids are derived from the attention mask below.
        self.padding_side = padding_side or "right"
        if self.padding_side not in ("left", "right"):
            raise ModelError(f"padding_side must be 'left' or 'right', not {self.padding_side!r}")
        prepare_tokenizer(self.tokenizer, self.pooling, path=source_path)  # pad fallback; EOS for last-token
        self._fingerprint: str | None = None
        self.base_model = base_model or {"name": name, "path": source_path, "fingerprint": self.fingerprint}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        pooling: str | None = None,
        prompts: dict[str, str] | str | None = None,
        max_length: int | None = None,
        normalize: bool | None = None,
        dtype: str | torch.dtype | None = None,
        padding_side: str | None = None,
        adapter: str | Path | None = None,
        quantization: str | None = None,
        device: str | torch.device = "cpu",
        sharded_storage: bool = False,
        attention: str | None = None,
    ) -> "Encoder":
        """`device`: cpu, cuda, cuda:N, auto or a torch.device (see embedkit.device.resolve_device). A 4-bit model
        (quantization="nf4") is quantised straight onto a GPU device; on the CPU it stays on the CPU.
        `attention`: causal | bidirectional for a causal LM (None: the folder's setting, else causal)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        target = resolve_device(device, field="device")

        path = resolve_model_path(name_or_path)
        if model_kind(path) == "reranker":
            raise ModelError(f"{name_or_path} is a reranker (cross-encoder: it scores query-document pairs), not an "
                             "embedding model: give it where a reranker is expected (--rerank)", path=path)
        st = read_st_folder(path)
        transformer_dir = path / st["transformer_path"]
        try:
            config = AutoConfig.from_pretrained(transformer_dir)
        except (OSError, ValueError) as exc:
            raise ModelError(f"not a model folder: {exc}".splitlines()[0], path=transformer_dir) from exc
        torch_dtype = parse_dtype(dtype)
        load_kwargs = backbone_load_kwargs(torch_dtype, quantization, target, sharded_storage=sharded_storage)
        backbone = AutoModel.from_pretrained(transformer_dir, **load_kwargs)
        if quantization and target.type == "cpu":
            _release_checkpoint_mapping(backbone)
        tokenizer = AutoTokenizer.from_pretrained(transformer_dir)
        if adapter is not None:
            from peft import PeftModel

            backbone = PeftModel.from_pretrained(backbone, str(adapter), is_trainable=False)
        manifest = _read_json(path / MANIFEST_NAME) or {}
        chosen_pooling = pooling or st["pooling"] or ("lasttoken" if is_causal_config(config) else "mean")
        chosen_prompts = prompts if prompts is not None else st["prompts"]
        if prompts is None and not st["prompts"] and str(name_or_path) == "smollm2-135m":
            chosen_prompts = "instruct"  # an LLM embeds questions better with an instruction
        tokenizer_max = getattr(tokenizer, "model_max_length", 512) or 512
        chosen_max = max_length or st["max_length"] or min(int(tokenizer_max), 512)
        encoder = cls(
            backbone,
            tokenizer,
            pooling=chosen_pooling,
            prompts=resolve_prompts(chosen_prompts),
            max_length=chosen_max,
            normalize=st["normalize"] if normalize is None else normalize,
            name=str(name_or_path),
            source_path=str(path),
            padding_side=padding_side or st.get("padding_side"),
            base_model=manifest.get("base_model"),
            quantization=quantization,
            attention=attention or st.get("attention") or "causal",
        )
        # A 4-bit model is already where device_map put it (bitsandbytes' weights cannot be moved with .to()).
        return encoder.to(target) if target.type != "cpu" and not quantization else encoder

    # ------------------------------------------------------------------ properties
    @property
    def base_config(self):
        """The transformer's Hugging Face config (under a PEFT wrapper: the base model's): sizes, vocabulary, ties."""
        model = self.backbone
        return getattr(model, "config", None) or model.get_base_model().config

    @property
    def dim(self) -> int:
        return int(self.base_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.backbone.parameters() if p.is_floating_point()).dtype

    @property
    def fingerprint(self) -> str:
        """sha256 over weights, tokenizer and embedding settings: equal fingerprints -> equal vectors."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for key, tensor in sorted(self.backbone.state_dict().items()):
                h.update(key.encode())
                if hasattr(tensor, "full_tensor"):  # a DTensor shard (FSDP): every rank gathers the same whole
                    tensor = tensor.full_tensor()
                data = tensor.detach().cpu().contiguous()
                h.update(str(data.dtype).encode())
                h.update(data.view(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
            settings = {"pooling": self.pooling, "prompts": self.prompts, "max_length": self.max_length,
                        "normalize": self.normalize}
            if self.attention != "causal":  # only when set, so causal fingerprints stay what they were
                settings["attention"] = self.attention
            h.update(json.dumps(settings, sort_keys=True).encode())
            h.update(self._tokenizer_identity().encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _tokenizer_identity(self) -> str:
        """The tokenizer's vocabulary and processing, without its mutable truncation/padding state."""
        if not self._is_fast:
            return json.dumps(sorted(self.tokenizer.get_vocab().items()))
        spec = json.loads(self.tokenizer.backend_tokenizer.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        return json.dumps(spec, sort_keys=True)

    def invalidate_fingerprint(self) -> None:
        """Call after the weights change (training)."""
        self._fingerprint = None

    @property
    def _is_fast(self) -> bool:
        return hasattr(self.tokenizer, "backend_tokenizer")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.source_path,
            "fingerprint": self.fingerprint,
            "architecture": (getattr(self.base_config, "architectures", None) or [self.base_config.model_type])[0],
            "pooling": self.pooling,
            "prompts": self.prompts,
            "max_length": self.max_length,
            "normalize": self.normalize,
            "dim": self.dim,
            "dtype": str(self.dtype).replace("torch.", ""),
            "padding_side": self.padding_side,
            "quantization": self.quantization,
            "adapter": self.has_adapter,
            "base_model": self.base_model,
            **({"attention": self.attention} if self.attention != "causal" else {}),
        }

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.backbone, "peft_config")

    # ------------------------------------------------------------------ tokenization
    # One path for every caller (training, encode, ONNX, the server): embedkit.models.tokenization.
    def token_ids(self, texts: Sequence[str], kind: str = "document", *, truncate: bool = True) -> list[list[int]]:
        """Unpadded token ids of the prompted texts, cut to max_length tokens unless `truncate` is False."""
        return tokenize(self.tokenizer, texts, kind, prompts=self.prompts,
                        max_length=self.max_length if truncate else None)

    def collate(self, id_lists: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Pad token-id lists into a batch on this encoder's padding side."""
        return collate(id_lists, self.tokenizer.pad_token_id, self.padding_side, to="torch")

    def tokenize(self, texts: Sequence[str], kind: str = "document") -> dict[str, torch.Tensor]:
        return self.collate(self.token_ids(texts, kind))

    # ------------------------------------------------------------------ forward / encode
    def forward(self, features: dict[str, torch.Tensor], normalize: bool | None = None, *,
                hidden_states: bool = False) -> torch.Tensor:
        """The pooled (and normalised) embeddings [B, D]; `hidden_states`: the last layer's states [B, L, H] instead
        (the MNTP warm-up predicts tokens from them), computed with the same attention and positions."""
        device = self.device
        input_ids = features["input_ids"].to(device)
        attention_mask = features["attention_mask"].to(device)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.is_causal:
            # Position ids from the mask make left padding give the same states as no padding at all.
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            kwargs["use_cache"] = False
            if self.attention == "bidirectional":
                from transformers.masking_utils import create_bidirectional_mask

                # A ready 4D mask is passed through as-is by the model, replacing its causal one.
                embeds = self.backbone.get_input_embeddings()(input_ids)
                kwargs.pop("input_ids")
                kwargs["inputs_embeds"] = embeds
                kwargs["attention_mask"] = create_bidirectional_mask(
                    config=self.base_config, inputs_embeds=embeds, attention_mask=attention_mask,
                    allow_is_bidirectional_skip=False)
        hidden = self.backbone(**kwargs).last_hidden_state
        if hidden_states:
            return hidden
        pooled = pool(hidden, attention_mask, self.pooling).float()
        if self.normalize if normalize is None else normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled

    def sharded(self, group=None):
        """`with encoder.sharded(): encoder.encode(...)`: spread encoding over the ranks of a torch.distributed
        process group (every rank gets the full result). Explicit on purpose: every rank must make the same encode
        calls. See embedkit.models.distributed."""
        return sharded_encoding(self, group)

    def encode(
        self,
        texts: Sequence[str] | str,
        kind: str = "document",
        batch_size: int = 32,
        normalize: bool | None = None,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """Embed texts as float32 [n, dim]; batches are length-sorted so little compute goes to padding.

        Inside `with encoder.sharded():` under a multi-process group, the batches are spread over the ranks and
        every rank returns the full result (embedkit.models.distributed).
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if getattr(self, "_embedkit_shard_group", None) is not None:
            shard, group = sharding_group(self)
            if shard:
                was_training = self.training
                self.eval()
                # no_grad, not inference_mode: under DeepSpeed ZeRO-3 (the sharded caller is often a trainer's dev
                # evaluation) inference tensors made while parameters are gathered break the next backward.
                try:
                    with torch.no_grad():
                        return encode_sharded(self, texts, kind=kind, batch_size=batch_size, normalize=normalize,
                                              show_progress=show_progress, group=group, sort_chunk=_SORT_CHUNK)
                finally:
                    self.train(was_training)
        with torch.inference_mode():
            return self._encode_local(texts, kind, batch_size, normalize, show_progress)

    def _encode_local(self, texts: list[str], kind: str, batch_size: int, normalize: bool | None,
                      show_progress: bool | None) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        was_training = self.training
        self.eval()
        progress = logs.progress(total=len(texts), desc=f"encode {kind}s", unit="text", logger=log,
                                 enabled=show_progress if show_progress is not None else len(texts) >= 2048)
        try:
            for start in range(0, len(texts), _SORT_CHUNK):
                chunk = texts[start : start + _SORT_CHUNK]
                ids = self.token_ids(chunk, kind)
                for rows in length_sorted_batches(ids, batch_size):
                    # self(...), not self.forward: a wrapper (FSDP) hooks the call
                    vectors = self(self.collate([ids[i] for i in rows]), normalize=normalize)
                    out[[start + i for i in rows]] = vectors.cpu().numpy()
                    progress.update(len(rows))
        finally:
            progress.close()
            self.train(was_training)
        return out

    # ------------------------------------------------------------------ saving
    def save(self, path: str | Path, *, merge_adapter: bool = True, manifest: dict | None = None) -> Path:
        """Write a sentence-transformers folder (explicit pooling config) plus the embedkit manifest, atomically."""
        backbone = self.backbone
        if self.has_adapter:
            if not merge_adapter:
                raise ModelError("use save_adapter() to save the adapter alone, or merge_adapter=True")
            backbone = adapters.merge_adapter(self).backbone
        target = Path(path)
        with atomic_dir(target) as tmp:
            backbone.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.padding_side = self.padding_side
            self.tokenizer.save_pretrained(tmp)
            modules = [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
            if self.normalize:
                modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                                "type": "sentence_transformers.models.Normalize"})
                (tmp / "2_Normalize").mkdir()
            write_json(tmp / "modules.json", modules)
            write_json(tmp / "sentence_bert_config.json", {"max_seq_length": self.max_length, "do_lower_case": False})
            (tmp / "1_Pooling").mkdir()
            write_json(tmp / "1_Pooling" / "config.json", st_pooling_config(self.pooling, self.dim))
            write_json(tmp / "config_sentence_transformers.json", {
                "model_type": "SentenceTransformer",
                "prompts": {"query": self.prompts.get("query", ""), "document": self.prompts.get("document", "")},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
                "embedkit": {"padding_side": self.padding_side,
                             **({"attention": self.attention} if self.attention != "causal" else {}),
                             # a pooling sentence-transformers has no key for is named here (read back below)
                             **({"pooling": self.pooling} if get_pooling(self.pooling).st_key is None else {})},
            })
            record = base_manifest("model", base_model=self.base_model, model=self.describe(), **(manifest or {}))
            record["model"]["path"] = str(target)
            write_json(tmp / MANIFEST_NAME, record)
        self.source_path = str(target)
        return target

    def save_adapter(self, path: str | Path) -> Path:
        """Save only the LoRA adapter weights (small); load with `load_model(base, adapter=path)`."""
        if not self.has_adapter:
            raise ModelError("this encoder has no adapter to save")
        with atomic_dir(path) as tmp:
            self.backbone.save_pretrained(tmp)
        return Path(path)


def read_st_folder(path: Path) -> dict[str, Any]:
    """What a sentence-transformers folder says about pooling, prompts, max length and normalisation."""
    info: dict[str, Any] = {"transformer_path": "", "pooling": None, "prompts": {}, "max_length": None,
                            "normalize": False, "padding_side": None, "attention": None}
    modules = _read_json(path / "modules.json")
    if modules is None:  # a plain Hugging Face folder: no pooling recorded, decided by the caller
        return info
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind not in _SUPPORTED_ST_MODULES:
            raise ModelError(f"sentence-transformers module {module.get('type')!r} is not supported yet",
                             path=path / "modules.json")
        module_dir = path / module.get("path", "")
        if kind == "Transformer":
            info["transformer_path"] = module.get("path", "")
            sbert = _read_json(module_dir / "sentence_bert_config.json") or _read_json(path / "sentence_bert_config.json")
            if sbert and sbert.get("max_seq_length"):
                info["max_length"] = int(sbert["max_seq_length"])
        elif kind == "Pooling":
            config = _read_json(module_dir / "config.json") or {}
            try:
                info["pooling"] = mode_from_st_config(config)
            except ValueError as exc:
                raise ModelError(str(exc), path=module_dir / "config.json", field="pooling_mode") from exc
        elif kind == "Normalize":
            info["normalize"] = True
    st_config = _read_json(path / "config_sentence_transformers.json") or {}
    info["prompts"] = {k: v for k, v in (st_config.get("prompts") or {}).items() if v}
    info["padding_side"] = (st_config.get("embedkit") or {}).get("padding_side")
    info["attention"] = (st_config.get("embedkit") or {}).get("attention")
    info["pooling"] = (st_config.get("embedkit") or {}).get("pooling") or info["pooling"]
    return info


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A recipe's / caller's dtype name (fp32, bf16, fp16 or their long forms) as a torch dtype; None is fp32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(table)}")
    return table[dtype]


def _release_checkpoint_mapping(backbone) -> None:
    """Give the non-quantised weights (embeddings, norms) their own memory, so the memory-mapped fp32 checkpoint can
    be unmapped.

    safetensors maps the whole file; a weight left unquantised is a view into that mapping, which keeps every page
    the 4-bit conversion read resident: SmolLM2-135M kept 0.54 GB of fp32 checkpoint next to its 0.17 GB of 4-bit
    weights. Copying the few unquantised tensors (0.11 GB) drops the mapping. (An fp32 load needs no copy: its
    weights *are* the mapping.)
    """
    with torch.no_grad():
        for module in backbone.modules():
            for name, param in module.named_parameters(recurse=False):
                if param.dtype != torch.uint8:  # bitsandbytes' packed 4-bit storage already owns its memory
                    param.data = param.data.clone()
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None:
                    setattr(module, name, buffer.clone())  # nn.Module keeps it a buffer (persistence unchanged)
    gc.collect()


def backbone_load_kwargs(torch_dtype: torch.dtype, quantization: str | None,
                         device: torch.device, *, sharded_storage: bool = False) -> dict[str, Any]:
    """from_pretrained arguments: the dtype, and for 4-bit the quantisation config, placed on the GPU when `device`
    is one (device_map {"": index}: bitsandbytes quantises while loading onto it); on the CPU as before.

    `sharded_storage`: the 4-bit weights will be partitioned by DeepSpeed ZeRO-3, which flattens every parameter of
    a partition group into one buffer of the compute dtype: store the packed 4-bit bytes in that dtype
    (bnb_4bit_quant_storage), as PEFT's DeepSpeed guide prescribes."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quantization:
        kwargs["quantization_config"] = _quantization_config(quantization, torch_dtype,
                                                              storage=torch_dtype if sharded_storage else None)
        if device.type == "cuda":
            kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    return kwargs


def _quantization_config(kind: str, compute_dtype: torch.dtype, storage: torch.dtype | None = None):
    if kind != "nf4":
        raise ModelError(f"unknown quantization {kind!r}; only 'nf4' (4-bit, bitsandbytes) is supported")
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelError("4-bit loading needs bitsandbytes: pip install 'embedkit[qlora]'") from exc
    extra = {"bnb_4bit_quant_storage": storage} if storage is not None else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=False, **extra)


def load_model(name_or_path: str | Path, **kwargs) -> Encoder:
    """Load an encoder: `minilm`, `smollm2-135m`, a local folder, or a Hugging Face id. See Encoder.from_pretrained."""
    return Encoder.from_pretrained(name_or_path, **kwargs)
