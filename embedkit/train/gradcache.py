"""GradCache: a large contrastive batch in the memory of a small one (Gao et al., 2021).

1. Embed every sub-batch without autograd, recording the RNG state before each (dropout masks).
2. Compute the loss on the concatenated embeddings and its gradient w.r.t. those embeddings (cheap: [B, dim]).
3. Re-run each sub-batch with autograd under its recorded RNG state, and backpropagate the cached embedding
   gradient into it. Only one sub-batch's activations are alive at any time.

The result equals the plain loss on the whole batch (same dropout masks as a sub-batched forward), at the cost of
a second forward pass.

Padded negative slots (rows short of hard negatives): pass `document_valid` (bool, one per slot of the loss layout)
and only the real documents in `document_ids`; they are embedded alone (no compute spent on padding) and scattered
into the full layout with zero rows in the padded slots, which the loss then leaves out.

Both steps take a `runner`: the training engine (embedkit/train/engine.py), which calls the wrapped model (DDP,
DeepSpeed, FSDP) under autocast, synchronises gradients only on a step's last backward and applies loss scaling;
without one (tests, a quick script) the encoder is called directly with plain autograd.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence

import torch

from embedkit.train.losses import LossOutput


class RngState:
    """The CPU (and, when present, CUDA) RNG state at construction; `replay()` runs a block under it."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        devices = list(range(torch.cuda.device_count())) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):  # the outer stream continues as if nothing ran
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


class DirectRunner:
    """The engine's step interface for a bare encoder: one process, plain autograd."""

    sync_gradients = True

    def __init__(self, model) -> None:
        self.model = model

    def autocast(self):
        return nullcontext()

    def sync(self, last: bool = True):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def backward_detached(self, loss: torch.Tensor) -> None:
        loss.backward()

    def backward_from(self, outputs: torch.Tensor, grads: torch.Tensor) -> None:
        outputs.backward(grads)


def chunks(items: Sequence, size: int | None) -> list[Sequence]:
    size = size or len(items) or 1
    return [items[i:i + size] for i in range(0, len(items), size)]


def _forward(runner, encoder, id_lists) -> torch.Tensor:
    with runner.autocast():
        return runner.model(encoder.collate(id_lists)).float()


def embed_chunks(encoder, id_lists: Sequence[Sequence[int]], size: int, *, grad: bool,
                 states: list[RngState] | None = None, runner=None) -> torch.Tensor:
    """Embed token-id lists sub-batch by sub-batch; records an RngState per sub-batch into `states`."""
    runner = runner or DirectRunner(encoder)
    out = []
    for part in chunks(id_lists, size):
        if states is not None:
            states.append(RngState())
        with torch.set_grad_enabled(grad):
            out.append(_forward(runner, encoder, part))
    return torch.cat(out)


