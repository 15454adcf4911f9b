"""The yes/no reranker's prompt (Qwen3-Reranker's formulation): one template, one tokenization, one truncation.

A causal LM judges a (query, document) pair by answering "yes" or "no" after this prompt:

    system     Judge whether the Document meets the requirements based on the Query and the Instruct provided.
               Note that the answer can only be "yes" or "no".
    user       <Instruct>: {instruction}
               <Query>: {query}
               <Document>: {document}
    assistant  <think>\\n\\n</think>\\n\\n        (the turn opened, with an empty think block)

rendered with the tokenizer's chat template when it has one, else in the ChatML text Qwen3-Reranker's own code
writes by hand (the fallback). `build_template` renders it once, with placeholders, into the three fixed pieces
around the query and the document (`RerankTemplate`: head, between, tail); every pair after that is
head + query + between + document + tail, tokenized as one string (`pair_token_ids`), in training, `embedkit eval
--rerank`, probe scores and the sentence-transformers folder alike. The pieces are saved with the model
(`rerank_template.json`), so a folder scores the same later whatever chat template its tokenizer then carries.

Truncation cuts the document's tokens (from its end) until the pair fits `max_length`; the template and the query
are kept, and only a query that alone overflows is cut too. The answer is read from the last position, so the
tail (the opened assistant turn) must survive: sentence-transformers cuts the same way for a causal CrossEncoder
(the rendered prompt cut at max_length, then its template suffix written back over the last tokens), which is
why the two give the same ids for a long pair.

No torch here: tokenization only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from embedkit.errors import ModelError

RERANK_TEMPLATE_NAME = "rerank_template.json"
RERANK_TEMPLATE_FORMAT = "embedkit-rerank-template/1"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
SYSTEM_PROMPT = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
                 'Note that the answer can only be "yes" or "no".')
USER_FORMAT = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
EMPTY_THINK = "<think>\n\n</think>\n\n"
# Qwen3-Reranker's hand-written prefix and suffix, for a tokenizer without a chat template.
FALLBACK_FORMAT = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
ANSWERS = ("yes", "no")  # the relevance logit is logit(yes) - logit(no) at the last position
# Stand-ins for the query and the document while the template is rendered; found again by `str.split`.
_QUERY_MARK = "\u0001EMBEDKIT-QUERY\u0001"
_DOCUMENT_MARK = "\u0001EMBEDKIT-DOCUMENT\u0001"


@dataclass(frozen=True)
class RerankTemplate:
    """The rendered prompt around a pair: head + query + between + document + tail."""

    instruction: str
    head: str
    between: str
    tail: str
    source: str  # "chat_template" (the tokenizer's) | "fallback" (Qwen3-Reranker's ChatML text)
    yes: str = ANSWERS[0]
    no: str = ANSWERS[1]

    def text(self, query: str, document: str) -> str:
        return f"{self.head}{query}{self.between}{document}{self.tail}"

    def with_instruction(self, instruction: str, *, path: Any = None) -> "RerankTemplate":
        """The same prompt with another instruction (the head ends with the user turn's instruction and query
        labels, whatever chat template rendered it)."""
        old = USER_FORMAT.split("{query}")[0].format(instruction=self.instruction)
        if not self.head.endswith(old):
            raise ModelError("the saved reranker template does not end its head with the instruction: cannot "
                             "change it", path=path)
        new = USER_FORMAT.split("{query}")[0].format(instruction=instruction)
        return replace(self, instruction=instruction, head=self.head[:-len(old)] + new)

    def to_dict(self) -> dict[str, Any]:
        return {"format": RERANK_TEMPLATE_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, *, path: Any = None) -> "RerankTemplate":
        fields = ("instruction", "head", "between", "tail", "source", "yes", "no")
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in fields):
            raise ModelError(f"not a reranker template (needs the strings {', '.join(fields)})", path=path)
        return cls(**{k: data[k] for k in fields})

    def chat_template(self) -> str:
        """A Jinja chat template that renders sentence-transformers' pair messages (roles "query" and "document",
        content a string or [{"type": "text", "text": ...}]) into exactly `text(query, document)`. The fixed
        pieces are JSON-quoted Jinja string literals: no block tags, so Hugging Face's trim_blocks / lstrip_blocks
        cannot touch their whitespace."""
        def literal(s: str) -> str:
            return "{{ " + json.dumps(s, ensure_ascii=False) + " }}"

        return ("{%- set pair = namespace(query='', document='') -%}"
                "{%- for message in messages -%}"
                "{%- set body = message['content'] if message['content'] is string "
                "else message['content'][0]['text'] -%}"
                "{%- if message['role'] == 'query' -%}{%- set pair.query = body -%}"
                "{%- elif message['role'] == 'document' -%}{%- set pair.document = body -%}{%- endif -%}"
                "{%- endfor -%}"
                f"{literal(self.head)}{{{{ pair.query }}}}{literal(self.between)}{{{{ pair.document }}}}"
                f"{literal(self.tail)}")


def build_template(tokenizer, instruction: str = DEFAULT_INSTRUCTION, *, path: Any = None) -> RerankTemplate:
    """Render the prompt once with stand-ins for the query and the document: the tokenizer's chat template (system
    and user turns, the assistant's opened with the generation prompt, then the empty think block unless the
    template wrote it), or the fallback text when it has none."""
    user = USER_FORMAT.format(instruction=instruction, query=_QUERY_MARK, document=_DOCUMENT_MARK)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a Jinja error of the model's own template: name it in one line
            raise ModelError(f"the tokenizer's chat template cannot render the reranker prompt "
                             f"({type(exc).__name__}: {exc})".splitlines()[0], path=path) from exc
        source = "chat_template"
    else:
        rendered = FALLBACK_FORMAT.format(system=SYSTEM_PROMPT, user=user)
        source = "fallback"
    if not rendered.endswith(EMPTY_THINK):
        rendered += EMPTY_THINK
    head, _, rest = rendered.partition(_QUERY_MARK)
    between, _, tail = rest.partition(_DOCUMENT_MARK)
    if rendered.count(_QUERY_MARK) != 1 or rendered.count(_DOCUMENT_MARK) != 1 or not rest or _DOCUMENT_MARK in head:
        raise ModelError("the tokenizer's chat template does not render the query and the document once each, "
                         "query first", path=path)
    return RerankTemplate(instruction=instruction, head=head, between=between, tail=tail, source=source)


def answer_token_ids(tokenizer, template: RerankTemplate, *, path: Any = None) -> tuple[int, int]:
    """The ids of the answer tokens ("yes", "no"), each of which must be one token of the vocabulary: their two
    logits at the last position are the whole score."""
    ids = []
    for word in (template.yes, template.no):
        pieces = tokenizer.encode(word, add_special_tokens=False)
        if len(pieces) != 1:
            raise ModelError(f"the yes/no reranker reads the logit of the answer {word!r}, which this tokenizer "
                             f"splits into {len(pieces)} tokens: use a causal LM whose vocabulary has "
                             f"{template.yes!r} and {template.no!r} as single tokens (Qwen3, SmolLM2, Llama)",
                             path=path)
        ids.append(int(pieces[0]))
    if ids[0] == ids[1]:
        raise ModelError(f"{template.yes!r} and {template.no!r} are the same token in this tokenizer", path=path)
    return ids[0], ids[1]


def template_length(tokenizer, template: RerankTemplate) -> int:
    """Tokens of the prompt with an empty query and document (about what every pair costs before its texts)."""
    return len(tokenizer(template.text("", ""), add_special_tokens=False)["input_ids"])


def _token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """[first, last) of the tokens that overlap the characters [start, end); (i, i) where there are none."""
    first = next((i for i, (s, e) in enumerate(offsets) if e > start), len(offsets))
    last = first
    while last < len(offsets) and offsets[last][0] < end and end > start:
        last += 1
    return first, last


def pair_token_ids(tokenizer, template: RerankTemplate, queries: Sequence[str], documents: Sequence[str], *,
                   max_length: int | None = None, path: Any = None) -> list[list[int]]:
    """Token ids of each pair's prompt, tokenized as one string (no special tokens added: the template holds
    them), cut to `max_length`: the document's last tokens first, then the query's; the template is kept whole.
    None (or 0): no truncation."""
    queries, documents = list(queries), list(documents)
    if len(queries) != len(documents):
        raise ValueError(f"{len(queries)} queries but {len(documents)} documents: pairs need one of each")
    if not queries:
        return []
    texts = [template.text(q, d) for q, d in zip(queries, documents)]
    try:
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=bool(max_length),
                            return_attention_mask=False, return_token_type_ids=False, verbose=False)
    except NotImplementedError as exc:  # a Python ("slow") tokenizer has no offsets
        raise ModelError("the yes/no reranker needs a fast (tokenizers) tokenizer to cut documents", path=path) from exc
    out = []
    for i, ids in enumerate(encoded["input_ids"]):
        excess = len(ids) - max_length if max_length else 0
        if excess <= 0:
            out.append(list(ids))
            continue
        offsets = encoded["offset_mapping"][i]
        query_start = len(template.head)
        query_end = query_start + len(queries[i])
        document_start = query_end + len(template.between)
        spans = [_token_span(offsets, document_start, document_start + len(documents[i])),
                 _token_span(offsets, query_start, query_end)]
        ids = list(ids)
        for first, last in spans:  # the document's span lies after the query's: cutting it moves nothing before
            cut = min(excess, last - first)
            del ids[last - cut:last]
            excess -= cut
        if excess > 0:
            raise ModelError(f"max_length {max_length} is shorter than the reranker's prompt without its query and "
                             f"document ({len(ids)} tokens): raise model.max_length", path=path)
        out.append(ids)
    return out


def write_template(template: RerankTemplate, folder: str | Path) -> Path:
    path = Path(folder) / RERANK_TEMPLATE_NAME
    path.write_text(json.dumps(template.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_template(folder: str | Path) -> RerankTemplate | None:
    """The template saved in a yes/no reranker folder; None where the folder has none."""
    path = Path(folder) / RERANK_TEMPLATE_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"unreadable reranker template: {exc}".splitlines()[0], path=path) from exc
    return RerankTemplate.from_dict(data, path=path)
