"""The compiled chunked linear + cross-entropy (issue 17) equals the eager one and plain
F.cross_entropy in fp64: values and gradients of hidden states and head, padding ignored."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from hone.model.loss import IGNORE_INDEX, fused_linear_cross_entropy

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="Inductor on CPU needs a C++ compiler")


def _inputs(n=37, hid=16, vocab=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hid, dtype=torch.float64, generator=g)
    w = torch.randn(vocab, hid, dtype=torch.float64, generator=g)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[::5] = IGNORE_INDEX  # padding
    return h, w, y


def _run(h, w, y, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, per_token = fused_linear_cross_entropy(h, w, y, token_weight=1 / 30, **kw)
    (1.5 * loss).backward()
    return loss.detach(), per_token, h.grad, w.grad


def _reference(h, w, y, softcap=None):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    logits = h @ w.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    per_token = F.cross_entropy(logits, y, reduction="none", ignore_index=IGNORE_INDEX)
    loss = per_token.sum() / 30
    (1.5 * loss).backward()
    return loss.detach(), per_token.detach(), h.grad, w.grad


def _close(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 8, 37, 4096])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_eager_chunks_match_plain_cross_entropy_with_padding(chunk, softcap):
    h, w, y = _inputs()
    got = _run(h, w, y, chunk=chunk, softcap=softcap, compile=False)
    _close(got, _reference(h, w, y, softcap))
    assert float(got[1][::5].abs().max()) == 0.0  # padded tokens: no loss


@needs_compiler
def test_compiled_chunks_equal_eager_and_plain():
    # chunk 8 over 37 tokens: the full-chunk graph and the shorter last one (one compile each).
    h, w, y = _inputs()
    compiled = _run(h, w, y, chunk=8, compile=True)
    _close(compiled, _run(h, w, y, chunk=8, compile=False))
    _close(compiled, _reference(h, w, y))


def test_head_gradient_accumulates_in_fp32_under_bf16():
    # bf16 operands, fp32 accumulation over many chunks: the head's gradient stays close to the
    # fp32 computation (an accumulator in bf16 would lose ~3 digits over 64 chunks).
    h, w, y = (t.float() if t.is_floating_point() else t for t in _inputs(n=256, hid=32, vocab=64))
    ref = _run(h, w, y, chunk=4, compile=False)[3]
    got = _run(h.bfloat16(), w.bfloat16(), y, chunk=4, compile=False)[3]
    assert got.dtype == torch.bfloat16
    rel = (got.float() - ref).norm() / ref.norm()
    assert rel < 1e-2, rel
