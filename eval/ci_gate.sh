#!/usr/bin/env bash
# Regression gate for CI: evaluate a candidate model on the baseline's tasks, then compare.
#
#   bash eval/ci_gate.sh runs/my-model              # candidate = a model folder (or 'minilm', or a hub id)
#   MAX_DROP=0.005 bash eval/ci_gate.sh runs/my-model
#   STRICT=1 bash eval/ci_gate.sh runs/my-model     # non-inferiority: every 95% interval above -MAX_DROP
#   CANDIDATE_REPORT=cand.json bash eval/ci_gate.sh  # gate a report made earlier (no evaluation; MODEL unused)
#   (REPORT_DIR, default runs/ci-gate, receives candidate.json, comparison.json and comparison.png;
#    relative paths are taken from the repository root)
#
# What is tested (see eval/README.md): per task, H0 "the main metric dropped by at most MAX_DROP" against
# H1 "it dropped by more", one-sided and paired, on differences shifted by MAX_DROP; exit 1 when p < ALPHA.
# Exit code = `embedkit compare`'s: 0 pass, 1 regression, 2 not comparable (the candidate was evaluated on
# other data) or bad input.
set -euo pipefail
cd "$(dirname "$0")/.."

CANDIDATE_REPORT="${CANDIDATE_REPORT:-}"
if [[ -z "$CANDIDATE_REPORT" ]]; then
  CANDIDATE="${1:?usage: eval/ci_gate.sh MODEL [REPORT_DIR]  (or CANDIDATE_REPORT=report.json eval/ci_gate.sh)}"
fi
REPORT_DIR="${2:-${REPORT_DIR:-runs/ci-gate}}"
BASELINE="${BASELINE:-eval/baselines/minilm.json}"
MAX_DROP="${MAX_DROP:-0.01}"
ALPHA="${ALPHA:-0.05}"
SEED="${SEED:-0}"
RESAMPLES="${RESAMPLES:-2000}"
EMBEDKIT="${EMBEDKIT:-.venv/bin/embedkit}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

mode=()
case "${STRICT:-0}" in
  1|true|yes) mode=(--strict) ;;
  0|false|no|"") ;;
  *) echo "eval/ci_gate.sh: STRICT must be 0 or 1, got '$STRICT'" >&2; exit 2 ;;
esac

mkdir -p "$REPORT_DIR"
if [[ -z "$CANDIDATE_REPORT" ]]; then
  # The same tasks as the baseline: the embedded defaults, which need no shared data.
  CANDIDATE_REPORT="$REPORT_DIR/candidate.json"
  "$EMBEDKIT" eval --model "$CANDIDATE" --task stsb --task stsb-paraphrase --output "$CANDIDATE_REPORT"
fi
"$EMBEDKIT" compare --baseline "$BASELINE" --candidate "$CANDIDATE_REPORT" \
  --max-drop "$MAX_DROP" --alpha "$ALPHA" --seed "$SEED" --resamples "$RESAMPLES" "${mode[@]}" \
  --output "$REPORT_DIR/comparison.json" --plot "$REPORT_DIR/comparison.png"
