"""One error type for everything the user can get wrong, rendered as one line.

The CLI catches `EmbedkitError`, prints `error: <where>: <message>` and exits with `exit_code`;
nothing else is printed (no traceback) because the message already says what to fix.
"""

from __future__ import annotations

from pathlib import Path


class EmbedkitError(Exception):
    """A user-facing error: bad input, bad config, missing file. Names file, line and field when known."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
        exit_code: int | None = None,
    ) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        if exit_code is not None:
            self.exit_code = exit_code
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = ""
        if self.path:
            where = self.path + (f":{self.line}" if self.line is not None else "")
        if self.field:
            where = f"{where}: field '{self.field}'" if where else f"field '{self.field}'"
        text = " ".join(self.message.split())  # always one line
        return f"{where}: {text}" if where else text


class DataError(EmbedkitError):
    """A data file is malformed (bad JSON, missing column, unknown id, ...)."""


class ConfigError(EmbedkitError):
    """A recipe / option is invalid."""


class ModelError(EmbedkitError):
    """A model cannot be found, loaded or verified."""
