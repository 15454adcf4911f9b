"""The GPU check's session (tests/gpu, marker `gpu`): one visible GPU, a clear stop without CUDA, the rows file.

Selected only by a -m that names `gpu` (pyproject's addopts deselect the marker, so CI neither runs nor skips these
tests; a -m of one's own that does not name gpu, e.g. -m "not integration", deselects them here).
Settings, from the environment (scripts/gpu-check.sh sets them):
  GPU_CHECK_OUT     folder for models, the log and the rows file (default runs/gpu-check)
  GPU_CHECK_ROWS    the rows file each test appends its row to (default $GPU_CHECK_OUT/rows.json)
  GPU_CHECK_DATA    the folder holding scifact/ (default ../shared/data)
  GPU_CHECK_BUDGET  seconds for all rows of the session (default 570; a row that cannot start: skipped)
  GPU_CHECK_QUICK   1: tiny sizes (the CPU smoke test's)
  GPU_CHECK_DEVICE  cuda (default); `cpu` (with GPU_CHECK_QUICK=1) runs the tests as a CPU smoke test of the check
                    itself -- its numbers mean nothing, and it is never what `pytest -m gpu` does by default
  GPU_PEAK_FLOPS    the GPU's bf16 dense peak FLOP/s for MFU, where the built-in table does not know the GPU
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NO_CUDA = ("no CUDA device: the GPU check (`pytest -m gpu tests/gpu`, scripts/gpu-check.sh) runs on one GPU and "
           "this machine has none ({what}). CI deselects these tests (pyproject: -m \"not gpu\"); "
           "GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 runs them as a CPU smoke test of the check itself.")


def one_gpu(visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for a one-GPU row: the first of the given GPUs (GPU 0 when none is given)."""
    first = next((v.strip() for v in (visible or "").split(",") if v.strip()), "")
    return first or "0"


def _device() -> str:
    return (os.environ.get("GPU_CHECK_DEVICE") or "cuda").strip().lower()


@pytest.hookimpl(trylast=True)  # after -m has deselected: only a session that runs gpu tests needs the GPU
def pytest_collection_modifyitems(config, items):
    if not re.search(r"\bgpu\b", config.option.markexpr or ""):
        # A -m of one's own (e.g. "not integration") replaces pyproject's -m "not gpu": gpu tests still run only
        # when the expression names them.
        dropped = [item for item in items if item.get_closest_marker("gpu")]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        return
    if config.option.collectonly or not any(item.get_closest_marker("gpu") for item in items):
        return
    device = _device()
    if device == "cpu":
        return
    if device != "cuda":
        raise pytest.UsageError(f"GPU_CHECK_DEVICE={device!r}: use cuda (pick the GPU with CUDA_VISIBLE_DEVICES) "
                                "or cpu (smoke test)")
    # Before anything in this process asks CUDA: one GPU, so no library spreads a one-GPU row over several
    # (HF Trainer wraps its model in DataParallel when it sees more); the rows' processes inherit it.
    os.environ["CUDA_VISIBLE_DEVICES"] = one_gpu(os.environ.get("CUDA_VISIBLE_DEVICES"))
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise pytest.UsageError(NO_CUDA.format(what=f"torch {torch.__version__}, {build}"))
    if torch.cuda.device_count() != 1:
        raise pytest.UsageError(f"{torch.cuda.device_count()} GPUs visible although CUDA_VISIBLE_DEVICES="
                                f"{os.environ['CUDA_VISIBLE_DEVICES']}: CUDA was initialised before the GPU check "
                                "could pick one; set CUDA_VISIBLE_DEVICES to one GPU")


def _load_gpu_check():
    if "gpu_check" in sys.modules:
        return sys.modules["gpu_check"]
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@dataclass
class Check:
    gc: object
    device: str
    quick: bool
    out: Path
    data: Path
    rows_file: Path
    log: Path
    deadline: float  # time.monotonic() by which every row must be done
    meta: dict

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def run(self, row: int):
        """Run `row` in its own process within the session's deadline, add it to the rows file, return it; a row
        that does not apply here (time budget, no vLLM) is recorded and skipped."""
        gc = self.gc
        left = self.deadline - time.monotonic()
        reason = gc.vllm_skip_reason(self.device) if row == 6 else None
        if left < gc.ROW_MIN_S.get(row, 0):
            result = gc.RowResult(row, gc.ROW_NAMES[row], "skipped",
                                  f"skipped: time budget ({max(left, 0):.0f} s left, needs >= {gc.ROW_MIN_S[row]} s)")
        elif reason:
            result = gc.RowResult(row, gc.ROW_NAMES[row], "skipped", reason)
        else:
            settings = gc.Settings(self.device, self.quick, self.out, self.data, time.time() + left)
            result = gc.run_row_process(row, settings, self.log, left)
        gc.record_row(self.rows_file, result, self.meta)
        if result.status == "skipped":
            pytest.skip(result.result)
        return result


@pytest.fixture(scope="session")
def check() -> Check:
    gc = _load_gpu_check()
    device = _device()
    quick = os.environ.get("GPU_CHECK_QUICK", "").strip().lower() in ("1", "true", "yes")
    out = Path(os.environ.get("GPU_CHECK_OUT") or REPO / "runs" / "gpu-check").resolve()
    rows_file = Path(os.environ.get("GPU_CHECK_ROWS") or out / "rows.json").resolve()
    data = Path(os.environ.get("GPU_CHECK_DATA") or REPO.parent / "shared" / "data").resolve()
    budget = float(os.environ.get("GPU_CHECK_BUDGET") or (gc.QUICK_BUDGET_S if quick else gc.DEFAULT_BUDGET_S))
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    env = gc.environment_summary(device)
    where = env.get("gpu") or f"cpu, {env.get('cpu_threads')} threads"
    meta = {"title": f"embedkit GPU check on {device} ({where}; torch {env.get('torch')}"
                     + (f", CUDA {env['cuda']}" if env.get("cuda") else "") + ")" + (" -- quick" if quick else ""),
            "device": device, "gpu": env.get("gpu_name"), "peak_flops": env.get("peak_flops"),
            "peak_source": env.get("peak_source"), "quick": quick, "budget_s": budget,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "environment": env,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": "pytest -m gpu tests/gpu"}
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"\n===== pytest -m gpu session {meta['started']} on {where} =====\n")
    return Check(gc, device, quick, out, data, rows_file, log, time.monotonic() + budget, meta)
