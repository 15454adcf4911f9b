"""In-process generation with transformers: the embedded SmolLM2-135M-Instruct (`smollm2-135m`), any causal-LM
folder, an embedkit folder with a generative head (`embedkit llm sft` output) or a hub id.

The model is loaded the way `embedkit llm` and `rag web` load their generator (`embedkit.llm.generate`), so its
chat template and stop tokens are the ones the model was trained with. A batch is left-padded (a decoder continues
from the last position) and generated in one `generate` call; the caller sorts prompts by length, so batches carry
little padding.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from embedkit.llm.generate import load_generator
from embedkit.llm.model import transformer_dir
from embedkit.manifest import device_fields, sha256_dir
from embedkit.synth.generators.base import GenerationSettings, QueryGenerator


class TransformersGenerator(QueryGenerator):
    def __init__(self, model: str, *, settings: GenerationSettings, device: str = "auto") -> None:
        self.settings = settings
        self.model_name = str(model)
        self.chat = load_generator(model, device=device, name=self.model_name)
        _root, self.weights, _st = transformer_dir(model)
        self._sha256: str | None = None

    def _ids(self, prompt: str) -> list[int]:
        return self.chat.prompt_ids([{"role": "user", "content": prompt}])

    def prompt_length(self, prompt: str) -> int:
        return len(self._ids(prompt))

    def generate(self, prompts: Sequence[str], *, seed: int) -> list[str]:
        if not prompts:
            return []
        ids = [self._ids(p) for p in prompts]
        width = max(len(x) for x in ids)
        pad = self.chat.tokenizer.pad_token_id
        pad = pad if pad is not None else self.chat.stop_ids[0]
        device = self.chat.device
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        s = self.settings
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(1, min(s.max_new_tokens, self.chat.max_context - width)),
            "eos_token_id": self.chat.stop_ids, "pad_token_id": pad, "do_sample": s.temperature > 0}
        if s.temperature > 0:
            kwargs.update(temperature=float(s.temperature), top_p=float(s.top_p))
        else:  # greedy: clear the sampling defaults a generation_config may carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            torch.manual_seed(int(seed))
            out = self.chat.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        replies = []
        stops = set(self.chat.stop_ids)
        for row in out[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in stops), len(row))
            replies.append(self.chat.tokenizer.decode(row[:end], skip_special_tokens=True))
        return replies

    def describe(self) -> dict[str, Any]:
        if self._sha256 is None:
            self._sha256 = sha256_dir(self.weights)
        return {"engine": "transformers", "model": self.model_name, "path": str(self.weights),
                "sha256": self._sha256, "settings": self.settings.to_dict(), **device_fields(self.chat.device)}

    def close(self) -> None:
        del self.chat
