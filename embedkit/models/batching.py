"""Length-sorted batching, shared by the torch and ONNX encoders (no torch import here)."""

from __future__ import annotations

from typing import Iterator, Sequence


def length_sorted_batches(id_lists: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """Row indices in batches of similar token length (longest first), so little compute goes to padding."""
    order = sorted(range(len(id_lists)), key=lambda i: -len(id_lists[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]
