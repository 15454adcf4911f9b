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
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from embedkit.train.loss import LossOutput


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


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def embed_chunks(encoder, id_lists: Sequence[Sequence[int]], size: int, *, grad: bool,
                 states: list[RngState] | None = None) -> torch.Tensor:
    """Embed token-id lists sub-batch by sub-batch; records an RngState per sub-batch into `states`."""
    out = []
    for part in chunks(id_lists, size):
        if states is not None:
            states.append(RngState())
        with torch.set_grad_enabled(grad):
            out.append(encoder(encoder.collate(part)))
    return torch.cat(out)


def expand_documents(embeddings: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Real-document embeddings [n_real, dim] -> the loss layout [len(valid), dim], zeros in padded slots."""
    if valid is None:
        return embeddings
    if int(valid.sum()) != embeddings.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} document embeddings for {int(valid.sum())} real slots")
    full = embeddings.new_zeros((valid.shape[0], embeddings.shape[1]))
    return full.index_put((valid.nonzero().squeeze(1),), embeddings)  # differentiable w.r.t. embeddings


def embed_length_sorted(encoder, id_lists: Sequence[Sequence[int]], size: int) -> torch.Tensor:
    """Embed with autograd in chunks of `size` texts of similar length, rows returned in the original order.

    Each chunk is padded only to its own longest text, so a batch of mixed lengths (short answers beside
    truncated long ones) spends far less compute on padding than one forward padded to the batch's longest.
    The embeddings are those of a single forward (attention masks make each row independent of its neighbours),
    only the dropout masks are drawn differently.
    """
    from embedkit.models.batching import length_sorted_batches

    order: list[int] = []
    parts = []
    for rows in length_sorted_batches(id_lists, size):
        order.extend(rows)
        parts.append(encoder(encoder.collate([id_lists[i] for i in rows])))
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


def _embed_with_grad(encoder, id_lists, mini_batch: int | None, length_chunk: int | None) -> torch.Tensor:
    if length_chunk and not mini_batch and chunking_saves(id_lists, length_chunk):
        with torch.enable_grad():
            return embed_length_sorted(encoder, id_lists, length_chunk)
    return embed_chunks(encoder, id_lists, mini_batch or len(id_lists), grad=True)


def plain_step(encoder, loss_fn: Callable[..., LossOutput], query_ids, document_ids, *, mini_batch: int | None = None,
               length_chunk: int | None = None, loss_scale: float = 1.0, **loss_kwargs: Any) -> LossOutput:
    """Forward with autograd (queries, then documents), loss, backward.

    `mini_batch` splits the forward in input order; `length_chunk` instead forwards length-sorted chunks of that
    many texts when that removes enough padding (`chunking_saves`). Either changes only how the forward is cut:
    the loss is the same up to dropout masks.
    """
    q = _embed_with_grad(encoder, query_ids, mini_batch, length_chunk)
    d = _embed_with_grad(encoder, document_ids, mini_batch, length_chunk)
    out = loss_fn(q, expand_documents(d, loss_kwargs.get("document_valid")), **loss_kwargs)
    (out.loss * loss_scale).backward()
    out.loss = out.loss.detach()
    return out


def cached_step(encoder, loss_fn: Callable[..., LossOutput], query_ids, document_ids, *, mini_batch: int,
                loss_scale: float = 1.0, replay_rng: bool = True, **loss_kwargs: Any) -> LossOutput:
    """One GradCache step: accumulates exactly the plain (sub-batched) gradients into the parameters."""
    q_states: list[RngState] = []
    d_states: list[RngState] = []
    with torch.no_grad():
        q = embed_chunks(encoder, query_ids, mini_batch, grad=False, states=q_states)
        d = embed_chunks(encoder, document_ids, mini_batch, grad=False, states=d_states)
    q = q.detach().requires_grad_(True)
    d = d.detach().requires_grad_(True)
    out = loss_fn(q, expand_documents(d, loss_kwargs.get("document_valid")), **loss_kwargs)
    (out.loss * loss_scale).backward()  # grads of the embeddings (and of a learned temperature)
    for id_lists, states, cached in ((query_ids, q_states, q.grad), (document_ids, d_states, d.grad)):
        for part, state, grad in zip(chunks(id_lists, mini_batch), states, cached.split(mini_batch)):
            if replay_rng:
                with state.replay():
                    emb = encoder(encoder.collate(part))
            else:
                emb = encoder(encoder.collate(part))
            emb.backward(grad)
    out.loss = out.loss.detach()
    return out
