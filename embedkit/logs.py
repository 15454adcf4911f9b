"""Logging for the whole package, set up in one place, so that stdout carries a command's result and nothing else.

Every module logs through `logging.getLogger(__name__)`, under the "embedkit" logger. The `embedkit` command
configures that logger once, before any sub-command runs (`configure_logging`, from its -v / -q / --log-json
options): lines go to stderr as `embedkit train: message`, or one JSON object per line for a machine to read. A
library user who never configures it sees warnings only, as with any library.

Progress goes through `progress()`, the one progress bar of the package. A bar is for a person at a terminal; in a
CI log or a redirected file a bar is a wall of carriage returns, and no bar at all leaves a two-hour run silent. So
off a terminal it logs a line now and then (done/total, rate, ETA) instead, and with -q it says nothing.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator

from embedkit.errors import ConfigError

ROOT_LOGGER = "embedkit"
LEVEL_ENV = "EMBEDKIT_LOG_LEVEL"  # DEBUG, INFO, WARNING, ERROR: the level when -v / -q are not given
JSON_ENV = "EMBEDKIT_LOG_JSON"  # 1: JSON lines, as --log-json
PROGRESS_INTERVAL_S = 30.0  # off a terminal, at most one progress line this often
HF_BARS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"

_configured: dict[str, Any] = {}  # what configure_logging was asked for: "level", "json"
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a line is written: a test runner, or a command that
    redirects stdout to stderr, swaps it after the handler was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class JsonLines(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the rank under several
    processes, the record's extra fields (`log.info(..., extra={"progress": {...}})`), and a traceback if any."""

    def __init__(self, rank: int | None = None) -> None:
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if self.rank is not None:
            line["rank"] = self.rank
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def parse_level(value: int | str) -> int:
    """A level from a number or a name (DEBUG, info, ...); a one-line ConfigError otherwise."""
    if isinstance(value, int):
        return value
    text = str(value).strip()
    level = int(text) if text.isdigit() else logging.getLevelName(text.upper())
    if not isinstance(level, int):
        raise ConfigError(f"unknown log level {value!r}: use DEBUG, INFO, WARNING or ERROR", field=LEVEL_ENV)
    return level


