"""Documents packed into one training sequence, kept apart (``train.doc_mask``): each token attends
only to earlier tokens of its own document, and positions (RoPE) restart at each document's first token.

Training streams frame documents ``[BOS] ids EOS`` (:mod:`hone.tokens.conventions`), so the
boundaries come from the ids alone: the token after an EOS starts the next document, and a
sequence that begins inside a document starts that document at position 0.

    pos, doc = document_positions(ids, eos_id)            # [B, T] each; what a pipeline stage > 0 is given
    mask = attention_mask(doc, window=None, flex=False)    # bool [B, 1, T, T] for SDPA (the CPU's exact path)
    mask = attention_mask(doc, window=4096, flex=True)     # a flex_attention BlockMask (CUDA)

The model learns the EOS id from its ``doc_eos_id`` attribute (None: plain causal attention over the
whole sequence), set by the trainer from the run's token streams (:func:`set_doc_eos_id`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

# Devices whose attention over packed documents runs flex_attention with a block mask (compiled);
# elsewhere an exact boolean mask goes to SDPA. A module constant so a test can route the CPU
# through flex_attention's eager reference and check the block mask against the dense one.
FLEX_DEVICES: tuple[str, ...] = ("cuda",)


def document_positions(input_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(position_ids, document_ids)``, int64 ``[B, T]`` each, of packed ``input_ids [B, T]``:
    document k of a row has document id k (from 0) and positions 0, 1, ... from its first token."""
    b, t = input_ids.shape
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    document_ids = starts.long().cumsum(dim=1)
    index = torch.arange(t, device=input_ids.device).expand(b, t)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # each token's document start
    return index - first, document_ids


def uses_flex(device: torch.device) -> bool:
    return device.type in FLEX_DEVICES


def attention_mask(document_ids: torch.Tensor, window: int | None = None, *, flex: bool = False):
    """Block-causal attention within each document (and within the last ``window`` positions when
    given: a sliding-window layer): a ``BlockMask`` for flex_attention with ``flex``, else a
    boolean ``[B, 1, T, T]`` mask (True: attend) for SDPA."""
    if flex:
        return _block_mask(document_ids, window)
    t = document_ids.shape[1]
    q = torch.arange(t, device=document_ids.device)[:, None]
    k = torch.arange(t, device=document_ids.device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    same = document_ids[:, :, None] == document_ids[:, None, :]
    return (allowed & same)[:, None]


def _block_mask(document_ids: torch.Tensor, window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        keep = (kv_idx <= q_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep

    b, t = document_ids.shape
    # Compiled mask construction on the GPU: the eager one materializes a [B, T, T] tensor.
    return create_block_mask(mask_mod, B=b, H=None, Q_LEN=t, KV_LEN=t, device=document_ids.device,
                             _compile=document_ids.is_cuda)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """flex_attention of ``q [B, H, T, D]`` over ``k, v [B, H_kv, T, D]`` (GQA read in place), compiled
    on the GPU (eager flex_attention is a slow reference that materializes the scores).

    Autocast does not cover flex_attention: q and k (rotated against fp32 tables, so promoted to
    fp32) are cast to v's dtype, the projections' (bf16 under autocast), as SDPA's autocast would."""
    q, k = q.to(v.dtype), k.to(v.dtype)
    return _flex_fn(q.is_cuda)(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


@functools.cache
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False) if compiled else flex


def set_doc_eos_id(model: nn.Module, eos_id: int | None) -> str | None:
    """Keep packed documents apart in ``model``'s training forward (``model(ids, targets)``) at
    ``eos_id``, or attend over the whole sequence with None (a DDP wrapper's module is set).
    Returns why the model cannot keep them apart (it then attends over the whole sequence), else None."""
    inner = getattr(model, "module", model)
    refusal = getattr(inner, "packed_documents_refusal", lambda: None)() if eos_id is not None else None
    inner.doc_eos_id = eos_id if refusal is None else None
    return refusal
