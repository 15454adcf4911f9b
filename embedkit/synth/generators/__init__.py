"""Query generators behind one small interface (`base.QueryGenerator`): in-process transformers (`local`), an
OpenAI-compatible chat endpoint (`api`), and vLLM's offline engine (`vllm_engine`).

`GeneratorSpec` names one from the command's options; its `open()` imports only that backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from embedkit.errors import ConfigError
from embedkit.synth.generators.api import ChatEndpointGenerator
from embedkit.synth.generators.base import GenerationSettings, GeneratorError, QueryGenerator
from embedkit.synth.generators.vllm_engine import VllmGenerator, require_vllm

ENGINES = ("transformers", "vllm")

__all__ = ["ENGINES", "GenerationSettings", "GeneratorError", "GeneratorSpec", "QueryGenerator"]


@dataclass(frozen=True)
class GeneratorSpec:
    """Which generator a run uses, known before it is loaded: a resumed run's settings are checked against
    `identity()` first, and `open()` (which may load a model for half a minute) runs only when something is left
    to generate."""

    model: str = "smollm2-135m"
    engine: str = "transformers"
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    device: str = "auto"
    api_base: str | None = None
    api_model: str | None = None
    api_key: str | None = field(default=None, repr=False)  # sent, never recorded
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r} (choose from: {', '.join(ENGINES)})", field="engine")
        if self.api_base is not None and not self.api_base.startswith(("http://", "https://")):
            raise ConfigError(f"must be an http:// or https:// URL, got {self.api_base!r}", field="api-base")
        if self.engine == "vllm" and not self.api_base:
            require_vllm()  # before any document is read: this machine cannot run it at all

    def identity(self) -> dict[str, Any]:
        """What the generated rows depend on (not the batch size, which only groups them)."""
        generation = {k: v for k, v in self.settings.to_dict().items() if k != "batch_size"}
        if self.api_base:
            return {"engine": "api", "api_base": self.api_base, "model": self.api_model, "generation": generation}
        return {"engine": self.engine, "model": str(self.model), "generation": generation}

    def open(self) -> QueryGenerator:
        """The generator; nothing heavy is imported for the others."""
        if self.api_base:
            return ChatEndpointGenerator(self.api_base, model=self.api_model, api_key=self.api_key,
                                         settings=self.settings, timeout_s=self.timeout_s)
        if self.engine == "vllm":
            return VllmGenerator(self.model, settings=self.settings)
        from embedkit.synth.generators.local import TransformersGenerator

        return TransformersGenerator(self.model, settings=self.settings, device=self.device)
