"""Question/answer data for the generative head: SFT examples in the chat template, and preference pairs.

- `read_qa`: a .jsonl of {query, positive, focus} rows (MedQuAD's train_pairs.jsonl) or a BEIR folder (the query
  and its relevant document; the document's title is its topic).
- `encode_sft`: one chat example as token ids plus labels that are -100 on the prompt, so the loss is computed on
  the answer tokens only. Prompt and answer are tokenized separately and concatenated: the prompt ids are exactly
  the ids the model sees at generation time (tokenizing the joined text could merge tokens across the boundary).
- `preference_pairs`: chosen = the question's own answer; rejected = the answer of another question on the same
  topic (a hard negative: same disease, wrong question), never the question's own answer text.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from embedkit.atomic import write_text
from embedkit.errors import DataError
from embedkit.manifest import sha256_file
from embedkit.train.config import parse_train_source

IGNORE_INDEX = -100  # label value the loss skips (PyTorch's cross_entropy default)

# ChatML, for tokenizers that come without a chat template (the tiny test models); SmolLM2 and Qwen ship their own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class QAExample:
    question: str
    answer: str
    topic: str | None = None


@dataclass(frozen=True)
class PreferencePair:
    question: str
    chosen: str
    rejected: str
    topic: str | None = None


# ---------------------------------------------------------------------------------------------------- reading
def read_qa(spec: str, *, question: str = "query", answer: str = "positive", topic: str | None = "focus",
            max_examples: int | None = None, sample: str = "first", seed: int = 42
            ) -> tuple[list[QAExample], dict[str, Any]]:
    """QA examples from a .jsonl file or `beir:DIR[:SPLIT]`, optionally subsampled; plus their provenance."""
    kind, path, split = parse_train_source(spec)
    if kind == "beir":
        from embedkit.data.beir import load_beir

        ds = load_beir(path, split or "test")
        examples = []
        for qid in ds.judged_query_ids():
            relevant = [d for d, score in ds.qrels[qid].items() if score > 0]
            if relevant:
                doc = ds.corpus[relevant[0]]
                examples.append(QAExample(ds.queries[qid], doc["text"], doc.get("title") or None))
        source: dict[str, Any] = {"spec": spec, "path": str(path), "split": split, "data_hash": ds.data_hash()}
    else:
        examples = list(_read_jsonl(path, question, answer, topic))
        source = {"spec": spec, "path": str(path), "sha256": sha256_file(path)}
    source["available"] = len(examples)
    examples = subsample(examples, max_examples, sample, seed)
    source.update(sample=sample, max_examples=max_examples, used=len(examples))
    if not examples:
        raise DataError("no question/answer examples", path=path)
    return examples, source


def _read_jsonl(path: Path, question: str, answer: str, topic: str | None):
    from embedkit.data.lines import iter_jsonl, require_file

    require_file(path, "file")
    for number, row in iter_jsonl(path):
        for field in (question, answer):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise DataError("missing, empty or not a string", path=path, line=number, field=field)
        value = row.get(topic) if topic else None
        if value is not None and not isinstance(value, str):
            raise DataError("must be a string", path=path, line=number, field=topic)
        yield QAExample(row[question], row[answer], value or None)


def subsample(items: list, n: int | None, sample: str, seed: int) -> list:
    if not n or len(items) <= n:
        return list(items)
    if sample == "random":
        chosen = sorted(random.Random(seed).sample(range(len(items)), n))
        return [items[i] for i in chosen]
    return list(items[:n])


# ---------------------------------------------------------------------------------------------------- pairs
def preference_pairs(examples: Sequence[QAExample], *, seed: int = 42) -> tuple[list[PreferencePair], int]:
    """One pair per example whose topic has another, different answer; returns (pairs, examples skipped)."""
    by_topic: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        if ex.topic:
            by_topic[ex.topic].append(i)
    rng = random.Random(seed)
    pairs, skipped = [], 0
    for i, ex in enumerate(examples):
        # Another question's answer, and not a copy of this answer (MedQuAD repeats some answers verbatim).
        candidates = [j for j in by_topic.get(ex.topic, []) if j != i and examples[j].answer.strip() != ex.answer.strip()]
        if not ex.topic or not candidates:
            skipped += 1
            continue
        pairs.append(PreferencePair(ex.question, ex.answer, examples[rng.choice(candidates)].answer, ex.topic))
    return pairs, skipped


def write_pairs(pairs: Sequence[PreferencePair], path: str | Path) -> Path:
    lines = [json.dumps({"prompt": p.question, "chosen": p.chosen, "rejected": p.rejected, "topic": p.topic},
                        ensure_ascii=False) for p in pairs]
    return write_text(path, "\n".join(lines) + ("\n" if lines else ""))


# ---------------------------------------------------------------------------------------------------- chat
def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def chat_messages(question: str, *, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": question}]


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation ending with the assistant's turn opened (what generation continues)."""
    ensure_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # add_special_tokens=False: the template already has its special tokens, and an embedkit-saved tokenizer
    # appends EOS to everything it encodes with them (last-token pooling).
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_suffix(tokenizer, messages: list[dict[str, str]], answer: str) -> str:
    """The text the template puts after the generation prompt for `answer`: the answer and its end-of-turn."""
    ensure_chat_template(tokenizer)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise DataError("the chat template renders the assistant turn in a way that does not extend the prompt")
    suffix = full[len(prompt):]
    eos = tokenizer.eos_token
    # Train up to the end-of-turn token, not the newline the template adds after it.
    if eos and eos in suffix:
        suffix = suffix[: suffix.rindex(eos) + len(eos)]
    return suffix


def encode_sft(tokenizer, question: str, answer: str, *, max_length: int, system: str | None = None
               ) -> dict[str, list[int]] | None:
    """input_ids and labels (-100 on every prompt token) for one example; None when the prompt alone is too long.

    A long answer is cut to fit `max_length` (its first part is still a valid target).
    """
    messages = chat_messages(question, system=system)
    prompt = prompt_ids(tokenizer, messages)
    if len(prompt) >= max_length - 1:
        return None
    target = tokenizer(answer_suffix(tokenizer, messages, answer), add_special_tokens=False)["input_ids"]
    target = target[: max_length - len(prompt)]
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + list(target)}


def encode_sft_many(tokenizer, examples: Sequence[QAExample], *, max_length: int, system: str | None = None
                    ) -> tuple[list[dict[str, list[int]]], int]:
    """Encoded examples (in order) and how many were dropped because their prompt did not fit."""
    out, dropped = [], 0
    for ex in examples:
        feature = encode_sft(tokenizer, ex.question, ex.answer, max_length=max_length, system=system)
        if feature is None:
            dropped += 1
        else:
            out.append(feature)
    return out, dropped


def encode_pairs(tokenizer, pairs: Sequence[PreferencePair], *, max_length: int, system: str | None = None
                 ) -> tuple[list[tuple[dict, dict]], int]:
    """(chosen, rejected) features per pair, both with the same prompt; dropped count."""
    out, dropped = [], 0
    for p in pairs:
        chosen = encode_sft(tokenizer, p.question, p.chosen, max_length=max_length, system=system)
        rejected = encode_sft(tokenizer, p.question, p.rejected, max_length=max_length, system=system)
        if chosen is None or rejected is None:
            dropped += 1
        else:
            out.append((chosen, rejected))
    return out, dropped
