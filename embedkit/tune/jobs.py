"""The work `embedkit tune` hands to a child process: a trial's training (one fold of it), the base model's ranking
of the dev corpus, the mining probe, the final model and the test comparison.

Why a process per job: a tune run trains many models in a row, and in one process the allocator keeps what every
trial, the final model and the default model touched (a 40-minute search on 2 cores peaked at 8.7 GB, three times
one training run). A child gives all of it back when it exits, so the tune process's peak is one job's plus its own,
which holds the search and never a model. A job that dies (killed for memory, a crash in a native library) fails
its trial, not the search.

The protocol, JSON lines: the job is a file the child reads (`python -m embedkit.tune.jobs JOB_FILE EVENT_FD`); the
child writes events on a pipe of its own, so stdout stays free for what libraries print: `{"event": "step"}` now
and then while it trains, `{"event": "eval"}` after each dev evaluation, for which it waits for `{"prune": bool}`
on its stdin, and finally `{"event": "result"}`, `{"event": "pruned"}` or `{"event": "error"}`. `isolate=False`
runs the same job functions in this process (tests that stand a fake training in use it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from embedkit.errors import EmbedkitError
from embedkit.logs import child_environment, configure_logging
from embedkit.train import train  # the bi-encoder, or a task: rerank recipe's reranker
from embedkit.train.config import load_recipe, parse_recipe
from embedkit.tune.compare import compare_on_test
from embedkit.tune.prepare import base_model_ranker, mining_probe

log = logging.getLogger("embedkit.tune")

STEP_EVENT_SECONDS = 1.0  # a training step reports at most this often (GPU steps take milliseconds)
POLL_SECONDS = 5.0  # how often the parent wakes while a child is quiet (its heartbeat needs the clock)

Emit = Callable[[dict], dict]  # an event out; the reply in (only "eval" events get one)
OnEvent = Callable[[dict], Any]  # the parent's handler: the prune decision (bool) for "eval" events


class JobPruned(Exception):
    """The parent's pruner stopped the trial at `step`."""

    def __init__(self, step: int) -> None:
        super().__init__(f"pruned at step {step}")
        self.step = step


class JobFailed(EmbedkitError):
    """A job's process failed: `kind` is the exception's class name in the child ("OutOfMemoryError", ...) or
    "exit" when the process ended without a result (killed: its exit code in the message)."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message, exit_code=1)
        self.kind = kind


# ---------------------------------------------------------------------------------------------------- the jobs
def _recipe(payload: dict):
    return parse_recipe(payload["recipe"], source=payload.get("source"))


def recipe_payload(recipe, source: str) -> dict:
    """A typed recipe as a job carries it: the values set (as `BaseRecipe.with_overrides` keeps them) and a name
    for its errors."""
    return {"recipe": recipe.model_dump(mode="json", exclude_unset=True), "source": str(source)}


def trial_job(payload: dict, emit: Emit) -> dict:
    """Train one trial (or one fold of it) through the training engine; stream its steps and dev evaluations."""

    recipe = _recipe(payload)
    last = [0.0]

    def on_step(step: int, record: dict) -> None:
        now = time.monotonic()
        if now - last[0] >= STEP_EVENT_SECONDS:
            last[0] = now
            emit({"event": "step", "step": step, "epoch": record.get("epoch")})

    def on_eval(step: int, result: dict, total: int) -> None:
        reply = emit({"event": "eval", "step": step, "total": total, "score": result["score"],
                      "per_query": result.get("per_query"), "first_stage": first_stage_score(result)})
        if reply.get("prune"):
            raise JobPruned(step)

    with _trial_logging(payload.get("verbose", False)):
        result = train(recipe, on_step=on_step, on_eval=on_eval)
    dev = result.dev
    return {"steps": result.steps, "train_seconds": getattr(result, "train_seconds", None),
            "dev": None if dev is None else {"score": dev["score"], "per_query": dev.get("per_query"),
                                             "first_stage": first_stage_score(dev)}}


def first_stage_score(dev: dict) -> float | None:
    """A reranker's dev result: the first stage's own score on the same queries (what reranking adds to); None for
    a bi-encoder's."""
    first = dev.get("first_stage")
    return None if not first else first["metrics"].get(dev.get("main_metric") or dev.get("metric"))


@contextlib.contextmanager
def _trial_logging(verbose: bool):
    """A trial's own engine lines (step counts, dev scores) only with --verbose; warnings always."""
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("embedkit.train")
    before, bars = logger.level, hf_logging.is_progress_bar_enabled()
    if not verbose:
        logger.setLevel(logging.WARNING)
        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" of every trial
    try:
        yield
    finally:
        logger.setLevel(before)
        if bars:
            hf_logging.enable_progress_bar()


def rank_job(payload: dict, emit: Emit) -> dict:
    rank = base_model_ranker(_recipe(payload), payload["device"])
    return {"ranked": rank(payload["queries"], payload["documents"], payload["k"])}


def probe_job(payload: dict, emit: Emit) -> dict:
    return mining_probe(_recipe(payload), payload["device"])


def train_job(payload: dict, emit: Emit) -> dict:
    """The final model: the written recipe, trained as `embedkit train FILE` trains it."""

    started = time.perf_counter()
    result = train(load_recipe(payload["recipe_file"]))
    return {"output_dir": str(result.output_dir), "steps": result.steps,
            "seconds": round(time.perf_counter() - started, 1),
            "samples_per_second": round(result.samples_per_second, 3),
            "dev": result.dev["metrics"] if result.dev else None}


