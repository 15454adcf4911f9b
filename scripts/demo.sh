#!/usr/bin/env bash
# The main job, end to end on the embedded defaults. Installs what it needs on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
exec .venv/bin/embedkit demo "$@"
