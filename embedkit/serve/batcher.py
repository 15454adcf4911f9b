"""Dynamic micro-batching: concurrent requests share model calls, run one at a time by one worker thread, fairly.

Requests hand their token-id lists to the batcher and await a future. (A row may be anything whose len() is its
token count, which is all the batcher reads of it: /v1/rerank's (query, document) pairs are batched the same way.) A scheduler task builds one model call at a
time from every request that still has texts waiting and, while the worker thread runs it, new requests join the
pool for the next call. A call is filled least-served first (`fill_call`): the request that has had the fewest
tokens embedded so far goes first, so a request that just arrived is in the very next call, then the others, each
giving its longest waiting texts, while the call stays within its token budget (rows x longest row), `max_batch_size`
rows and `max_padding`. A one-text request therefore waits for at most the call in progress, never for the rest of a
2,048-text request, and under load a call holds the texts of many requests (throughput approaches in-process batched
speed).

The call in progress cannot be interrupted, so calls are sized by time: the token budget is what the model embeds in
about `call_seconds` at its measured speed (between `min_call_tokens` and `max_batch_tokens`).

Shutdown: `expire_in(seconds)` makes requests still waiting after that time fail with BatcherClosed (the server
answers 503), so that nothing is still running when the server's grace period ends. Until then calls are filled
closest-to-done first instead: sharing the model fairly would leave every request half done at the deadline, while
this finishes as many as the time allows. `stop()` finishes what is left.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from embedkit.models.tokenization import length_order


class BatcherClosed(RuntimeError):
    """The server is shutting down and takes no new work."""


class _Request:
    """One caller's texts: which are waiting, what has been computed, how much model time it has had."""

    __slots__ = ("id_lists", "future", "seq", "owner", "order", "handed", "served", "total", "finished", "out")

    def __init__(self, id_lists: Sequence[Sequence[int]], future: asyncio.Future, seq: int, owner: Any = None) -> None:
        self.id_lists = id_lists
        self.future = future
        self.seq = seq
        self.owner = owner  # the BatcherLane it came through (None: the batcher's own embed)
        self.order = length_order(id_lists)  # longest first
        self.handed = 0  # rows of `order` given to model calls so far
        self.served = 0  # tokens given to model calls so far: the fairness key
        self.total = sum(len(ids) for ids in id_lists)
        self.finished = 0  # rows computed
        self.out: np.ndarray | None = None

    @property
    def waiting_lengths(self) -> list[int]:
        return [len(self.id_lists[i]) for i in self.order[self.handed:]]

    @property
    def waiting(self) -> bool:
        return self.handed < len(self.order) and not self.future.done()


