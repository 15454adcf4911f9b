"""Query generators behind one small interface (`base.QueryGenerator`): in-process transformers (`local`), an
OpenAI-compatible chat endpoint (`api`), and vLLM's offline engine (`vllm_engine`).

`open_generator` picks one from the command's options and imports only that backend.
"""

from __future__ import annotations

from typing import Any

from embedkit.errors import ConfigError
from embedkit.synth.generators.api import ChatEndpointGenerator
from embedkit.synth.generators.base import GenerationSettings, GeneratorError, QueryGenerator
from embedkit.synth.generators.vllm_engine import VllmGenerator

ENGINES = ("transformers", "vllm")

__all__ = ["ENGINES", "GenerationSettings", "GeneratorError", "QueryGenerator", "open_generator"]


def open_generator(*, model: str, engine: str, settings: GenerationSettings, device: str = "auto",
                   api_base: str | None = None, api_model: str | None = None, api_key: str | None = None,
                   timeout_s: float = 60.0) -> Any:
    """The generator the options ask for; nothing heavy is imported for the others."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r} (choose from: {', '.join(ENGINES)})", field="engine")
    if api_base:
        return ChatEndpointGenerator(api_base, model=api_model, api_key=api_key, settings=settings,
                                     timeout_s=timeout_s)
    if engine == "vllm":
        return VllmGenerator(model, settings=settings)
    from embedkit.synth.generators.local import TransformersGenerator

    return TransformersGenerator(model, settings=settings, device=device)
