"""The one tokenization path: text -> token ids -> padded batch, for training, evaluation, ONNX and the server.

Every place that turns text into model input calls this module: `Encoder` (encode, training, the sharded encode),
`OnnxEncoder`, and the server's backends. The promise that a text gets the same vector when trained, exported and
served rests on it getting the same token ids, so there is exactly one copy of each rule:

- the prompt of the text's kind (`embedkit.models.prompts`) is prepended before tokenising;
- a tokenizer without a pad token pads with its EOS token (`ensure_pad_token`);
- last-token pooling reads the EOS state, so the tokenizer's own post-processor appends EOS (`ensure_eos_appended`):
  it is saved with the tokenizer, so sentence-transformers, vLLM and the ONNX folder append it too;
- truncation: `max_length` tokens, special tokens (CLS/SEP, the appended EOS) kept, the text's end cut; no
  `max_length` means no truncation (the server's `truncate=false` counts the tokens and refuses long inputs);
- padding is done by `collate`, on the model's padding side, to torch or numpy with the same values;
- batches are length-sorted (`length_order`, longest first) so little compute goes to padding.

Why hand-written around the Hugging Face tokenizer rather than `tokenizer(..., padding=True, return_tensors=...)`:
a fast tokenizer keeps its truncation and padding settings as mutable state (the server tokenises from several
threads, see serve.backends.ThreadSafeTokenizer), pads on its own `padding_side` attribute rather than the model's,
and the ids must be known before batching (the server and the encoders sort by length, training tokenises once).
So the tokenizer is only asked for unpadded ids, and everything around that happens here.

No torch import at module level: the ONNX encoder and the server's batcher use it without torch.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from embedkit.errors import ModelError
from embedkit.models.prompts import apply_prompt

PADDING_SIDES = ("left", "right")


# ------------------------------------------------------------------------------------------------ tokenizer setup
def ensure_pad_token(tokenizer, *, path: Any = None) -> int:
    """The pad token id; a tokenizer without one (Llama-style) pads with its EOS token. Pad positions are masked
    out, so which token pads does not change a vector; it only has to be a valid id."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError("the tokenizer has neither a pad nor an eos token", path=path)
        tokenizer.pad_token = tokenizer.eos_token
    return int(tokenizer.pad_token_id)


def ensure_eos_appended(tokenizer, *, path: Any = None) -> None:
    """Make the tokenizer end every input with EOS (last-token pooling reads the EOS state).

    Put into the tokenizer's post-processor (rather than appended in Python), so the saved tokenizer does the same
    in sentence-transformers, vLLM and ONNX pipelines, and truncation keeps room for it. A tokenizer that already
    appends EOS is left as it is. (`embedkit.llm.generate` strips this template again for chat generation.)
    """
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos_id is None:
        raise ModelError("last-token pooling needs an EOS token, and the tokenizer has none", path=path)
    if tokenizer("a")["input_ids"][-1] == eos_id:
        return
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise ModelError("last-token pooling needs a fast (tokenizers) tokenizer", path=path)
    from tokenizers import processors

    backend = tokenizer.backend_tokenizer
    append = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                           special_tokens=[(eos, eos_id)])
    existing = backend.post_processor
    backend.post_processor = processors.Sequence([existing, append]) if existing is not None else append
    if tokenizer("a")["input_ids"][-1] != eos_id:
        raise ModelError("could not make the tokenizer append EOS", path=path)


def prepare_tokenizer(tokenizer, pooling: str, *, path: Any = None) -> int:
    """Both of the above, as every encoder needs them: returns the pad id; EOS appended for a pooling that reads the
    EOS state (last-token: `appends_eos` in embedkit.models.pooling's registry). A pooling this process has not
    registered (an ONNX export of a custom pooling: the graph holds it) keeps the saved tokenizer as it is."""
    from embedkit.models.pooling import POOLINGS  # deferred: this module stays torch-free for the server's batcher

    pad_id = ensure_pad_token(tokenizer, path=path)
    if pooling in POOLINGS and POOLINGS[pooling].appends_eos:
        ensure_eos_appended(tokenizer, path=path)
    return pad_id


