"""One model, two heads: a causal LM whose decoder is also the embedding backbone.

Loading: `load_causal_lm` reads the embedded SmolLM2, any causal-LM folder, or an embedkit folder written by
`save_llm_folder` (sentence-transformers layout whose weights are the full causal LM).
Training: LoRA / QLoRA adapters via PEFT on the causal LM (lm_head stays frozen and, when tied, shared).
Saving: one folder that `embedkit.models.load_model` reads as an embedding model (the decoder; pooling config,
prompts, manifest, probe vectors) and `embedkit.llm.generate.load_generator` reads as a chat model (lm_head
included: `architectures: [...ForCausalLM]`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embedkit.atomic import atomic_dir, write_json, write_text
from embedkit.device import resolve_device
from embedkit.errors import ModelError
from embedkit.llm.data import IGNORE_INDEX, ensure_chat_template
from embedkit.manifest import MANIFEST_NAME
from embedkit.models.prompts import resolve_prompts
from embedkit.models.registry import resolve_model_path

LLM_DEFAULTS = {"pooling": "lasttoken", "prompts": "instruct", "padding_side": "left"}


def transformer_dir(name_or_path: str | Path) -> tuple[Path, Path, dict[str, Any]]:
    """(model folder, folder holding the transformer weights, what its sentence-transformers files say)."""
    from embedkit.models.encoder import read_st_folder

    path = resolve_model_path(name_or_path)
    st = read_st_folder(path)
    return path, path / st["transformer_path"], st


def has_generative_head(model_dir: str | Path) -> bool:
    """True when the folder's transformer is a causal LM checkpoint (lm_head or tied embeddings included).

    A folder written by `Encoder.save` holds only the decoder (`architectures: [LlamaModel]`): False.
    """
    root = Path(model_dir)
    if not root.is_dir():
        return False
    sub = ""
    modules = root / "modules.json"
    if modules.is_file():
        try:
            for module in json.loads(modules.read_text()):
                if str(module.get("type", "")).endswith("Transformer"):
                    sub = module.get("path", "")
        except (ValueError, AttributeError):
            return False
    config_path = root / sub / "config.json"
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text())
    except ValueError:
        return False
    archs = config.get("architectures") or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_causal_lm(name_or_path: str | Path, *, dtype: str = "fp32", quantization: str | None = None,
                   device: str = "cpu", adapter: str | Path | None = None, sharded_storage: bool = False):
    """(model, tokenizer, folder, st info). Raises ModelError when the folder has no generative head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from embedkit.models.encoder import backbone_load_kwargs, parse_dtype
    from embedkit.models.tokenization import ensure_pad_token

    path, weights, st = transformer_dir(name_or_path)
    if not has_generative_head(path):
        raise ModelError("this folder has no generative head (it was saved as an embedding-only model); train from "
                         "the causal LM it came from, e.g. smollm2-135m", path=path)
    target = resolve_device(device, field="device")
    kwargs = backbone_load_kwargs(parse_dtype(dtype), quantization, target, sharded_storage=sharded_storage)
    model = AutoModelForCausalLM.from_pretrained(weights, **kwargs)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    if target.type != "cpu" and not quantization:
        model = model.to(target)
    tokenizer = AutoTokenizer.from_pretrained(weights)
    ensure_pad_token(tokenizer, path=weights)
    ensure_chat_template(tokenizer)
    return model, tokenizer, path, st


def attach_adapter(model, adapter, *, gradient_checkpointing: bool = False):
    """LoRA or QLoRA (the model must then be loaded 4-bit) on every linear layer but lm_head; or full training.
    `adapter.dora` / `adapter.rslora` pick PEFT's LoRA variants."""
    if adapter.type == "none":
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if adapter.type == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    # PEFT's "all-linear" leaves the output layer (lm_head) out, so a tied embedding matrix stays frozen and shared.
    config = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                        target_modules=adapter.targets, bias="none", task_type="CAUSAL_LM",
                        use_dora=getattr(adapter, "dora", False), use_rslora=getattr(adapter, "rslora", False))
    return get_peft_model(model, config)


class TwoHeads(nn.Module):
    """The causal LM as the one module the training engine wraps: `forward(batch, head=...)` runs either head, so
    DDP / DeepSpeed / FSDP see every forward (a call into a submodule would bypass their gradient hooks).

    head "embed": the embedding of `batch` (input_ids, attention_mask) through `embedder` (an Encoder over the same
    decoder); head "answer": (logits, targets, row) of the answer tokens (`answer_logits`).
    The embedder shares the LM's parameters and is kept out of the module tree, so they are registered once.
    """

    def __init__(self, lm, embedder=None) -> None:
        super().__init__()
        self.lm = lm
        object.__setattr__(self, "embedder", embedder)

    def forward(self, batch: dict[str, torch.Tensor], head: str = "embed"):
        if head == "answer":
            return answer_logits(self.lm, batch)
        if self.embedder is None:
            raise ModelError("this model has no embedding head attached")
        return self.embedder(batch)


