#!/usr/bin/env bash
# LMDeploy serves the GENERATIVE side of a model (chat completions, e.g. the RAG answer step), not embeddings.
#
#   bash serve/lmdeploy.sh MODEL_DIR_OR_ID [port]
#
# MODEL may be an `embedkit llm sft|dpo|joint` output folder: it is first exported with
# `embedkit llm export-chat` (weights hard-linked; tokenizer without the EOS that last-token pooling appends,
# which would otherwise end every chat prompt with end-of-turn). Serve the same folder's embedding side with
# `embedkit serve --model MODEL_DIR` (CPU) or vLLM (serve/vllm.sh) next to it.
#
# Facts (checked with lmdeploy 0.18): it installs only in its own environment (pins torch<=2.12.1, peft<=0.14;
# ~7.7 GB), needs an NVIDIA GPU, and its /v1/embeddings answers HTTP 400 "Unsupported by turbomind".
#
#   python -m venv .lmdeploy && .lmdeploy/bin/pip install lmdeploy
#   LMDEPLOY_BIN=.lmdeploy/bin/lmdeploy bash serve/lmdeploy.sh runs/smollm2-joint 23333
set -euo pipefail
model=${1:?usage: serve/lmdeploy.sh MODEL [PORT]}
port=${2:-23333}
name=$(basename "$model")
if [[ -f "$model/modules.json" ]]; then  # an embedkit folder: export the chat view once
  chat="${model%/}-chat"
  if [[ ! -f "$chat/config.json" || "$model/model.safetensors" -nt "$chat/config.json" ]]; then
    "${EMBEDKIT_BIN:-embedkit}" llm export-chat --model "$model" --output "$chat"
  fi
  model=$chat
fi
exec "${LMDEPLOY_BIN:-lmdeploy}" serve api_server "$model" --server-name 0.0.0.0 --server-port "$port" \
  --backend "${LMDEPLOY_BACKEND:-turbomind}" --model-name "$name"
