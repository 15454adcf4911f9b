"""The README's commands and the image: scripts/test.sh finds or installs Chromium (or says what to install),
.ci/run does nothing else, setup.sh installs the embedded defaults, serve/Dockerfile runs non-root and read-only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BASH = "/bin/bash"


def _fake_bin(folder: Path, *, apt: str | None = None, sudo: str | None = None, chromium: bool = False) -> Path:
    """A PATH with only the tools a case needs. apt: 'ok' | 'fail'; sudo: 'nopasswd' | 'password'."""
    folder.mkdir()
    for tool in ("cat", "env", "dirname"):
        os.symlink(subprocess.run(["which", tool], capture_output=True, text=True, check=True).stdout.strip(),
                   folder / tool)
    log = folder.parent / "calls.log"

    def script(name: str, body: str) -> None:
        (folder / name).write_text(f"#!{BASH}\n{body}\n")
        (folder / name).chmod(0o755)

    if chromium:
        script("chromium", "exit 0")
    if apt:
        script("apt-get", f'echo "apt-get $* DEBIAN_FRONTEND=${{DEBIAN_FRONTEND:-}} via=${{VIA:-}}" >> {log}\n'
                          + ('exit 100' if apt == "fail" else
                             f'if [ "$1" = install ]; then printf "#!{BASH}\\nexit 0\\n" > {folder}/chromium; '
                             f"/bin/chmod +x {folder}/chromium; fi"))
    if sudo == "nopasswd":
        script("sudo", '[ "$1" = -n ] && shift; VIA=sudo "$@"')
    elif sudo == "password":
        script("sudo", 'echo "sudo: a password is required" >&2; exit 1')
    return folder


def ensure(tmp_path: Path, uid: int, **tools) -> tuple[subprocess.CompletedProcess, list[str]]:
    path = _fake_bin(tmp_path / "bin", **tools)
    result = subprocess.run([BASH, "-c", ". scripts/chromium.sh && ensure_chromium"], cwd=REPO, text=True,
                            capture_output=True, env={"PATH": str(path), "EMBEDKIT_TEST_UID": str(uid)})
    log = tmp_path / "calls.log"
    return result, log.read_text().splitlines() if log.exists() else []


def test_chromium_found_is_left_alone(tmp_path):
    result, calls = ensure(tmp_path, 1000, chromium=True, apt="ok")
    assert result.returncode == 0 and calls == [] and result.stderr == ""


def test_chromium_missing_root_installs_debians_package(tmp_path):
    result, calls = ensure(tmp_path, 0, apt="ok")
    assert result.returncode == 0, result.stderr
    assert calls == ["apt-get update -qq DEBIAN_FRONTEND= via=",
                     "apt-get install -y -qq chromium DEBIAN_FRONTEND=noninteractive via="]
    assert "installing Debian's chromium" in result.stderr


def test_chromium_missing_passwordless_sudo_installs_through_sudo(tmp_path):
    result, calls = ensure(tmp_path, 1000, apt="ok", sudo="nopasswd")
    assert result.returncode == 0, result.stderr
    assert calls == ["apt-get update -qq DEBIAN_FRONTEND= via=sudo",
                     "apt-get install -y -qq chromium DEBIAN_FRONTEND=noninteractive via=sudo"]


@pytest.mark.parametrize("case", ["no-sudo", "sudo-wants-a-password", "root-without-apt"])
def test_chromium_missing_and_not_installable_stops_with_a_clear_message(tmp_path, case):
    uid, tools = {"no-sudo": (1000, {"apt": "ok"}),
                  "sudo-wants-a-password": (1000, {"apt": "ok", "sudo": "password"}),
                  "root-without-apt": (0, {})}[case]
    result, calls = ensure(tmp_path, uid, **tools)
    assert result.returncode == 1 and calls == []
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: the tests need Chromium (headless, for tests/test_rag_web.py)")
    assert ("there is no apt-get" if case == "root-without-apt" else "cannot install packages") in first
    assert "sudo apt-get install chromium" in result.stderr and "bash scripts/test.sh" in result.stderr


def test_chromium_install_failure_is_reported(tmp_path):
    result, calls = ensure(tmp_path, 0, apt="fail")
    assert result.returncode == 1 and len(calls) == 1
    assert "error: installing chromium with apt-get failed" in result.stderr


def test_test_sh_stops_before_installing_anything_when_chromium_cannot_be_had(tmp_path):
    path = _fake_bin(tmp_path / "bin")
    result = subprocess.run([BASH, str(REPO / "scripts" / "test.sh")], text=True, capture_output=True,
                            env={"PATH": str(path), "EMBEDKIT_TEST_UID": "1000"})
    assert result.returncode == 1
    assert result.stderr.startswith("error: the tests need Chromium") and "[setup]" not in result.stderr


def test_ci_runs_the_readme_test_command_and_nothing_else():
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "exec bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (REPO / "README.md").read_text()


def test_setup_installs_the_embedded_defaults_without_their_dependencies():
    from embedkit.packages import DEFAULT_PACKAGES

    pins = subprocess.run([sys.executable, "-m", "embedkit.packages"], capture_output=True, text=True,
                          check=True).stdout.split()
    assert pins == [p.pin for p in DEFAULT_PACKAGES.values()]
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "defaults=$(.venv/bin/python -m embedkit.packages)" in setup
    assert ".venv/bin/python -m pip install --quiet --no-deps $defaults" in setup
    assert "embedkit/packages.py" in setup.split("want=", 1)[1].splitlines()[0]  # a new pin re-runs the set-up


def _dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (REPO / "serve" / "Dockerfile").read_text())
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()  # type: ignore[misc]
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_runs_non_root_read_only_and_installs_nothing_at_run_time():
    """Docker is not available here: the image is not built; this checks the file for the essentials."""
    instructions = _dockerfile()
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0") and users[-1].split(":")[0].isdigit()
    after_user = instructions[[op for op, _ in instructions].index("USER"):]
    assert not [arg for op, arg in after_user if op == "RUN"]  # nothing is installed as (or after) the user
    for op, arg in instructions:
        if op in ("ENTRYPOINT", "CMD"):
            assert "pip" not in arg and "fetch" not in arg
    env = " ".join(arg for op, arg in instructions if op == "ENV")
    for variable in ("HOME=/tmp", "XDG_CACHE_HOME=/tmp", "HF_HOME=/tmp", "MPLCONFIGDIR=/tmp",
                     "PYTHONDONTWRITEBYTECODE=1", "HF_HUB_OFFLINE=1"):
        assert variable in env
    comments = (REPO / "serve" / "Dockerfile").read_text()
    assert "docker run --read-only --tmpfs /tmp" in comments