def compare_job(payload: dict, emit: Emit) -> dict:
    from embedkit.eval.tasks import parse_task_spec

    return compare_on_test(parse_task_spec(payload["test"]), recipe=_recipe(payload),
                           tuned_dir=Path(payload["tuned_dir"]), output=Path(payload["output"]),
                           same_as_default=payload["same_as_default"], device=payload["device"])


JOBS: dict[str, Callable[[dict, Emit], dict]] = {"trial": trial_job, "rank": rank_job, "probe": probe_job,
                                                 "train": train_job, "compare": compare_job}


# ---------------------------------------------------------------------------------------------------- the parent
def run_job(kind: str, payload: dict, *, isolate: bool = True, on_event: OnEvent | None = None,
            on_idle: Callable[[], None] | None = None, work: Path | None = None) -> dict:
    """Run job `kind` (JOBS) and return its result. Raises JobPruned when `on_event` answered an "eval" event with
    True, JobFailed when the child failed (its message; `kind` the exception's class), and in-process, whatever the
    job raised. `on_idle` runs every POLL_SECONDS while a child is quiet; `work`: where the job file goes."""
    handler = on_event or (lambda event: None)
    if not isolate:
        def emit(event: dict) -> dict:
            answer = handler(event)
            return {"prune": bool(answer)} if event.get("event") == "eval" else {}

        return JOBS[kind](payload, emit)
    return _run_child(kind, payload, handler, on_idle, work)


def _events(fd: int, on_idle):
    """The child's events as they come, until it closes the pipe. Read unbuffered (os.read): a buffered reader could
    hold a waiting "eval" line that select() no longer signals, and the child would wait for its answer forever."""
    pending = b""
    try:
        while True:
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                yield json.loads(line)
            ready, _, _ = select.select([fd], [], [], POLL_SECONDS)
            if not ready:
                if on_idle is not None:
                    on_idle()
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            pending += chunk
    finally:
        os.close(fd)


def _run_child(kind: str, payload: dict, handler: OnEvent, on_idle, work: Path | None) -> dict:
    folder = Path(work) if work is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix=f"{kind}-", dir=folder, delete=False,
                                     encoding="utf-8") as f:
        json.dump({"kind": kind, "payload": payload}, f)
        job_file = f.name
    read_fd, write_fd = os.pipe()

    env = dict(os.environ, TOKENIZERS_PARALLELISM=os.environ.get("TOKENIZERS_PARALLELISM", "false"),
               **child_environment())
    try:
        # stdout to our stderr: what libraries print in the child never mixes with a command's result on stdout
        child = subprocess.Popen([sys.executable, "-m", "embedkit.tune.jobs", job_file, str(write_fd)],
                                 stdin=subprocess.PIPE, stdout=2, pass_fds=(write_fd,), env=env, text=True)
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        Path(job_file).unlink(missing_ok=True)
        raise
    os.close(write_fd)
    final: dict | None = None
    try:
        for event in _events(read_fd, on_idle):
            if event["event"] in ("result", "pruned", "error"):
                final = event
                continue
            answer = handler(event)
            if event["event"] == "eval":
                child.stdin.write(json.dumps({"prune": bool(answer)}) + "\n")
                child.stdin.flush()
        code = child.wait()
    except BaseException:  # interrupted (Ctrl-C): the child goes too
        child.kill()
        child.wait()
        raise
    finally:
        if child.stdin:
            child.stdin.close()
        Path(job_file).unlink(missing_ok=True)
    if final is None:
        raise JobFailed(f"the {kind} process ended with exit code {code} before its result (killed? out of memory?)",
                        kind="exit")
    if final["event"] == "pruned":
        raise JobPruned(final["step"])
    if final["event"] == "error":
        raise JobFailed(final["message"], kind=final["kind"])
    return final["result"]


# ---------------------------------------------------------------------------------------------------- the child
def _child_main(job_file: str, event_fd: int) -> int:
    with open(job_file, encoding="utf-8") as f:
        job = json.load(f)
    configure_logging("embedkit tune")  # the level and format the tune command was given (child_environment)
    events = os.fdopen(event_fd, "w", encoding="utf-8")

    def write(event: dict) -> None:
        events.write(json.dumps(event) + "\n")
        events.flush()

    def emit(event: dict) -> dict:
        write(event)
        if event.get("event") != "eval":
            return {}
        reply = sys.stdin.readline()
        return json.loads(reply) if reply else {"prune": True}  # the parent is gone: stop

    try:
        result = JOBS[job["kind"]](job["payload"], emit)
    except JobPruned as stop:
        write({"event": "pruned", "step": stop.step})
        return 0
    except BaseException as exc:  # reported to the parent, which decides (an OOM fails a trial, the rest the run)
        message = exc.one_line() if isinstance(exc, EmbedkitError) else f"{type(exc).__name__}: {exc}"
        write({"event": "error", "kind": type(exc).__name__, "message": message})
        if not isinstance(exc, (EmbedkitError, MemoryError)) and type(exc).__name__ != "OutOfMemoryError":
            raise  # the traceback on stderr, for a bug
        return 1
    write({"event": "result", "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1], int(sys.argv[2])))
