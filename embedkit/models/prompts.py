"""Instruction prompts prepended to queries and documents (e5 / bge / Qwen3-Embedding styles)."""

from __future__ import annotations

KINDS = ("query", "document")

PROMPT_PRESETS: dict[str, dict[str, str]] = {
    "none": {},
    "e5": {"query": "query: ", "document": "passage: "},
    "bge": {"query": "Represent this sentence for searching relevant passages: "},
    # Qwen3-Embedding / GritLM style: an instruction for queries only, documents as they are.
    "instruct": {"query": "Instruct: Given a question, retrieve passages that answer the question\nQuery: "},
}


def resolve_prompts(prompts: dict[str, str] | str | None) -> dict[str, str]:
    if prompts is None:
        return {}
    if isinstance(prompts, str):
        if prompts not in PROMPT_PRESETS:
            raise ValueError(f"unknown prompt preset {prompts!r}; choose one of {', '.join(PROMPT_PRESETS)}")
        return dict(PROMPT_PRESETS[prompts])
    unknown = set(prompts) - set(KINDS) - {"passage"}
    if unknown:
        raise ValueError(f"prompts may be given for {KINDS}, not {sorted(unknown)}")
    out = dict(prompts)
    if "passage" in out:  # sentence-transformers models often call documents "passage"
        out.setdefault("document", out.pop("passage"))
    return out


def apply_prompt(texts: list[str], prompts: dict[str, str], kind: str) -> list[str]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    prefix = prompts.get(kind, "")
    return [prefix + t for t in texts] if prefix else list(texts)
