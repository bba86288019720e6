"""Linear + cross-entropy fused over chunks of tokens: the [tokens, vocab] logits never
exist at once, and never in fp32.

The usual ``F.cross_entropy(lm_head(h).float(), y)`` keeps bf16 logits for the backward
and makes an fp32 copy: at vocabulary 128k, 8k tokens per micro-batch that is 6 GiB.
Here each chunk's logits are computed, turned into the loss and the gradients of the
hidden states and of the head at once (the loss is a weighted sum of per-token losses
with weights known in advance, as in Liger-Kernel's fused linear cross-entropy), and
freed. The backward pass only scales the stored gradients by the incoming scalar.

``softcap`` c applies final-logit soft-capping first, ``c * tanh(logits / c)`` (Gemma 2 / 3),
with its derivative ``1 - tanh^2`` folded into the stored gradients.

Speed (issue 17): eagerly, the element-wise work on a chunk's fp32 logits (cast, logsumexp,
gather, exp, one-hot, scale, cast back) is about six passes over memory; compiled
(``compile=True``, the default on CUDA) it is fused into a couple of kernels. The head's
gradient is accumulated in fp32 by the matmul itself (``addmm`` with ``beta = 1``), not by a
separate add of a temporary.
"""

from __future__ import annotations

import functools

import torch

IGNORE_INDEX = -100  # a target that counts for nothing (padding), as F.cross_entropy's default


def _chunk_loss_and_grad(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, token_weight: float,
                         softcap: float | None, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-token losses in the accumulation dtype, d(loss)/d(logits) in h's dtype or None) of one chunk."""
    acc = torch.promote_types(h.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    logits = (h @ weight.t()).to(acc)
    tanh = None
    if softcap is not None:  # logits <- c * tanh(z / c); keep tanh for the derivative
        tanh = torch.tanh(logits / softcap)
        logits = tanh * softcap
    keep = y != IGNORE_INDEX
    y = torch.where(keep, y, 0)
    lse = torch.logsumexp(logits, dim=-1)
    per_token = torch.where(keep, lse - logits.gather(1, y[:, None]).squeeze(1), 0.0)
    if not need_grad:
        return per_token, None
    # d(loss)/d(logits) = w * (softmax - onehot); out of place so a compiler can fuse it all.
    onehot = torch.nn.functional.one_hot(y, logits.shape[1]).to(acc)
    grad_logits = torch.exp(logits - lse[:, None]) - onehot
    if tanh is not None:
        grad_logits = grad_logits * (1.0 - tanh * tanh)
    scale = keep.to(acc)[:, None] * token_weight
    return per_token, (grad_logits * scale).to(h.dtype)


def _chunk_eager(h, weight, y, token_weight, softcap, need_grad):
    """The eager chunk: the same maths, in place on the one fp32 buffer (least memory)."""
    acc = torch.promote_types(h.dtype, torch.float32)
    logits = (h @ weight.t()).to(acc)
    if softcap is not None:
        tanh = logits.div_(softcap).tanh_()
        logits = tanh * softcap
    keep = y != IGNORE_INDEX
    y = torch.where(keep, y, 0)
    lse = torch.logsumexp(logits, dim=-1)
    per_token = (lse - logits.gather(1, y[:, None]).squeeze(1)).mul_(keep)
    if not need_grad:
        return per_token, None
    grad_logits = logits.sub_(lse[:, None]).exp_()
    grad_logits[torch.arange(len(y), device=y.device), y] -= 1.0
    if softcap is not None:
        grad_logits.mul_(tanh.square_().neg_().add_(1.0))
    return per_token, grad_logits.mul_(keep.to(acc)[:, None] * token_weight).to(h.dtype)


@functools.cache
def _chunk_compiled():
    # Default dynamic shapes: one graph for the full chunks, at most one more (dynamic in the
    # token count) for shorter last chunks, whatever the batch.
    return torch.compile(_chunk_loss_and_grad)


@functools.cache
def _cuda_fp32_addmm() -> bool:
    """Whether this PyTorch accumulates a bf16 product into an fp32 tensor in one cuBLAS call."""
    try:
        a = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
        c = torch.zeros(2, 2, device="cuda")
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        return bool(c[0, 0] == 2)
    except (RuntimeError, TypeError):
        return False


def _accumulate(grad_weight: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
    """``grad_weight += grad_logits.T @ h`` in grad_weight's (fp32) precision, in one pass."""
    if grad_logits.dtype == grad_weight.dtype:
        grad_weight.addmm_(grad_logits.t(), h)
    elif grad_weight.is_cuda and _cuda_fp32_addmm():
        torch.addmm(grad_weight, grad_logits.t(), h, out_dtype=grad_weight.dtype, out=grad_weight)
    else:  # CPU with a low-precision compute dtype: upcast the operands (exact, slower)
        grad_weight.addmm_(grad_logits.t().to(grad_weight.dtype), h.to(grad_weight.dtype))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weight: float, chunk: int, softcap: float | None,
                compile: bool):
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        per_token = torch.empty(n, dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) \
            if weight.requires_grad else None
        need_grad = grad_hidden is not None or grad_weight is not None
        # Only training compiles: evaluation's no-gradient pass is one matmul and a logsumexp.
        step = _chunk_compiled() if compile and need_grad else _chunk_eager
        for lo in range(0, n, chunk):
            h = hidden[lo:lo + chunk]
            per_token[lo:lo + chunk], grad_logits = step(h, weight, targets[lo:lo + chunk], token_weight, softcap,
                                                         need_grad)
            if grad_hidden is not None:
                grad_hidden[lo:lo + chunk] = grad_logits @ weight
            if grad_weight is not None:
                _accumulate(grad_weight, grad_logits, h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        loss = per_token.sum() * token_weight
        ctx.mark_non_differentiable(per_token)
        return loss, per_token

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               token_weight: float, chunk: int = 4096, softcap: float | None = None,
                               compile: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i token_weight * CE_i, CE per token)`` for ``hidden [N, H]``, head ``weight [V, H]``.

    Equal to ``F.cross_entropy(hidden @ weight.T, targets, reduction="none")`` (computed in
    fp32 from the matmul's dtype), with gradients for ``hidden`` and ``weight``; the
    per-token losses carry no gradient; a target ``IGNORE_INDEX`` (-100) has loss 0 and no gradient
    (``token_weight`` is not renormalized: the caller chooses it). ``softcap`` c: the logits are
    ``c * tanh(hidden @ weight.T / c)``.
    ``compile``: run each chunk's element-wise work as one compiled graph (None: on CUDA only, where
    a compiler is always at hand; on CPU Inductor needs a C++ compiler).
    """
    # Under autocast the matmuls run in its dtype (as nn.Linear would); the Function itself
    # runs with autocast off so its buffers have the dtypes chosen here.
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else hidden.dtype
    if compile is None:
        compile = hidden.is_cuda
    with torch.autocast(hidden.device.type, enabled=False):
        cap = None if softcap is None else float(softcap)
        return _FusedLinearCrossEntropy.apply(hidden.to(dtype), weight.to(dtype), targets, float(token_weight),
                                              int(chunk), cap, bool(compile))
