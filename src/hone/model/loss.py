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
"""

from __future__ import annotations

import torch


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weight: float, chunk: int, softcap: float | None):
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        per_token = torch.empty(n, dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) \
            if weight.requires_grad else None
        for lo in range(0, n, chunk):
            h = hidden[lo:lo + chunk]
            y = targets[lo:lo + chunk]
            logits = (h @ weight.t()).to(acc)
            if softcap is not None:  # logits <- c * tanh(z / c); keep tanh for the derivative
                tanh = logits.div_(softcap).tanh_()
                logits = tanh * softcap
            lse = torch.logsumexp(logits, dim=-1)
            per_token[lo:lo + chunk] = lse - logits.gather(1, y[:, None]).squeeze(1)
            if grad_hidden is None and grad_weight is None:
                continue
            # d(loss)/d(logits) = w * (softmax - onehot), computed in place in the fp32 buffer.
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(len(y), device=y.device), y] -= 1.0
            if softcap is not None:
                grad_logits.mul_(tanh.square_().neg_().add_(1.0))
            grad_logits = grad_logits.mul_(token_weight).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[lo:lo + chunk] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.add_(grad_logits.t() @ h)
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
        return grad_hidden, grad_weight, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               token_weight: float, chunk: int = 4096,
                               softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i token_weight * CE_i, CE per token)`` for ``hidden [N, H]``, head ``weight [V, H]``.

    Equal to ``F.cross_entropy(hidden @ weight.T, targets, reduction="none")`` (computed in
    fp32 from the matmul's dtype), with gradients for ``hidden`` and ``weight``; the
    per-token losses carry no gradient. ``softcap`` c: the logits are ``c * tanh(hidden @ weight.T / c)``.
    """
    # Under autocast the matmuls run in its dtype (as nn.Linear would); the Function itself
    # runs with autocast off so its buffers have the dtypes chosen here.
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else hidden.dtype
    with torch.autocast(hidden.device.type, enabled=False):
        return _FusedLinearCrossEntropy.apply(hidden.to(dtype), weight.to(dtype), targets, float(token_weight),
                                              int(chunk), None if softcap is None else float(softcap))