def configure_logging(prefix: str = "embedkit", *, rank: int | None = None, level: int | str | None = None,
                      json_lines: bool | None = None) -> None:
    """Send the package's log records to stderr: `PREFIX: message` lines (`PREFIX [rank R]: message` under several
    processes), or JSON lines. Processes other than rank 0 log warnings and errors only. Replaces any earlier
    configuration (the last call wins).

    rank: default $RANK (set by torchrun). level: default $EMBEDKIT_LOG_LEVEL, else INFO. json_lines: default
    $EMBEDKIT_LOG_JSON.
    """
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    level = parse_level(level if level is not None else os.environ.get(LEVEL_ENV) or logging.INFO)
    if json_lines is None:
        json_lines = os.environ.get(JSON_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    handler = _Stderr()
    if json_lines:
        handler.setFormatter(JsonLines(rank if world > 1 else None))
    else:
        tag = f"{prefix} [rank {rank}]" if world > 1 else prefix
        handler.setFormatter(logging.Formatter(tag.replace("%", "%%") + ": %(message)s"))
    root = logging.getLogger(ROOT_LOGGER)
    root.handlers = [handler]
    root.setLevel(level if rank == 0 or world == 1 else max(level, logging.WARNING))
    root.propagate = False  # the command owns the process: a handler a library put on the root would say it twice
    _configured.update(level=level, json=bool(json_lines))
    if not (level <= logging.INFO and (rank == 0 or world == 1) and not json_lines and _stderr_is_terminal()):
        _library_bars_off()


def _library_bars_off() -> None:
    """transformers and huggingface_hub draw tqdm bars of their own ("Loading weights", downloads): off as well
    wherever ours are, since a bar in a log is noise and -q means quiet."""
    os.environ.setdefault(HF_BARS_ENV, "1")  # read when huggingface_hub is first imported
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def quieten() -> None:
    """A command's own --quiet: warnings and errors only from here on, as `embedkit -q`."""
    root = logging.getLogger(ROOT_LOGGER)
    if root.getEffectiveLevel() < logging.WARNING:
        root.setLevel(logging.WARNING)


def json_lines_on() -> bool:
    """Whether configure_logging chose JSON lines (then even an error line should be one)."""
    return bool(_configured.get("json"))


def child_environment() -> dict[str, str]:
    """The configured level and format as environment variables, for the processes this one starts (`--nproc`
    re-runs the command without the top-level options); empty when logging was not configured."""
    if not _configured:
        return {}
    return {LEVEL_ENV: logging.getLevelName(_configured["level"]), JSON_ENV: "1" if _configured["json"] else "0"}


# ---------------------------------------------------------------------------------------------------------- progress
def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, enabled: bool = True, logger: logging.Logger | None = None,
             interval: float = PROGRESS_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> "Progress":
    """Progress of a long loop: iterate over it (`for x in progress(xs, desc=...)`) or call `update(n)`.

    - a tqdm bar on stderr when it is a terminal and the lines are text;
    - off a terminal (or with JSON lines), a log line through `logger` at most every `interval` seconds: done/total,
      rate, ETA and the postfix (`set_postfix`), and a last one at the end if any was written;
    - nothing when `enabled` is False or `logger` (default "embedkit") is above INFO: `embedkit -q`, and the
      processes other than rank 0.
    """
    logger = logger or logging.getLogger(ROOT_LOGGER)
    if not enabled or not logger.isEnabledFor(logging.INFO):
        mode = "off"
    elif _stderr_is_terminal() and not json_lines_on():
        mode = "bar"
    else:
        mode = "lines"
    return Progress(iterable, total=total, desc=desc, unit=unit, initial=initial, mode=mode, logger=logger,
                    interval=interval, clock=clock)


def _stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


class Progress:
    """What `progress()` returns; `mode` is "bar", "lines" or "off"."""

    def __init__(self, iterable: Iterable | None, *, total: int | None, desc: str, unit: str, initial: int,
                 mode: str, logger: logging.Logger, interval: float, clock: Callable[[], float]) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit, self.mode = iterable, total, desc, unit, mode
        self.n = self._start_n = initial
        self._logger, self._interval, self._clock = logger, interval, clock
        self._started = self._last_line = clock()
        self._lines = 0
        self._postfix: dict[str, Any] = {}
        self._closed = False
        self._bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("progress() was given no iterable: call update(n) instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines" and self._clock() - self._last_line >= self._interval:
            self._log_line(done=False)

    def set_postfix(self, **fields: Any) -> None:
        """Figures shown after the count (`loss=0.41`): in the bar, or in the next line."""
        self._postfix = fields
        if self._bar is not None:
            self._bar.set_postfix(fields)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self._lines:  # a short loop stays silent; a logged one says it ended
            self._log_line(done=True)

    def _log_line(self, *, done: bool) -> None:
        now = self._clock()
        self._last_line = now
        self._lines += 1
        elapsed = max(now - self._started, 1e-9)
        rate = (self.n - self._start_n) / elapsed
        count = f"{self.n:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"
        if self.total:
            count += f" ({self.n / self.total:.0%})"
        parts = [count, f"{rate:,.1f} {self.unit}/s"]
        eta = None
        if done:
            parts.append(f"done in {_duration(now - self._started)}")
        elif self.total and rate > 0:
            eta = max(self.total - self.n, 0) / rate
            parts.append(f"ETA {_duration(eta)}")
        parts += [f"{key}={value}" for key, value in self._postfix.items()]
        fields = {"desc": self.desc, "done": self.n, "total": self.total, "unit": self.unit,
                  "rate_per_s": round(rate, 3), "elapsed_s": round(now - self._started, 1),
                  "eta_s": None if eta is None else round(eta, 1), "finished": done, **self._postfix}
        self._logger.info("%s%s", f"{self.desc}: " if self.desc else "", ", ".join(parts),
                          extra={"progress": fields})


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