def expand_documents(embeddings: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Real-document embeddings [n_real, dim] -> the loss layout [len(valid), dim], zeros in padded slots."""
    if valid is None:
        return embeddings
    if int(valid.sum()) != embeddings.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} document embeddings for {int(valid.sum())} real slots")
    full = embeddings.new_zeros((valid.shape[0], embeddings.shape[1]))
    return full.index_put((valid.nonzero().squeeze(1),), embeddings)  # differentiable w.r.t. embeddings


def embed_length_sorted(encoder, id_lists: Sequence[Sequence[int]], size: int, *, runner=None) -> torch.Tensor:
    """Embed with autograd in chunks of `size` texts of similar length, rows returned in the original order.

    Each chunk is padded only to its own longest text, so a batch of mixed lengths (short answers beside
    truncated long ones) spends far less compute on padding than one forward padded to the batch's longest.
    The embeddings are those of a single forward (attention masks make each row independent of its neighbours),
    only the dropout masks are drawn differently.
    """
    from embedkit.models.tokenization import length_sorted_batches

    runner = runner or DirectRunner(encoder)
    order: list[int] = []
    parts = []
    for rows in length_sorted_batches(id_lists, size):
        order.extend(rows)
        parts.append(_forward(runner, encoder, [id_lists[i] for i in rows]))
    embeddings = torch.cat(parts)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return embeddings[inverse.to(embeddings.device)]


# Chunking pays only when it removes a lot of padding: smaller forwards run less efficiently on CPU.
CHUNK_MIN_SAVED_FRACTION = 0.2
CHUNK_MIN_SAVED_TOKENS = 2048


def chunking_saves(id_lists: Sequence[Sequence[int]], size: int) -> bool:
    """Would length-sorted chunks of `size` cut the padded tokens of one forward by enough to be faster?"""
    lengths = sorted((len(ids) for ids in id_lists), reverse=True)
    if len(lengths) <= size:
        return False
    whole = len(lengths) * lengths[0]
    chunked = sum(len(lengths[i:i + size]) * lengths[i] for i in range(0, len(lengths), size))
    saved = whole - chunked
    return saved >= CHUNK_MIN_SAVED_TOKENS and saved >= CHUNK_MIN_SAVED_FRACTION * whole


def _embed_with_grad(encoder, id_lists, mini_batch: int | None, length_chunk: int | None, runner) -> torch.Tensor:
    if length_chunk and not mini_batch and chunking_saves(id_lists, length_chunk):
        with torch.enable_grad():
            return embed_length_sorted(encoder, id_lists, length_chunk, runner=runner)
    return embed_chunks(encoder, id_lists, mini_batch or len(id_lists), grad=True, runner=runner)


def plain_step(encoder, loss_fn: Callable[..., LossOutput], query_ids, document_ids, *, mini_batch: int | None = None,
               length_chunk: int | None = None, loss_scale: float = 1.0, runner=None, last: bool = True,
               **loss_kwargs: Any) -> LossOutput:
    """Forward with autograd (queries, then documents), loss, backward.

    `mini_batch` splits the forward in input order; `length_chunk` instead forwards length-sorted chunks of that
    many texts when that removes enough padding (`chunking_saves`). Either changes only how the forward is cut:
    the loss is the same up to dropout masks. `last` False: more backwards follow before the optimizer step (the
    engine synchronises gradients on the last one only).
    """
    runner = runner or DirectRunner(encoder)
    with runner.sync(last=last):
        q = _embed_with_grad(encoder, query_ids, mini_batch, length_chunk, runner)
        d = _embed_with_grad(encoder, document_ids, mini_batch, length_chunk, runner)
        out = loss_fn(q, expand_documents(d, loss_kwargs.get("document_valid")), **loss_kwargs)
        runner.backward(out.loss * loss_scale)
    out.loss = out.loss.detach()
    return out


def cached_step(encoder, loss_fn: Callable[..., LossOutput], query_ids, document_ids, *, mini_batch: int,
                loss_scale: float = 1.0, replay_rng: bool = True, runner=None, last: bool = True,
                **loss_kwargs: Any) -> LossOutput:
    """One GradCache step: accumulates exactly the plain (sub-batched) gradients into the parameters."""
    runner = runner or DirectRunner(encoder)
    q_states: list[RngState] = []
    d_states: list[RngState] = []
    with torch.no_grad():
        q = embed_chunks(encoder, query_ids, mini_batch, grad=False, states=q_states, runner=runner)
        d = embed_chunks(encoder, document_ids, mini_batch, grad=False, states=d_states, runner=runner)
    q = q.detach().requires_grad_(True)
    d = d.detach().requires_grad_(True)
    out = loss_fn(q, expand_documents(d, loss_kwargs.get("document_valid")), **loss_kwargs)
    runner.backward_detached(out.loss * loss_scale)  # grads of the embeddings (and of a learned temperature)
    jobs = [(part, state, grad)
            for id_lists, states, cached in ((query_ids, q_states, q.grad), (document_ids, d_states, d.grad))
            for part, state, grad in zip(chunks(id_lists, mini_batch), states, cached.split(mini_batch))]
    for i, (part, state, grad) in enumerate(jobs):
        with runner.sync(last=last and i == len(jobs) - 1), (state.replay() if replay_rng else nullcontext()):
            emb = _forward(runner, encoder, part)
            runner.backward_from(emb, grad)
    out.loss = out.loss.detach()
    return out
