"""Chat generation with the generative head of a model folder (always causal attention).

    gen = load_generator("runs/smollm2-joint")
    gen.answer("What causes asthma?", ["passage one ...", "passage two ..."])   # cites passages as [1], [2]
    gen.chat([{"role": "user", "content": "hi"}], max_new_tokens=64)          # -> ChatResult

Greedy decoding by default (temperature 0), so answers are reproducible; one generation at a time per Generator
(a lock), since a CPU model gains nothing from running two at once.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from embedkit.atomic import atomic_dir, write_json
from embedkit.errors import ModelError
from embedkit.llm.data import ensure_chat_template, prompt_ids
from embedkit.llm.model import has_generative_head, load_causal_lm, transformer_dir

RAG_SYSTEM_PROMPT = (
    "You answer questions using only the numbered passages you are given. Cite the passages you use as [1], [2], "
    "and so on. If the passages do not contain the answer, say that you do not know."
)
PASSAGE_TOKENS = 300  # each passage is cut to this many tokens so several fit the context of a small model


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"


class Generator:
    def __init__(self, model, tokenizer, *, name: str = "model", max_context: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        ensure_chat_template(tokenizer)
        self.max_context = int(max_context or getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self._lock = threading.Lock()
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
        eos.add(im_end)
        self.stop_ids = sorted(i for i in eos if isinstance(i, int) and i >= 0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return prompt_ids(self.tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])

    def chat(self, messages: Sequence[dict[str, str]], *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, stop: Sequence[str] | None = None, seed: int | None = None) -> ChatResult:
        ids = self.prompt_ids(messages)
        if len(ids) + 1 > self.max_context:
            raise ModelError(f"the conversation has {len(ids)} tokens; {self.name} takes at most {self.max_context}")
        max_new_tokens = max(1, min(int(max_new_tokens), self.max_context - len(ids)))
        input_ids = torch.tensor([ids], device=self.device)
        kwargs = {"max_new_tokens": max_new_tokens, "eos_token_id": self.stop_ids,
                  "pad_token_id": self.tokenizer.pad_token_id or self.stop_ids[0], "do_sample": temperature > 0}
        if temperature > 0:
            kwargs.update(temperature=float(temperature), top_p=float(top_p))
        else:  # greedy: clear sampling defaults a generation_config may carry, to silence warnings
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with self._lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(int(seed))
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        new = out[0, len(ids):].tolist()
        finish = "length"
        if new and new[-1] in self.stop_ids:
            new, finish = new[:-1], "stop"
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        for s in stop or ():
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        return ChatResult(text.strip(), len(ids), int(out.shape[1]) - len(ids), finish)

    def rag_messages(self, question: str, passages: Sequence[str]) -> list[dict[str, str]]:
        """The prompt `answer` uses: passages numbered [1], [2], ... then the question."""
        cut = []
        for text in passages:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            cut.append(self.tokenizer.decode(ids[:PASSAGE_TOKENS]) if len(ids) > PASSAGE_TOKENS else text)
        numbered = "\n\n".join(f"[{i}] {' '.join(t.split())}" for i, t in enumerate(cut, 1))
        user = (f"Passages:\n{numbered}\n\nQuestion: {question}" if passages
                else f"Question: {question}\n(No passages were found.)")
        return [{"role": "system", "content": RAG_SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def answer(self, question: str, passages: list[str], max_new_tokens: int = 128) -> str:
        """Answer `question` from `passages` (greedy), citing them as [1], [2], ..."""
        return self.chat(self.rag_messages(question, passages), max_new_tokens=max_new_tokens).text


def load_generator(model_dir: str | Path, *, device: str = "cpu", dtype: str = "fp32",
                   name: str | None = None) -> Generator:
    """The generative side of a model folder (or `smollm2-135m`); ModelError when it has none."""
    model, tokenizer, path, _ = load_causal_lm(model_dir, dtype=dtype, device=device)
    return Generator(model, tokenizer, name=name or Path(str(model_dir)).name)


def _strip_eos_append(post_processor: dict | None, eos: str) -> dict | None:
    """Remove the EOS-appending template embedkit adds for last-token pooling (embedkit.models.tokenization.ensure_eos_appended)."""
    def appends_eos(node) -> bool:
        single = (node or {}).get("single") or []
        return (node or {}).get("type") == "TemplateProcessing" and bool(single) and \
            single[-1].get("SpecialToken", {}).get("id") == eos
    if post_processor is None:
        return None
    if post_processor.get("type") == "Sequence":
        kept = [p for p in post_processor.get("processors", []) if not appends_eos(p)]
        return None if not kept else kept[0] if len(kept) == 1 else {**post_processor, "processors": kept}
    return None if appends_eos(post_processor) else post_processor


def export_chat_folder(model_dir: str | Path, output: str | Path) -> Path:
    """A plain Hugging Face causal-LM folder for external chat engines (LMDeploy, vLLM, TGI).

    The embedkit folder's tokenizer appends EOS whenever special tokens are added (last-token pooling needs it);
    an engine that encodes chat prompts with special tokens would then end every prompt with end-of-turn. The
    export keeps the weights (hard-linked when possible) and writes the tokenizer without that template.
    """
    root, weights, _ = transformer_dir(model_dir)
    if not has_generative_head(root):
        raise ModelError("this folder has no generative head to export", path=root)
    with atomic_dir(output) as tmp:
        for item in sorted(weights.iterdir()):
            if item.is_file() and (item.suffix in (".safetensors", ".jinja") or item.name in (
                    "config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json",
                    "special_tokens_map.json")):
                try:
                    os.link(item, tmp / item.name)
                except OSError:
                    shutil.copy2(item, tmp / item.name)
        spec = json.loads((weights / "tokenizer.json").read_text(encoding="utf-8"))
        eos = json.loads((weights / "tokenizer_config.json").read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        spec["post_processor"] = _strip_eos_append(spec.get("post_processor"), eos)
        write_json(tmp / "tokenizer.json", spec, indent=None)
        if not any(tmp.glob("*.jinja")):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tmp)
            ensure_chat_template(tok)
            tok.save_pretrained(tmp)
    return Path(output)