# ------------------------------------------------------------------------------------------------ text -> ids
def tokenize(tokenizer, texts: Sequence[str], kind: str = "document", *, prompts: dict[str, str] | None = None,
             max_length: int | None = None) -> list[list[int]]:
    """Token ids (unpadded) of the prompted texts.

    `kind`: query | document, picks the prompt from `prompts`. `max_length`: cut each input to that many tokens,
    special tokens kept (Hugging Face `truncation=True` on one sequence cuts the end); None (or 0): no truncation.
    """
    prompted = apply_prompt(list(texts), prompts or {}, kind)
    cut = {"truncation": True, "max_length": int(max_length)} if max_length else {"truncation": False}
    return tokenizer(prompted, padding=False, return_attention_mask=False, return_token_type_ids=False,
                     verbose=False, **cut)["input_ids"]


def tokenize_pairs(tokenizer, queries: Sequence[str], documents: Sequence[str], *,
                   prompts: dict[str, str] | None = None,
                   max_length: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """(input ids, token type ids) of (query, document) pairs for a cross-encoder, the pair template of the
    tokenizer ([CLS] q [SEP] d [SEP] for BERT; EOS after each for a last-token model).

    Truncation is 'longest_first' (tokens come off the longer of the two until the pair fits): what
    sentence-transformers' CrossEncoder does, so scores match a model trained there, and it never fails, whereas
    'only_second' raises when the query alone is longer than `max_length`. None (or 0): no truncation.
    """
    queries, documents = list(queries), list(documents)
    if len(queries) != len(documents):
        raise ValueError(f"{len(queries)} queries but {len(documents)} documents: pairs need one of each")
    cut = {"truncation": "longest_first", "max_length": int(max_length)} if max_length else {"truncation": False}
    out = tokenizer(apply_prompt(queries, prompts or {}, "query"), apply_prompt(documents, prompts or {}, "document"),
                    padding=False, return_attention_mask=False, return_token_type_ids=True, verbose=False, **cut)
    return out["input_ids"], out["token_type_ids"]


# ------------------------------------------------------------------------------------------------ ids -> batch
def collate(id_lists: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right", *, to: str = "torch",
            type_ids: Sequence[Sequence[int]] | None = None, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Pad token-id lists into one batch: {"input_ids", "attention_mask"} (and "token_type_ids", padded with 0,
    when `type_ids` is given), int64 [batch, longest], as torch tensors (`to="torch"`) or numpy arrays ("numpy").

    `padding_side` "left" puts the pads before the tokens (causal models; their position ids come from the mask),
    "right" after them (BERT-style encoders, whose absolute position ids would shift on the left).
    `pad_to_multiple_of`: the width rounded up to a multiple of it (an OpenVINO IR's fused attention sums a row in
    the same order alone and in a batch only then: embedkit.export.openvino.PAD_TO_MULTIPLE_OF).
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    if to not in ("torch", "numpy"):
        raise ValueError(f"to must be 'torch' or 'numpy', not {to!r}")
    rows = len(id_lists)
    width = max((len(ids) for ids in id_lists), default=0)
    if pad_to_multiple_of > 1:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = {"input_ids": np.full((rows, width), int(pad_id), dtype=np.int64),
             "attention_mask": np.zeros((rows, width), dtype=np.int64)}
    if type_ids is not None:
        batch["token_type_ids"] = np.zeros((rows, width), dtype=np.int64)
    for row, ids in enumerate(id_lists):
        n = len(ids)
        span = slice(width - n, width) if padding_side == "left" else slice(0, n)
        batch["input_ids"][row, span] = ids
        batch["attention_mask"][row, span] = 1
        if type_ids is not None:
            batch["token_type_ids"][row, span] = type_ids[row]
    if to == "torch":
        import torch

        return {key: torch.from_numpy(value) for key, value in batch.items()}
    return batch


# ------------------------------------------------------------------------------------------------ batching
def length_order(id_lists: Sequence[Sequence[int]]) -> list[int]:
    """Row indices, longest first (ties keep their order), so that a batch holds texts of similar length."""
    return sorted(range(len(id_lists)), key=lambda i: -len(id_lists[i]))


def length_sorted_batches(id_lists: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """Row indices in batches of similar token length (longest first), so little compute goes to padding."""
    order = length_order(id_lists)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]
