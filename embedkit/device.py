"""Where a stage runs: `--device auto|cpu|cuda|cuda:N` (and `model.device` in recipes), resolved in one place.

`auto` takes a GPU when there is one: under a multi-process launch (torchrun sets LOCAL_RANK) each process takes
its own GPU, `cuda:LOCAL_RANK`; without CUDA it is the CPU. Asking for CUDA on a machine without it is a one-line
error, never a silent fall-back to the CPU (a user who asked for a GPU wants to know that the run would be slow).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
from typing import TYPE_CHECKING, Iterator

from embedkit.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI imports DEVICE_HELP, and --help stays fast
    import torch

DEVICE_HELP = "auto (a GPU when there is one, else the CPU), cpu, cuda or cuda:N."
_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def validate_device(spec: str) -> str:
    """The spec itself when it is well-formed (no CUDA check: recipes are validated on machines without GPUs)."""
    text = (spec or "auto").strip().lower()
    if not _PATTERN.match(text):
        raise ConfigError(f"unknown device {spec!r}; use {DEVICE_HELP}", field="device")
    return text


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def resolve_device(spec: str | torch.device | None = "auto", *, field: str = "--device") -> torch.device:
    """A torch.device for `spec`; ConfigError (one line, naming `field`) when it cannot be had here."""
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    text = validate_device(spec or "auto")
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {text} asked for, but CUDA is not available on this machine (torch "
                          f"{torch.__version__}, {'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); "
                          "use --device cpu or auto", field=field)
    index = int(text.split(":")[1]) if ":" in text else local_rank() % torch.cuda.device_count()
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device cuda:{index} asked for, but only {torch.cuda.device_count()} GPU(s) are visible",
                          field=field)
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> str:
    """'cpu (2 threads)' or 'cuda:0 (NVIDIA H200, 139 GiB)' for logs and manifests."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    return f"cpu ({torch.get_num_threads()} threads)"


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op thread count at `threads` (None or 0: leave it), then give the old count
    back: the setting is process-wide, and a stage (a trial, a ranking, a training) must not change it for the
    stages after it in the same process."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_memory() -> None:
    """Give back what the models a stage dropped still hold: a garbage collection, then CUDA's cached blocks (for
    stages that load one model after another in one process, as `embedkit tune` does)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
