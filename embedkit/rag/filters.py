"""Metadata filters (`rag query --filter 'source == "manual"'`): one parser, the same syntax on every vector store.

The syntax is the part of Milvus's boolean expressions that a document's metadata needs:

    source == "manual"                      comparisons: == != < <= > >= against a string, number, true or false
    year >= 2020 and source != "web"        and / or / not (also && || !), parentheses
    lang in ["en", "de"]                    in / not in a list of literals

A filter is parsed here, by a small recursive-descent parser (never `eval`), into a tree that
- the FAISS store evaluates over the documents' metadata in the SQLite document store (`Filter.matches`), and
- the Milvus store renders as Milvus's own expression over its `metadata` JSON field (`Filter.to_milvus`),
so a bad filter is the same one-line ConfigError (field `--filter`) whichever store the index uses.

Semantics are Milvus's (measured on Milvus Lite 3.2): a field a document lacks makes its comparison *unknown*,
and `not`/`and`/`or` follow three-valued (Kleene) logic, so `not (x == 1)` does not match documents without `x`;
values of different types are unequal (`year == "2020"` never matches a number) and do not order; a document
matches when the whole filter is true.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Union

from embedkit.errors import ConfigError

FIELD = "filter"
_TOKEN = re.compile(r"""\s*(?:
    (?P<number>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<op>==|!=|<=|>=|<|>|&&|\|\||!|\(|\)|\[|\]|,)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
)""", re.VERBOSE)
_KEYWORDS = {"and", "or", "not", "in", "true", "false", "AND", "OR", "NOT", "IN", "True", "False"}
_COMPARE = ("==", "!=", "<", "<=", ">", ">=")

Literal = Union[str, int, float, bool]


@dataclass(frozen=True)
class Compare:
    field: str
    op: str  # one of _COMPARE, "in" or "not in"
    value: Any  # a literal, or a tuple of literals for in / not in


@dataclass(frozen=True)
class Not:
    arg: "Node"


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" / "or"
    args: tuple["Node", ...]


Node = Union[Compare, Not, BoolOp]


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "other"


def _compare(left: Any, op: str, right: Literal) -> bool | None:
    if left is None:
        return None  # a missing field: unknown
    if _kind(left) != _kind(right):
        return op == "!="  # values of different types are unequal and do not order
    if op == "==":
        return left == right
    if op == "!=":
        return left != right
    if _kind(left) == "bool":
        return False
    return {"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right}[op]


def _evaluate(node: Node, metadata: Mapping[str, Any]) -> bool | None:
    if isinstance(node, Compare):
        left = metadata.get(node.field)
        if node.op in ("in", "not in"):
            results = [_compare(left, "==", v) for v in node.value]
            found = True if True in results else None if None in results else False
            return found if node.op == "in" or found is None else not found
        return _compare(left, node.op, node.value)
    if isinstance(node, Not):
        value = _evaluate(node.arg, metadata)
        return None if value is None else not value
    values = [_evaluate(a, metadata) for a in node.args]
    if node.op == "and":
        return False if False in values else None if None in values else True
    return True if True in values else None if None in values else False


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def _unquote(token: str) -> str:
    """The text of a quoted string token: backslash escapes \\n \\t \\r, any other escaped character as itself."""
    out, chars = [], iter(token[1:-1])
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            out.append(_ESCAPES.get(nxt, nxt))
        else:
            out.append(ch)
    return "".join(out)


def _milvus_literal(value: Literal) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)


def _to_milvus(node: Node, column: str) -> str:
    if isinstance(node, Compare):
        ref = f"{column}[{json.dumps(node.field)}]"
        if node.op in ("in", "not in"):  # Milvus Lite takes `in` on plain fields only: an or-chain of ==
            chain = " or ".join(f"{ref} == {_milvus_literal(v)}" for v in node.value) or "false"
            return f"({chain})" if node.op == "in" else f"(not ({chain}))"
        return f"{ref} {node.op} {_milvus_literal(node.value)}"
    if isinstance(node, Not):
        return f"(not ({_to_milvus(node.arg, column)}))"
    return "(" + f" {node.op} ".join(_to_milvus(a, column) for a in node.args) + ")"


@dataclass(frozen=True)
class Filter:
    """A parsed metadata filter (`parse_filter`)."""

    text: str
    root: Node

    def matches(self, metadata: Mapping[str, Any] | None) -> bool:
        """Whether a document with this metadata passes (unknown counts as no)."""
        return _evaluate(self.root, metadata or {}) is True

    def to_milvus(self, column: str = "metadata") -> str:
        """The same filter as a Milvus boolean expression over the JSON field `column`."""
        return _to_milvus(self.root, column)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            if not text[pos:].strip():
                break
            match = _TOKEN.match(text, pos)
            if match is None or match.end() == pos:
                column = pos + len(text[pos:]) - len(text[pos:].lstrip())
                self.fail(f"unexpected character {text[column]!r} at column {column + 1}")
            kind = match.lastgroup
            self.tokens.append((kind, match.group(kind), match.start(kind)))
            pos = match.end()
        self.i = 0

    def fail(self, message: str):
        raise ConfigError(f"bad filter {self.text!r}: {message} (syntax: field == \"value\", != < <= > >=, "
                          "in [...], and / or / not, parentheses)", field=FIELD)

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def where(self) -> str:
        token = self.peek()
        return f"at column {token[2] + 1} ({token[1]!r})" if token else "at the end"

    def accept(self, *values: str) -> str | None:
        token = self.peek()
        if token and token[0] in ("op", "name") and token[1] in values:
            self.i += 1
            return token[1]
        return None

    def expect(self, value: str) -> None:
        if self.accept(value) is None:
            self.fail(f"expected {value!r} {self.where()}")

    def parse(self) -> Node:
        if not self.tokens:
            self.fail("the filter is empty")
        node = self.or_()
        if self.peek() is not None:
            self.fail(f"unexpected {self.where()}")
        return node

    def or_(self) -> Node:
        args = [self.and_()]
        while self.accept("or", "OR", "||"):
            args.append(self.and_())
        return args[0] if len(args) == 1 else BoolOp("or", tuple(args))

    def and_(self) -> Node:
        args = [self.not_()]
        while self.accept("and", "AND", "&&"):
            args.append(self.not_())
        return args[0] if len(args) == 1 else BoolOp("and", tuple(args))

    def not_(self) -> Node:
        if self.accept("not", "NOT", "!"):
            return Not(self.not_())
        if self.accept("("):
            node = self.or_()
            self.expect(")")
            return node
        return self.comparison()

    def literal(self) -> Literal:
        token = self.peek()
        if token is None:
            self.fail("expected a value at the end")
        kind, value, _ = token
        if kind == "number":
            self.i += 1
            return float(value) if any(c in value for c in ".eE") else int(value)
        if kind == "string":
            self.i += 1
            return _unquote(value)
        if kind == "name" and value in ("true", "True", "false", "False"):
            self.i += 1
            return value.lower() == "true"
        self.fail(f"expected a value (a \"string\", a number, true or false) {self.where()}")

    def comparison(self) -> Node:
        token = self.peek()
        if token is None or token[0] != "name" or token[1] in _KEYWORDS:
            self.fail(f"expected a metadata field name {self.where()}")
        field = token[1]
        self.i += 1
        op = self.accept(*_COMPARE)
        if op is not None:
            return Compare(field, op, self.literal())
        negated = self.accept("not", "NOT") is not None
        if self.accept("in", "IN") is None:
            self.fail(f"expected a comparison (== != < <= > >= in) after {field!r} {self.where()}")
        self.expect("[")
        values: list[Literal] = []
        if self.accept("]") is None:
            values.append(self.literal())
            while self.accept(","):
                values.append(self.literal())
            self.expect("]")
        return Compare(field, "not in" if negated else "in", tuple(values))


def parse_filter(text: "str | Filter | None") -> Filter | None:
    """The parsed filter, or None for no filter (None or blank text). A bad one is a ConfigError (field filter)."""
    if text is None or isinstance(text, Filter):
        return text
    if not isinstance(text, str):
        raise ConfigError(f"a filter is a string, not {type(text).__name__}", field=FIELD)
    if not text.strip():
        return None
    return Filter(text, _Parser(text).parse())
