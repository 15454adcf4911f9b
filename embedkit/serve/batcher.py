"""Dynamic micro-batching: concurrent requests are merged into token-budgeted batches run by one worker thread.

Requests put their token ids on an asyncio queue and await a future. A collector task takes what is queued (up to
`max_batch_tokens` real tokens per round, at least one request), hands the merged round to a single worker thread,
and, while that thread runs the model, new requests pile up for the next round. The worker sorts the round's
sequences by length and cuts them into sub-batches whose padded size (rows x longest row) stays within the budget
and whose padding stays small (`padding_aware_splits`), so one long input does not pad a hundred short ones. Under
load a round holds many requests and throughput approaches in-process batched speed; with a single client a round is
one request and latency is one model call.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np


class BatcherClosed(RuntimeError):
    """The server is shutting down and takes no new work."""


class MicroBatcher:
    def __init__(
        self,
        embed_ids: Callable[[Sequence[Sequence[int]]], np.ndarray],
        *,
        name: str = "model",
        max_batch_tokens: int = 16384,
        max_batch_size: int = 128,
        max_padding: float = 0.2,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self._embed_ids = embed_ids
        self.name = name
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_size = int(max_batch_size)
        self.max_padding = float(max_padding)
        self._on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._pending: tuple[list, asyncio.Future, int] | None = None  # taken from the queue, over this round's budget

    @property
    def queue_depth(self) -> int:
        return (self._queue.qsize() if self._queue is not None else 0) + (1 if self._pending else 0)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-{self.name}")
        self._closed = False
        self._task = asyncio.create_task(self._collect(), name=f"batcher-{self.name}")

    async def embed(self, id_lists: list[list[int]]) -> np.ndarray:
        """Vectors for these token-id lists, computed in some merged batch; rows in the given order."""
        if self._closed or self._queue is None:
            raise BatcherClosed("the server is shutting down")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((id_lists, future, sum(len(ids) for ids in id_lists)))
        return await future

    async def stop(self) -> None:
        """Finish everything already queued, then stop the worker."""
        if self._queue is None or self._closed:
            return
        self._closed = True
        await self._queue.put(None)
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ internals
    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        stopping = False
        while True:
            if self._pending is not None:
                first, self._pending = self._pending, None
            else:
                if stopping and self._queue.empty():
                    return
                first = await self._queue.get()
                if first is None:
                    stopping = True
                    continue
            round_items = [first]
            tokens = first[2]
            while tokens < self.max_batch_tokens and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stopping = True
                    continue
                if tokens + item[2] > self.max_batch_tokens:
                    self._pending = item  # starts the next round
                    break
                round_items.append(item)
                tokens += item[2]
            live = [item for item in round_items if not item[1].done()]  # a client may have gone away
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._compute, [item[0] for item in live])
            except Exception as exc:  # the model failed: every request of the round gets the error
                for _, future, _ in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future, _), vectors in zip(live, results):
                if not future.done():
                    future.set_result(vectors)

    def _compute(self, requests: list[list[list[int]]]) -> list[np.ndarray]:
        """Worker thread: one round -> length-sorted, token-budgeted sub-batches -> vectors per request."""
        flat = [(r, i, ids) for r, id_lists in enumerate(requests) for i, ids in enumerate(id_lists)]
        flat.sort(key=lambda item: -len(item[2]))
        outputs: list[np.ndarray | None] = [None] * len(requests)
        for start, stop in padding_aware_splits([len(ids) for _, _, ids in flat], max_tokens=self.max_batch_tokens,
                                                max_rows=self.max_batch_size, max_padding=self.max_padding):
            chunk = flat[start:stop]
            width = max(1, len(chunk[0][2]))
            began = time.perf_counter()
            vectors = np.asarray(self._embed_ids([ids for _, _, ids in chunk]), dtype=np.float32)
            if self._on_batch is not None:
                self._on_batch(len(chunk), len(chunk) * width, time.perf_counter() - began)
            for (r, i, _), vector in zip(chunk, vectors):
                if outputs[r] is None:
                    outputs[r] = np.empty((len(requests[r]), vectors.shape[1]), dtype=np.float32)
                outputs[r][i] = vector
        return [out if out is not None else np.empty((0, 0), dtype=np.float32) for out in outputs]

    def stats(self) -> dict[str, Any]:
        return {"queue_depth": self.queue_depth, "max_batch_tokens": self.max_batch_tokens,
                "max_batch_size": self.max_batch_size}


def padding_aware_splits(lengths: Sequence[int], *, max_tokens: int, max_rows: int, min_rows: int = 8,
                         max_padding: float = 0.2) -> list[tuple[int, int]]:
    """Cut rows sorted by length (longest first) into [start, stop) sub-batches for one model call each.

    A sub-batch stays within `max_tokens` padded tokens and `max_rows` rows, and, once it has `min_rows`, ends
    before a row that would leave more than `max_padding` of it as padding. A request of 32 texts of 8 to 40
    tokens then runs as a few calls of similar lengths instead of one call padded to 40: fewer tokens computed,
    while small calls (whose per-call overhead would dominate) are avoided.
    """
    splits: list[tuple[int, int]] = []
    start, n = 0, len(lengths)
    while start < n:
        width = max(1, lengths[start])
        limit = max(1, min(max_rows, max_tokens // width))
        stop, real = start + 1, lengths[start]
        while stop < n and stop - start < limit:
            rows = stop - start + 1
            if rows > min_rows and 1 - (real + lengths[stop]) / (rows * width) > max_padding:
                break
            real += lengths[stop]
            stop += 1
        splits.append((start, stop))
        start = stop
    return splits
