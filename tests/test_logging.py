"""Logging: configured once by the `embedkit` command (-v / -q / --log-json), stdout for results and stderr for log
lines, one progress helper that draws a bar only at a terminal, and no stray prints in the package."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_eval_support import FakeEncoder, write_beir
from typer.testing import CliRunner

import embedkit.models
from embedkit import logs

PACKAGE = Path(__file__).resolve().parents[1] / "embedkit"


@pytest.fixture()
def fake_models(monkeypatch, tmp_path):
    """`embedkit eval -m good` on the fake encoder: a command that logs a few INFO lines in a second."""
    monkeypatch.setattr(embedkit.models, "load_model", lambda name, **kw: FakeEncoder(name=name))
    monkeypatch.setenv("EMBEDKIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(logs.JSON_ENV, raising=False)
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    return write_beir(tmp_path / "tiny")


def _eval(*options: str, beir: Path, tmp_path: Path, env: dict | None = None):
    from embedkit.cli import app

    return CliRunner().invoke(app, [*options, "eval", "-m", "good", "-t", f"beir:{beir}", "-o",
                                    str(tmp_path / "r.json")], env=env)


# ----------------------------------------------------------------------------------------------------- the command
def test_log_lines_go_to_stderr_with_the_command_prefix_and_results_to_stdout(fake_models, tmp_path):
    """Bug caught: a diagnostic printed on stdout (a pipe reading the result gets it), or logging left unconfigured
    by the command (the INFO lines vanish, as for a library)."""
    result = _eval(beir=fake_models, tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    assert "embedkit eval: loading model good" in result.stderr.splitlines()
    assert "embedkit eval: evaluating tiny-test" in result.stderr.splitlines()
    assert "loading" not in result.stdout and "evaluating" not in result.stdout
    assert "ndcg_at_10" in result.stdout and "report:" in result.stdout  # the result stays on stdout


def test_quiet_keeps_the_result_and_drops_the_info_lines(fake_models, tmp_path):
    """Bug caught: `embedkit -q` parsed but not applied, or applied to the result too (an empty stdout)."""
    result = _eval("-q", beir=fake_models, tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "ndcg_at_10" in result.stdout


def test_verbose_turns_on_debug_lines(fake_models, tmp_path):
    """Bug caught: -v not reaching the "embedkit" logger (debug lines stay hidden), or -v and -q both accepted."""
    result = _eval("-v", beir=fake_models, tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    assert logging.getLogger("embedkit").getEffectiveLevel() == logging.DEBUG
    both = _eval("-v", "-q", beir=fake_models, tmp_path=tmp_path)
    assert both.exit_code == 2 and "not both" in both.output


@pytest.mark.parametrize("how", ["option", "environment"])
def test_log_json_gives_one_parseable_object_per_line(fake_models, tmp_path, how):
    """Bug caught: a stderr line that is not JSON (a stray print, a text formatter left in place, a multi-line
    message), a record without level/logger/message, or the flag (or EMBEDKIT_LOG_JSON=1) not switching at all."""
    if how == "option":
        result = _eval("--log-json", beir=fake_models, tmp_path=tmp_path)
    else:
        result = _eval(beir=fake_models, tmp_path=tmp_path, env={logs.JSON_ENV: "1"})
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert all(r["logger"].startswith("embedkit.") for r in records)
    assert {"level": "INFO", "logger": "embedkit.eval.cli", "message": "loading model good"}.items() <= \
        records[0].items()
    assert "ndcg_at_10" in result.stdout  # the result is not JSON-wrapped: stdout is not the log


def test_an_error_under_log_json_is_a_json_line_too(fake_models, tmp_path):
    """Bug caught: the one-line `error:` printed as plain text, the one line a JSON reader cannot parse."""
    from embedkit.cli import app

    result = CliRunner().invoke(app, ["--log-json", "eval", "-m", "good", "-t", f"beir:{tmp_path / 'missing'}"])
    assert result.exit_code == 2
    last = json.loads(result.stderr.strip().splitlines()[-1])
    assert last["level"] == "ERROR" and "missing" in last["message"] and not last["message"].startswith("error:")


def test_relaunched_processes_get_the_level_and_format(monkeypatch, tmp_path):
    """Bug caught: `embedkit -q eval --nproc 2` (or --log-json) whose processes log at INFO in text: the relaunch
    rebuilds only the sub-command's arguments, so the top-level options must travel in the environment."""
    from embedkit import launch

    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    logs.configure_logging("embedkit eval", level=logging.WARNING, json_lines=True)
    seen = {}
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd, env: seen.update(env) or 0)
    assert launch.relaunch(["eval"], 2, cpu=True) == 0
    assert seen[logs.LEVEL_ENV] == "WARNING" and seen[logs.JSON_ENV] == "1"
    # ... and a process reading them configures itself the same way
    monkeypatch.setenv(logs.LEVEL_ENV, seen[logs.LEVEL_ENV])
    logs.configure_logging("embedkit eval")
    assert logging.getLogger("embedkit").level == logging.WARNING


