"""GradCache: a large contrastive batch in the memory of a small one (Gao et al., 2021).

1. Embed every sub-batch without autograd, recording the RNG state before each (dropout masks).
2. Compute the loss on the concatenated embeddings and its gradient w.r.t. those embeddings (cheap: [B, dim]).
3. Re-run each sub-batch with autograd under its recorded RNG state, and backpropagate the cached embedding
   gradient into it. Only one sub-batch's activations are alive at any time.

The result equals the plain loss on the whole batch (same dropout masks as a sub-batched forward), at the cost of
a second forward pass.
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


def plain_step(encoder, loss_fn: Callable[..., LossOutput], query_ids, document_ids, *, mini_batch: int | None = None,
               loss_scale: float = 1.0, **loss_kwargs: Any) -> LossOutput:
    """Forward with autograd (queries, then documents), loss, backward. `mini_batch` splits the forward only."""
    size_q = mini_batch or len(query_ids)
    size_d = mini_batch or len(document_ids)
    q = embed_chunks(encoder, query_ids, size_q, grad=True)
    d = embed_chunks(encoder, document_ids, size_d, grad=True)
    out = loss_fn(q, d, **loss_kwargs)
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
    out = loss_fn(q, d, **loss_kwargs)
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