def base_lm(model):
    """The plain *ForCausalLM under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "peft_config") else model


def decoder_of(model):
    lm = base_lm(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, "model", None)
    if decoder is None:
        raise ModelError(f"cannot find the decoder of {type(lm).__name__}")
    return decoder


def lm_head_of(model):
    return base_lm(model).get_output_embeddings()


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [N, V], targets [N], row [N]) for the N answer tokens of the batch only.

    Generation attention is always causal: the decoder runs with its own (causal) mask here.
    """
    device = next(p for p in model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    hidden = decoder_of(model)(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device),
                               use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=device)[:, None].expand_as(targets)[keep]
    logits = lm_head_of(model)(hidden[:, :-1][keep]).float()
    return logits, targets[keep], rows


def embedding_settings(recipe_model, st: dict[str, Any]) -> dict[str, Any]:
    """Pooling / prompts / padding side / attention: the recipe's, else the source folder's, else LLM defaults."""
    pooling = recipe_model.pooling or st.get("pooling") or LLM_DEFAULTS["pooling"]
    prompts = recipe_model.prompts if recipe_model.prompts is not None else (st.get("prompts") or LLM_DEFAULTS["prompts"])
    padding = recipe_model.padding_side or st.get("padding_side") or LLM_DEFAULTS["padding_side"]
    attention = recipe_model.embedding_attention
    if attention == "causal" and st.get("attention"):
        attention = st["attention"]
    return {"pooling": pooling, "prompts": resolve_prompts(prompts), "padding_side": padding, "attention": attention,
            "max_length": recipe_model.max_length}


def make_embedder(model, tokenizer, settings: dict[str, Any], *, name: str, source_path: str | None = None,
                  base_model: dict | None = None):
    """An Encoder over the causal LM's decoder: the same parameters (and adapters) serve both heads."""
    from embedkit.models.encoder import Encoder

    return Encoder(decoder_of(model), tokenizer, pooling=settings["pooling"], prompts=settings["prompts"],
                   max_length=settings["max_length"], normalize=True, name=name, source_path=source_path,
                   padding_side=settings["padding_side"], attention=settings["attention"],
                   base_model=base_model or {"name": name, "path": source_path})


def merged_lm(model, *, adapter_type: str, source: str | Path, dtype: str, work: Path):
    """The trained causal LM with adapters folded in, in full precision (QLoRA: reload the base unquantised)."""
    if adapter_type == "none":
        return base_lm(model)
    if adapter_type == "lora":
        return model.merge_and_unload()
    # Merging into 4-bit weights is lossy: save the adapter, reload the base in full precision with it, merge.
    adapter_dir = work / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    model.save_pretrained(str(adapter_dir))
    full, _, _, _ = load_causal_lm(source, dtype="fp32" if dtype == "fp16" else dtype, adapter=adapter_dir)
    return full.merge_and_unload()


def save_llm_folder(lm, tokenizer, output: str | Path, *, settings: dict[str, Any], name: str,
                    base_model: dict | None, manifest: dict[str, Any], card: str | None = None,
                    extra_files=None) -> Path:
    """Write one folder holding both heads; returns it. Probe vectors are computed from the folder as re-loaded."""
    from embedkit.models.probes import write_probes
    from embedkit.models.encoder import load_model

    output = Path(output)
    lm = lm.to("cpu").float() if next(lm.parameters()).dtype == torch.float16 else lm.to("cpu")
    ensure_chat_template(tokenizer)
    embedder = make_embedder(lm, tokenizer, settings, name=name, base_model=base_model)
    with atomic_dir(output) as tmp:
        embedder.save(tmp, manifest=manifest)  # ST layout, pooling config, prompts, manifest (decoder weights)
        # Replace the decoder-only weights and config by the whole causal LM: lm_head (or the tie) included.
        for stale in tmp.glob("model*.safetensors*"):
            stale.unlink()
        lm.save_pretrained(tmp, safe_serialization=True)
        loaded = load_model(tmp)
        write_probes(loaded, tmp, created_by="llm")
        record = json.loads((tmp / MANIFEST_NAME).read_text())
        record["model"]["path"] = str(output)
        record["model"]["fingerprint"] = loaded.fingerprint
        record["model"]["generative_head"] = True
        write_json(tmp / MANIFEST_NAME, record)
        if card:
            write_text(tmp / "README.md", card)
        if extra_files is not None:  # e.g. the training log and TensorBoard events, inside the same atomic write
            extra_files(tmp)
    return output
