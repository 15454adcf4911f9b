#!/usr/bin/env bash
# Serve an `embedkit export --format hf` folder with vLLM on a GPU (OpenAI-compatible /v1/embeddings).
#
#   bash serve/vllm.sh runs/medquad/hf [port]
#
# vLLM's PyPI wheel is CUDA-only: install it in its own environment on the GPU machine (python -m venv .vllm &&
# .vllm/bin/pip install vllm). The exact command for a folder is also in its launch.txt / launch.json.
# `embedkit serve --engine vllm --model DIR` runs the same command and then checks vLLM's vectors against the folder's
# probe_vectors.json (stopping vLLM on a mismatch).
set -euo pipefail
dir=${1:?usage: serve/vllm.sh EXPORT_DIR [PORT]}
port=${2:-8000}
if [ -f "$dir/launch.json" ]; then
  # the command embedkit wrote at export time, with this port
  mapfile -t argv < <(python3 - "$dir/launch.json" "$port" <<'PY'
import json, sys
argv = json.load(open(sys.argv[1]))["commands"]["vllm"]
argv[argv.index("--port") + 1] = sys.argv[2]
print("\n".join(argv))
PY
)
else
  # --runner pooling: embeddings, not generation. Pooling/normalisation come from the folder's explicit
  # sentence-transformers config (the compact `pooling_mode` form is mis-read: vLLM issue 45995).
  argv=(vllm serve "$dir" --runner pooling --dtype float32 --port "$port")
fi
echo "${argv[*]}" >&2
exec "${VLLM_BIN:-${argv[0]}}" "${argv[@]:1}"
