"""What every query generator does: turn a batch of prompts into one reply each, seeded, and say what it is."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from embedkit.errors import EmbedkitError


class GeneratorError(EmbedkitError):
    """The generator failed while the input was fine: an endpoint that cannot be reached or answers with an error,
    an engine that cannot run here, a model that returns nothing. Exit code 3 (bad input and options: 2)."""

    exit_code = 3


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 48  # a query is short; a longer budget only buys rambling from a small model
    temperature: float = 0.7  # sampling, so k queries of one document differ; 0 = greedy
    top_p: float = 0.9
    batch_size: int = 8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class QueryGenerator(ABC):
    """One reply per prompt. Each prompt is the user turn of a one-turn chat."""

    settings: GenerationSettings

    @abstractmethod
    def generate(self, prompts: Sequence[str], *, seed: int) -> list[str]:
        """Replies to `prompts` in their order (raw text; "" when the model said nothing). `seed` seeds the
        sampling of this call, so a run with the same seed and the same batches gives the same replies."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """For the manifest: engine, model, and a hash of the weights where the generator has them locally."""

    def prompt_length(self, prompt: str) -> int:
        """What batches are sorted by, so a batch holds prompts of similar length (little padding)."""
        return len(prompt)

    def close(self) -> None:
        """Release what the generator holds (a model, a connection pool)."""
