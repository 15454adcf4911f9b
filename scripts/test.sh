#!/usr/bin/env bash
# The test suite. Installs what it needs on first use: .venv (scripts/setup.sh) and, where this user may install
# packages, Debian's chromium for the RAG page test (scripts/chromium.sh; otherwise it says what to install and
# stops). Extra arguments go to pytest (e.g. -k encoder).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/chromium.sh
ensure_chromium
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
