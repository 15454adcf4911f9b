"""vLLM's offline engine (`--engine vllm`): the fast path for a bigger generator on a GPU.

vLLM's wheel is CUDA-only: on a machine without it (or without a GPU) the run stops at once with one line saying
so, before any document is read. Sampling is seeded per call through SamplingParams.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Sequence

from embedkit.manifest import sha256_dir
from embedkit.synth.generators.base import GenerationSettings, GeneratorError, QueryGenerator


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise GeneratorError("--engine vllm needs the vllm package and an NVIDIA GPU (CUDA); vllm is not installed "
                             "here. Use the default engine (transformers), or --api-base with a vLLM server")
    import torch

    if not torch.cuda.is_available():
        raise GeneratorError("--engine vllm needs an NVIDIA GPU (CUDA); none is visible here. Use the default "
                             "engine (transformers), or --api-base with a vLLM server on a GPU machine")


class VllmGenerator(QueryGenerator):
    def __init__(self, model: str, *, settings: GenerationSettings) -> None:
        require_vllm()
        from vllm import LLM

        from embedkit.llm.model import transformer_dir

        self.settings = settings
        self.model_name = str(model)
        _root, self.weights, _st = transformer_dir(model)
        self.llm = LLM(model=str(self.weights), seed=0)

    def generate(self, prompts: Sequence[str], *, seed: int) -> list[str]:
        from vllm import SamplingParams

        s = self.settings
        params = [SamplingParams(max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                 seed=seed + i) for i in range(len(prompts))]
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        outputs = self.llm.chat(conversations, params, use_tqdm=False)
        return [o.outputs[0].text if o.outputs else "" for o in outputs]

    def describe(self) -> dict[str, Any]:
        return {"engine": "vllm", "model": self.model_name, "path": str(self.weights),
                "sha256": sha256_dir(self.weights), "settings": self.settings.to_dict()}
