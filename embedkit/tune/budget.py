"""`--budget`: a time ("30m", "2h", "90s", "1.5h") or a number of trials ("20")."""

from __future__ import annotations

import re
from dataclasses import dataclass

from embedkit.errors import ConfigError

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}
_TIME = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)\s*(s|sec|m|min|h|hr)$")
BUDGET_HELP = "a time such as 30m, 2h or 90s, or a number of trials such as 20"


@dataclass(frozen=True)
class Budget:
    """What bounds the search: `trials` (a count) or `seconds` (wall clock); exactly one is set."""

    trials: int | None = None
    seconds: float | None = None
    text: str = ""

    def describe(self) -> str:
        if self.trials is not None:
            return f"{self.trials} trial{'s' if self.trials != 1 else ''}"
        minutes = self.seconds / 60
        return f"{self.seconds:g} s" if self.seconds < 120 else (
            f"{minutes:g} min" if minutes < 120 else f"{minutes / 60:g} h")

    def to_dict(self) -> dict:
        return {"text": self.text, "trials": self.trials, "seconds": self.seconds}


def parse_budget(text: str) -> Budget:
    """'30m' -> 1800 s; '2h'; '90s'; '20' -> 20 trials. Anything else is a one-line ConfigError."""
    raw = str(text)
    value = raw.strip().lower()
    if value.isdigit():
        trials = int(value)
        if trials < 1:
            raise ConfigError(f"a trial budget must be at least 1, got {raw!r}", field="--budget")
        return Budget(trials=trials, text=raw)
    match = _TIME.match(value)
    if match is None:
        raise ConfigError(f"expected {BUDGET_HELP}; got {raw!r}", field="--budget")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ConfigError(f"a time budget must be above zero, got {raw!r}", field="--budget")
    return Budget(seconds=seconds, text=raw)


def duration(seconds: float) -> str:
    """A length of time as the progress lines and reports show it: "45 s", "3.5 min", "1.25 h"."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
