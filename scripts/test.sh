#!/usr/bin/env bash
# The test suite. Installs what it needs on first use. Extra arguments go to pytest (e.g. -k encoder).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