def test_ranks_other_than_0_say_warnings_only_with_the_rank_in_the_prefix(monkeypatch, capsys):
    """Bug caught: N processes each printing every INFO line (N copies of a training log), or a warning of rank 1
    that does not say which process it came from (the prefix of distributed training runs)."""
    log = logging.getLogger("embedkit.train.engine")
    monkeypatch.setenv("WORLD_SIZE", "2")
    logs.configure_logging("embedkit train", rank=1)
    log.info("step 10")
    log.warning("loss is nan")
    logs.configure_logging("embedkit train", rank=0)
    log.info("step 20")
    assert capsys.readouterr().err.splitlines() == ["embedkit train [rank 1]: loss is nan",
                                                     "embedkit train [rank 0]: step 20"]


def test_a_commands_own_quiet_still_works():
    """Bug caught: `embedkit eval -q` / `rag eval -q` (their own --quiet, older than the global one) printing the
    progress lines again once the sub-commands stopped printing them themselves."""
    logs.configure_logging("embedkit eval", level=logging.INFO)
    logs.quieten()
    assert not logging.getLogger("embedkit.eval.runner").isEnabledFor(logging.INFO)
    logs.configure_logging("embedkit eval", level=logging.ERROR)
    logs.quieten()  # never lowers a stricter level
    assert logging.getLogger("embedkit").level == logging.ERROR


# ------------------------------------------------------------------------------------------------------- progress
class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_off_a_terminal_logs_a_line_per_interval_with_rate_and_eta(capsys):
    """Bug caught: a bar drawn into a CI log (carriage returns, no newlines), no line at all for a long run, a line
    per update (a flood), or a wrong rate / ETA / count."""
    logs.configure_logging("embedkit train")
    clock = _Clock()
    bar = logs.progress(total=100, desc="contrastive", unit="step", interval=30, clock=clock,
                        logger=logging.getLogger("embedkit.train.engine"))
    assert bar.mode == "lines"
    for second in range(1, 30):  # 29 s: nothing yet
        clock.now = second
        bar.update(1)
    assert capsys.readouterr().err == ""
    clock.now = 30.0
    bar.update(1)  # 30 steps in 30 s
    bar.set_postfix(loss="0.4412")
    for second in (31, 45, 59):  # within the next interval: no second line
        clock.now = second
        bar.update(10)
    clock.now = 60.0
    bar.update(10)  # 70 steps in 60 s: 1.2/s, 30 left: ETA 26 s
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines)
    assert lines == ["embedkit train: contrastive: 30/100 step (30%), 1.0 step/s, ETA 1m10s",
                     "embedkit train: contrastive: 70/100 step (70%), 1.2 step/s, ETA 26s, loss=0.4412",
                     "embedkit train: contrastive: 70/100 step (70%), 1.2 step/s, done in 1m00s, loss=0.4412"]


def test_progress_is_silent_for_a_short_loop_and_under_quiet(capsys):
    """Bug caught: every small encode call leaving a line (short loops must not speak), or -q still printing
    progress."""
    logs.configure_logging("embedkit eval")
    assert list(logs.progress(range(5), desc="short", interval=30, clock=_Clock())) == [0, 1, 2, 3, 4]
    logs.configure_logging("embedkit eval", level=logging.WARNING)
    clock = _Clock()
    quiet = logs.progress(total=10, desc="long", interval=1, clock=clock)
    assert quiet.mode == "off"
    for second in range(1, 11):
        clock.now = second
        quiet.update(1)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_progress_draws_a_bar_only_at_a_terminal_with_text_lines(monkeypatch):
    """Bug caught: the bar lost for a person at a terminal, or drawn into a JSON-lines stream (unparseable)."""
    logs.configure_logging("embedkit encode")
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with logs.progress(total=3, desc="encode documents", unit="text") as bar:
        bar.update(3)
    assert bar.mode == "bar" and "encode documents" in terminal.getvalue() and "3/3" in terminal.getvalue()
    logs.configure_logging("embedkit encode", json_lines=True)
    assert logs.progress(total=3).mode == "lines"