class MicroBatcher:
    def __init__(
        self,
        embed_ids: Callable[[Sequence[Sequence[int]]], np.ndarray],
        *,
        name: str = "model",
        max_batch_tokens: int = 16384,
        max_batch_size: int = 128,
        max_padding: float = 0.2,
        call_seconds: float = 0.1,
        min_call_tokens: int = 256,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self._embed_ids = embed_ids
        self.name = name
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_size = int(max_batch_size)
        self.max_padding = float(max_padding)
        self.call_seconds = float(call_seconds)
        self.min_call_tokens = int(min_call_tokens)
        self._on_batch = on_batch
        self._requests: list[_Request] = []
        self._seq = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False  # stop(): no new requests, finish the queued ones
        self._draining = False  # shutdown has begun: finish as many requests as possible before the deadline
        self._expired = False  # the shutdown deadline passed: no new requests, waiting ones failed
        self._expiry: asyncio.TimerHandle | None = None
        self._seconds_per_token: float | None = None  # measured model speed, padded tokens
        self.lanes: set[BatcherLane] = set()  # the started lanes of the names that share this batcher

    @property
    def queue_depth(self) -> int:
        """Requests with texts not yet given to the model."""
        return sum(1 for request in self._requests if request.waiting)

    def queue_depth_of(self, owner: Any) -> int:
        """Requests of one lane with texts not yet given to the model."""
        return sum(1 for request in self._requests if request.waiting and request.owner is owner)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def call_tokens(self) -> int:
        """The padded-token budget of the next model call: about `call_seconds` of work at the measured speed."""
        if self._seconds_per_token is None:
            budget = self.min_call_tokens
        else:
            budget = max(self.min_call_tokens, int(self.call_seconds / self._seconds_per_token))
        return max(1, min(self.max_batch_tokens, budget))

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-{self.name}")
        self._closed = self._draining = self._expired = False
        self._task = asyncio.create_task(self._schedule(), name=f"batcher-{self.name}")

    async def embed(self, id_lists: Sequence[Any], owner: Any = None) -> np.ndarray:
        """Vectors for these token-id lists, computed in shared model calls; rows in the given order."""
        if self._closed or self._expired or self._wake is None:
            raise BatcherClosed("the server is shutting down")
        if not id_lists:
            return np.empty((0, 0), dtype=np.float32)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._seq += 1
        self._requests.append(_Request(id_lists, future, self._seq, owner))
        self._wake.set()
        return await future

    def expire_in(self, seconds: float) -> None:
        """Shutdown has begun: requests with texts still waiting `seconds` from now fail with BatcherClosed.

        The model call in progress then still finishes (and completes the requests it holds the last texts of).
        """
        if self._wake is None or self._expiry is not None:
            return
        self._draining = True
        self._expiry = asyncio.get_running_loop().call_later(max(0.0, seconds), self._expire)

    async def stop(self) -> None:
        """Finish everything already queued, then stop the worker."""
        if self._wake is None or self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._expiry is not None:
            self._expiry.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ internals
    def _expire(self) -> None:
        self._expired = True
        for request in self._requests:
            if request.waiting:
                request.future.set_exception(BatcherClosed("the server is shutting down"))
        assert self._wake is not None
        self._wake.set()

    async def _schedule(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            self._requests = [r for r in self._requests if not r.future.done()]  # answered, failed or gone
            priority = ((lambda r: (r.total - r.served, r.seq)) if self._draining  # closest to done first
                        else (lambda r: (r.served, r.seq)))  # least served first: fair, new requests go next
            waiting = sorted((r for r in self._requests if r.waiting), key=priority)
            if not waiting:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            counts = fill_call([r.waiting_lengths for r in waiting], max_tokens=self.call_tokens,
                               max_rows=self.max_batch_size, max_padding=self.max_padding)
            call: list[tuple[_Request, int]] = []
            for request, count in zip(waiting, counts):
                rows = request.order[request.handed : request.handed + count]
                request.handed += count
                request.served += sum(len(request.id_lists[i]) for i in rows)
                call += [(request, i) for i in rows]
            try:
                vectors = await loop.run_in_executor(self._executor, self._run_call,
                                                     [request.id_lists[i] for request, i in call])
            except Exception as exc:  # the model failed: every request in the call gets the error
                for request in {request for request, _ in call}:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            for (request, i), vector in zip(call, vectors):
                if request.future.done():  # the client went away, or the shutdown deadline passed
                    continue
                if request.out is None:
                    request.out = np.empty((len(request.id_lists), vectors.shape[1]), dtype=np.float32)
                request.out[i] = vector
                request.finished += 1
                if request.finished == len(request.id_lists):
                    request.future.set_result(request.out)

    def _run_call(self, id_lists: list[Sequence[int]]) -> np.ndarray:
        """Worker thread: one model call; its speed sizes the next calls."""
        padded = len(id_lists) * max(1, max(len(ids) for ids in id_lists))
        began = time.perf_counter()
        vectors = np.asarray(self._embed_ids(id_lists), dtype=np.float32)
        seconds = time.perf_counter() - began
        if padded >= self.min_call_tokens // 4:  # tiny calls measure per-call overhead, not speed
            observed = seconds / padded
            previous = self._seconds_per_token
            self._seconds_per_token = observed if previous is None else 0.7 * previous + 0.3 * observed
        if self._on_batch is not None:
            self._on_batch(len(id_lists), padded, seconds)
        return vectors

    def stats(self) -> dict[str, Any]:
        return {"queue_depth": self.queue_depth, "max_batch_tokens": self.max_batch_tokens,
                "max_batch_size": self.max_batch_size, "call_tokens": self.call_tokens}


class TaggedRow:
    """A row that came through a BatcherLane: its token ids and its lane's tag (the LoRA adapter it is embedded
    with). Its len() is its token count, all the batcher reads of a row."""

    __slots__ = ("ids", "tag")

    def __init__(self, ids: Sequence[int], tag: Any) -> None:
        self.ids, self.tag = ids, tag

    def __len__(self) -> int:
        return len(self.ids)


class BatcherLane:
    """One served name's way into a MicroBatcher it shares with other names, with the same methods the server calls
    on a batcher of its own.

    A base and its LoRA adapters are one model in memory, so one batcher fills each model call from all their
    requests (least served first, as for one name) and the call embeds each row with its own adapter: 8 requests
    for 8 adapters make one call of 8 requests' rows, as 8 requests for one merged model would, where a batcher per
    adapter made 8 calls of one request each, in 8 threads taking turns on one model (0.57x a merged model's
    throughput at concurrency 8, bench/records/serve/adapters-minilm-inplace.json). The lane's rows reach the model
    as TaggedRow(ids, tag). The first lane started starts the shared batcher; a lane stopped alone (an adapter
    removed at run time) has its queued requests answered and refuses new ones; the last one stops the batcher.
    """

    def __init__(self, shared: MicroBatcher, tag: Any) -> None:
        self.shared, self.tag = shared, tag
        self.name = shared.name
        self._closed = False
        self._pending = 0
        self._idle: asyncio.Event | None = None

    @property
    def queue_depth(self) -> int:
        return self.shared.queue_depth_of(self)

    async def start(self) -> None:
        self._closed, self._idle = False, asyncio.Event()
        self._idle.set()
        if not self.shared.running:
            await self.shared.start()
        self.shared.lanes.add(self)

    async def embed(self, id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        if self._closed or self._idle is None:
            raise BatcherClosed("the server is shutting down")
        self._pending += 1
        self._idle.clear()
        try:
            return await self.shared.embed([TaggedRow(ids, self.tag) for ids in id_lists], owner=self)
        finally:
            self._pending -= 1
            if not self._pending:
                self._idle.set()

    def expire_in(self, seconds: float) -> None:
        self.shared.expire_in(seconds)

    async def stop(self) -> None:
        """Answer this lane's queued requests, refuse new ones; the last lane stops the shared batcher."""
        if self._closed or self._idle is None:
            return
        self._closed = True
        await self._idle.wait()
        self.shared.lanes.discard(self)
        if not self.shared.lanes:
            await self.shared.stop()


def fill_call(waiting: Sequence[Sequence[int]], *, max_tokens: int, max_rows: int, max_padding: float = 0.2,
              min_rows: int = 8) -> list[int]:
    """How many texts each request gives to the next model call.

    `waiting` holds, per request in priority order, the token lengths of its waiting texts, longest first; each
    request gives a prefix of them. The call takes the first request's first text whatever its size (so every call
    makes progress), then texts in order while the call stays within `max_tokens` padded tokens (rows x longest row)
    and `max_rows` rows and, once it has `min_rows` rows, while padding stays within `max_padding` of it. A request
    stops giving at its first text that does not fit (its later texts are shorter and would pad more), and the next
    request is tried. Returns one count per request.
    """
    counts = [0] * len(waiting)
    rows = width = real = 0
    for r, lengths in enumerate(waiting):
        for n in lengths:
            new_rows, new_width = rows + 1, max(width, n, 1)
            fits = (new_rows <= max_rows and new_rows * new_width <= max_tokens
                    and (new_rows <= min_rows or 1 - (real + n) / (new_rows * new_width) <= max_padding))
            if rows and not fits:
                break
            counts[r] += 1
            rows, width, real = new_rows, new_width, real + n
        if rows >= max_rows:
            break
    return counts
