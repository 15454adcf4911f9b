"""Synth stage: (query, positive) pairs, or a synthetic eval set, from documents alone (`embedkit synth`).

    from embedkit.synth import SynthSettings, synthesize
    synthesize("docs/", "runs/synth-ict", SynthSettings(style="ict", queries_per_doc=2))
    synthesize("corpus.jsonl", "runs/synth-q", SynthSettings(prompt=named_prompt("question")), GeneratorSpec())

Modules: prompts (the named prompts), styles (generator-free: title, ict, crop), generators (transformers,
OpenAI-compatible endpoint, vLLM), store (the append-only, resumable log), filters, run (the whole run), cli.
Names are imported lazily so that importing the package stays cheap.
"""

from __future__ import annotations

from embedkit._lazy import lazy_exports

_EXPORTS = {
    "SynthSettings": "embedkit.synth.run",
    "synthesize": "embedkit.synth.run",
    "FilterSettings": "embedkit.synth.filters",
    "GenerationSettings": "embedkit.synth.generators.base",
    "GeneratorSpec": "embedkit.synth.generators",
    "NAMED_PROMPTS": "embedkit.synth.prompts",
    "named_prompt": "embedkit.synth.prompts",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