def test_progress_lines_carry_their_numbers_as_json_fields(capsys):
    """Bug caught: a machine reading --log-json having to parse the numbers back out of the message."""
    logs.configure_logging("embedkit train", json_lines=True)
    clock = _Clock()
    bar = logs.progress(total=40, desc="encode", unit="text", interval=10, clock=clock)
    clock.now = 10.0
    bar.update(20)
    record = json.loads(capsys.readouterr().err)
    assert record["progress"] == {"desc": "encode", "done": 20, "total": 40, "unit": "text", "rate_per_s": 2.0,
                                  "elapsed_s": 10.0, "eta_s": 10.0, "finished": False}


def test_the_encoder_and_the_engine_use_the_progress_helper(monkeypatch, tiny_bert_dir, capsys):
    """Bug caught: a progress bar that bypasses the helper (a direct tqdm), drawing a bar into a log or printing
    under -q. The encoder's own bar, off a terminal, must become log lines."""
    from embedkit.models import load_model

    calls = []
    real = logs.progress

    def recording(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **{**kwargs, "interval": 0.0})

    monkeypatch.setattr(logs, "progress", recording)
    logs.configure_logging("embedkit encode")
    load_model(tiny_bert_dir).encode(["a text", "another"], show_progress=True)
    assert calls == ["encode documents"]
    assert "embedkit encode: encode documents: 2/2 text (100%)" in capsys.readouterr().err


def test_library_bars_stay_out_of_a_log(tmp_path):
    """Bug caught: transformers' own "Loading weights" bar (a tqdm of its own, past our helper) drawn into a
    redirected stderr: the command's stderr off a terminal must hold log lines only."""
    texts = tmp_path / "texts.txt"
    texts.write_text("a text\nanother\n")
    env = {k: v for k, v in os.environ.items() if k != logs.HF_BARS_ENV}
    result = subprocess.run([sys.executable, "-m", "embedkit.cli", "encode", "--model", "minilm", "--input",
                             str(texts), "--output", str(tmp_path / "v.npy")], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("wrote 2 x 384 vectors") and result.stderr == ""


# ------------------------------------------------------------------------------------------------- the package
# Bare print() calls allowed in the package, with why: each writes a result or a contract line, not a diagnostic.
ALLOWED_PRINTS = {
    "launch.py": "the one-line `error: ...` of a failed command (text mode): the CLI's error contract, one exact "
                 "line that tests and scripts read, shown whatever the level",
    "packages.py": "`python -m embedkit.packages` prints the package pins for scripts/setup.sh: its result",
}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_no_module_prints_diagnostics_past_logging():
    """Bug caught: a new `print(...)`, `typer.echo(..., err=True)`, `sys.stderr.write` or `log=print` helper that
    bypasses -q and --log-json, a `typer.echo` in a library module (a diagnostic on stdout), or a tqdm bar that
    does not go through embedkit.logs.progress. Parsed, not grepped: a model card's example text that contains
    `print(` is no call."""
    prints, problems = set(), []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = str(path.relative_to(PACKAGE))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in _calls(tree):
            func = _dotted(call.func)
            keywords = {k.arg: k.value for k in call.keywords}
            if func == "print":
                prints.add(name)
            elif func == "typer.echo" and (path.name != "cli.py" or "err" in keywords):
                problems.append(f"{name}:{call.lineno}: typer.echo outside a command's result")
            elif func in ("sys.stderr.write", "sys.stdout.write"):
                problems.append(f"{name}:{call.lineno}: {func}")
            if any(isinstance(v, ast.Name) and v.id == "print" for v in keywords.values()):
                problems.append(f"{name}:{call.lineno}: print passed as a logger")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and name != "logs.py":
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m.split(".")[0] == "tqdm" for m in modules):
                    problems.append(f"{name}:{node.lineno}: tqdm outside embedkit.logs.progress")
    assert problems == []
    assert prints == set(ALLOWED_PRINTS), "print() outside the allow-list (log it instead, or add it with a reason)"


def test_configure_logging_lives_in_one_place():
    """Bug caught: a second configure_logging left behind (a caller importing the old one would set up a different
    format), or a sub-command configuring logging itself and undoing -q / --log-json."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        name = str(path.relative_to(PACKAGE))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "configure_logging" and name != "logs.py":
                offenders.append(f"{name}: defines configure_logging")
        # the process entry points: the CLI, torchrun's children (launch.py) and tune's job processes (tune/jobs.py),
        # the last two configured from the environment the parent's configuration wrote (child_environment)
        if name not in ("cli.py", "logs.py", "launch.py", "tune/jobs.py"):
            offenders += [f"{name}:{c.lineno}: calls configure_logging" for c in _calls(tree)
                          if _dotted(c.func).endswith("configure_logging")]
    assert offenders == []
