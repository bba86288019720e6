"""The chunked linear + cross-entropy equals the plain one, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from hone.model.llama import Llama, LlamaConfig
from hone.model.loss import fused_linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 50, 4096])
def test_matches_plain_cross_entropy_values_and_grads(chunk):
    torch.manual_seed(0)
    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(100, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 100, (50,))
    loss, per_token = fused_linear_cross_entropy(h, w, y, token_weight=1 / 50, chunk=chunk)
    (2.5 * loss).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2.t(), y, reduction="none")
    (2.5 * ref.mean()).backward()
    torch.testing.assert_close(per_token, ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, ref.mean(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-10, atol=1e-12)
    assert not per_token.requires_grad


def test_model_loss_path_equals_logits_path_under_bf16_autocast():
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Llama(cfg).init_weights(seed=1)
    x = torch.randint(0, 300, (3, 20))
    y = torch.randint(0, 300, (3, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, per_token = model(x, y)
        ref = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="none").view(3, 20)
    assert per_token.shape == (3, 20)
    torch.testing.assert_close(per_token, ref, rtol=2e-2, atol=2e-2)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()  # fp32 reference
    for n, p in model.named_parameters():
        assert torch.nn.functional.cosine_similarity(grads[n].flatten(), p.grad.flatten(), dim=0) > 0.99, n
