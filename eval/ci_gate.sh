#!/usr/bin/env bash
# Regression gate for CI: evaluate a candidate model on the baseline's tasks, then compare.
#
#   bash eval/ci_gate.sh runs/my-model              # candidate = a model folder (or 'minilm', or a hub id)
#   MAX_DROP=0.005 bash eval/ci_gate.sh runs/my-model
#
# Exit code = `embedkit compare`'s: 0 no significant regression beyond MAX_DROP, 1 regression,
# 2 not comparable (the candidate was evaluated on other data) or bad input.
set -euo pipefail
cd "$(dirname "$0")/.."

CANDIDATE="${1:?usage: eval/ci_gate.sh MODEL [REPORT_DIR]}"
REPORT_DIR="${2:-runs/ci-gate}"
BASELINE="${BASELINE:-eval/baselines/minilm.json}"
MAX_DROP="${MAX_DROP:-0.01}"
ALPHA="${ALPHA:-0.05}"
EMBEDKIT="${EMBEDKIT:-.venv/bin/embedkit}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

mkdir -p "$REPORT_DIR"
# The same tasks as the baseline: the embedded defaults, which need no shared data.
"$EMBEDKIT" eval --model "$CANDIDATE" --task stsb --task stsb-paraphrase --output "$REPORT_DIR/candidate.json"
"$EMBEDKIT" compare --baseline "$BASELINE" --candidate "$REPORT_DIR/candidate.json" \
  --max-drop "$MAX_DROP" --alpha "$ALPHA" --output "$REPORT_DIR/comparison.json" --plot "$REPORT_DIR/comparison.png"
