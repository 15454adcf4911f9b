"""LoRA and QLoRA adapters on an Encoder's backbone (PEFT), saved alone or merged. They work on any model object
with `.backbone`, `.has_adapter`, `.invalidate_fingerprint()` and `.quantization`: the yes/no LLM reranker
(embedkit.models.reranker.YesNoReranker) trains through them too."""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedkit.errors import ModelError

if TYPE_CHECKING:  # annotations only: the encoder imports this module to merge adapters when it saves
    from embedkit.models.encoder import Encoder


def attach_lora(
    encoder: Encoder,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    dora: bool = False,
    rslora: bool = False,
) -> Encoder:
    """Wrap the backbone with LoRA adapters, in place; afterwards only adapter weights are trainable.

    `dora`: weight-decomposed LoRA (a learned magnitude per output); `rslora`: scale alpha / sqrt(r) instead of
    alpha / r, so larger ranks keep learning. Both are PEFT's own implementations."""
    from peft import LoraConfig, get_peft_model

    if encoder.has_adapter:
        raise ModelError("the encoder already has an adapter")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none",
                        use_dora=dora, use_rslora=rslora)
    encoder.backbone = get_peft_model(encoder.backbone, config)
    encoder.invalidate_fingerprint()
    return encoder


def prepare_kbit(encoder: Encoder, *, gradient_checkpointing: bool = False) -> Encoder:
    """Ready a 4-bit (NF4) backbone for QLoRA: frozen quantised base, fp32 norms; call before attach_lora."""
    from peft import prepare_model_for_kbit_training

    if encoder.quantization is None:
        raise ModelError("prepare_kbit needs a model loaded with quantization='nf4'")
    encoder.backbone = prepare_model_for_kbit_training(
        encoder.backbone, use_gradient_checkpointing=gradient_checkpointing
    )
    return encoder


def merge_adapter(encoder: Encoder) -> Encoder:
    """Fold the LoRA weights into the base weights (exact to ~1e-7) and drop the PEFT wrapper."""
    if not encoder.has_adapter:
        raise ModelError("the encoder has no adapter to merge")
    if encoder.quantization:
        raise ModelError("merging into a 4-bit base is lossy; load the base in fp32 with the adapter, then merge")
    encoder.backbone = encoder.backbone.merge_and_unload()
    encoder.invalidate_fingerprint()
    return encoder


def trainable_parameters(encoder: Encoder) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    total = sum(p.numel() for p in encoder.parameters())
    return trainable, total


def keep_4bit_layout(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout; returns the layers touched.

    On CPUs with AVX-512 bf16, bitsandbytes (0.50) repacks a Linear4bit's weight in place on its first no-grad
    forward in eval mode. Under ZeRO-3 the next all-gather brings back the original bytes while the layer still
    believes they are repacked: every later forward is silently wrong. Even in one process the repacked kernel gives
    outputs ~1e-2 away from the training kernel, so dev evaluation would score another model than the one trained.
    A model being trained keeps one layout."""
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
