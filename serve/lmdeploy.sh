#!/usr/bin/env bash
# LMDeploy serves a GENERATIVE chat model (e.g. for the RAG answer step), not embeddings.
#
#   bash serve/lmdeploy.sh MODEL_DIR_OR_ID [port]
#
# Facts (checked with lmdeploy 0.18): it installs only in its own environment (pins torch<=2.12.1, peft<=0.14;
# ~7.7 GB), needs an NVIDIA GPU, and its /v1/embeddings answers HTTP 400 "Unsupported by turbomind": it has no
# embeddings endpoint. Serve embeddings with `embedkit serve` (CPU) or vLLM (serve/vllm.sh) next to it.
#
#   python -m venv .lmdeploy && .lmdeploy/bin/pip install lmdeploy
set -euo pipefail
model=${1:?usage: serve/lmdeploy.sh MODEL [PORT]}
port=${2:-23333}
exec "${LMDEPLOY_BIN:-lmdeploy}" serve api_server "$model" --server-name 0.0.0.0 --server-port "$port" \
  --backend turbomind --model-name "$(basename "$model")"
