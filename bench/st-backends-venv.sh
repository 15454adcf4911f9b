#!/usr/bin/env bash
# The peer venv bench/bench_cpu_backends.py runs sentence-transformers' ONNX and OpenVINO backends from
# (bench/.venv-st-backends, git-ignored): about 2 minutes with a warm pip cache, 2.0 GB.
#
#     bash bench/st-backends-venv.sh            # or: bash bench/st-backends-venv.sh /other/path
#
# Why a peer venv: ST's backend="onnx" needs optimum-onnx, and its newest release (0.1.0) pins optimum ~= 2.1.0 and
# transformers < 4.58; sentence-transformers 6.x needs transformers >= 5 (as embedkit's venv has), so
# `sentence-transformers[onnx]` 6.x does not resolve. The newest set that holds both backends: sentence-transformers
# 5.7.0 (transformers >= 4.41, < 6), transformers 4.57.6, optimum 2.1.0, optimum-onnx 0.1.0, optimum-intel 1.27.0
# (the last that takes optimum-onnx 0.1 / transformers < 4.58; optimum-intel 2.x needs optimum ~= 2.2 / 2.3, which
# optimum-onnx 0.1.0 excludes). datasets is for export_static_quantized_openvino_model's calibration set.
# Every package is pinned so a newcomer gets this exact set (as resolved on 2026-12-06, Python 3.11).
#
# torch 2.13.0 comes as a CPU build from local disk here; elsewhere add
#     --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
# to the install line (the CUDA build works too, only bigger).
set -euo pipefail
VENV="${1:-$(dirname "$0")/.venv-st-backends}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet \
    torch==2.13.0 \
    sentence-transformers==5.7.0 transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 \
    optimum==2.1.0 "optimum-onnx[onnxruntime]==0.1.0" onnxruntime==1.32.0 onnx==1.23.2 \
    "optimum-intel[openvino]==1.27.0" openvino==2026.4.1 openvino-tokenizers==2026.4.1.0 nncf==3.4.0 \
    datasets==5.0.1 numpy==2.4.6
"$VENV/bin/python" -c "import sentence_transformers, optimum.onnxruntime, optimum.intel.openvino; \
print('peer venv ready: sentence-transformers', sentence_transformers.__version__)"
