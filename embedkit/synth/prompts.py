"""The prompts of the generator styles, and custom prompt files.

A prompt is the user turn of a one-turn chat; the generator's chat template wraps it. `{document}` is the document
(title and text as `embedkit eval` encodes them, cut to `max_document_words` words so a small model's context
holds it); `{title}` is its title alone. A prompt file is a Jinja2 template when it holds `{{`, else a
`str.format` template.

The wording asks for the query alone, on one line, because a small model's extra words ("Sure! Here is ...") end up
in the training data otherwise; `clean_query` removes what slips through.
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from embedkit.data.lines import require_file
from embedkit.errors import ConfigError

NAMED_PROMPTS = {
    # Promptagator / InPars style: a question the passage answers (the common case of search and RAG).
    "question": (
        "Write one short search question that the following passage answers. Reply with the question only, on one "
        "line.\n\nPassage: {document}"
    ),
    # What users type into a search box: a few words, no question form.
    "keyword": (
        "Write a short keyword search query (2 to 6 words) that someone would type to find the following passage. "
        "Reply with the query only, on one line.\n\nPassage: {document}"
    ),
    # Fact-checking retrieval (SciFact, FEVER): the query is a claim the passage supports.
    "claim": (
        "Write one short factual claim, a single sentence, that the following passage supports. Reply with the "
        "claim only, on one line.\n\nPassage: {document}"
    ),
}
CUSTOM = "custom"  # the style name a --prompt-file run records
MAX_DOCUMENT_WORDS = 300  # SmolLM2's 8k context holds far more, but a longer prompt costs time on a CPU

_PREFIX = re.compile(r"^(?:(?:search\s+)?(?:question|query|claim|keywords?|answer)\s*[:\-]\s*)+", re.IGNORECASE)
_QUOTES = "\"'`“”‘’«»"


@dataclass(frozen=True)
class Prompt:
    name: str  # a NAMED_PROMPTS key, or "custom"
    template: str
    jinja: bool = False
    path: str | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.template.encode("utf-8")).hexdigest()

    def render(self, document: str, title: str = "", *, max_document_words: int = MAX_DOCUMENT_WORDS) -> str:
        words = document.split()
        if len(words) > max_document_words:
            document = " ".join(words[:max_document_words])
        if self.jinja:
            return _jinja_template(self.template).render(document=document, title=title)
        return self.template.format(document=document, title=title)

    def describe(self) -> dict:
        return {"name": self.name, "template": self.template, "sha256": self.sha256, "path": self.path,
                "syntax": "jinja2" if self.jinja else "str.format"}


def named_prompt(style: str) -> Prompt:
    if style not in NAMED_PROMPTS:
        raise ConfigError(f"no prompt named {style!r} (choose from: {', '.join(NAMED_PROMPTS)})", field="style")
    return Prompt(style, NAMED_PROMPTS[style])


def load_prompt_file(path: str | Path) -> Prompt:
    """A custom prompt; checked now (syntax, a {document} field), so a typo fails before any model loads."""
    path = Path(path)
    require_file(path, "prompt file")
    template = path.read_text(encoding="utf-8")
    jinja = "{{" in template
    if jinja:
        try:
            source = _jinja_template(template)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"not a valid Jinja2 template ({exc.message})", path=path, line=exc.lineno) from None
        fields = meta.find_undeclared_variables(source.environment.parse(template))
    else:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as exc:
            raise ConfigError(f"not a valid str.format template ({exc}); write literal braces as {{{{ }}}}",
                              path=path) from None
    unknown = sorted(f for f in fields if f not in ("document", "title"))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}: a prompt may use {{document}} and {{title}}",
                          path=path)
    if "document" not in fields:
        raise ConfigError("the prompt never inserts the document: write {document} (or {{ document }}) where it "
                          "goes", path=path)
    return Prompt(CUSTOM, template, jinja=jinja, path=str(path))


def _jinja_template(template: str):
    # Sandboxed: a prompt file is data, and must not reach Python objects.
    return SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(template)


def clean_query(text: str) -> str:
    """The query in a generator's reply: its first non-blank line, without a "Question:" label or quotes."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line).strip()
    if len(line) >= 2 and line[0] in _QUOTES and line[-1] in _QUOTES:
        line = line[1:-1].strip()
    return " ".join(line.split())
