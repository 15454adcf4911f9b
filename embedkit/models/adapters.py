"""LoRA and QLoRA adapters on an Encoder's backbone (PEFT), saved alone or merged."""

from __future__ import annotations

from embedkit.errors import ModelError
from embedkit.models.encoder import Encoder


def attach_lora(
    encoder: Encoder,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
) -> Encoder:
    """Wrap the backbone with LoRA adapters, in place; afterwards only adapter weights are trainable."""
    from peft import LoraConfig, get_peft_model

    if encoder.has_adapter:
        raise ModelError("the encoder already has an adapter")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none")
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
