"""Fused q/k/v and gate/up projections (issue 17): same logits, same gradients, and the same
exported safetensors (names and values) as the unfused model; refused where they cannot apply."""

import torch
from torch import nn

from hone.model.hf import read_safetensors, save_hf
from hone.model.llama import Llama, LlamaConfig, set_fused_projections
from hone.model.sdpa import pin_sdpa_backend, sdpa_order


def _cfg(**kw):
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return LlamaConfig(**(base | kw))


def _pair(cfg):
    plain = Llama(cfg).init_weights(seed=3).double()
    fused = Llama(cfg, fused_projections=True).double()
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def test_fused_equals_unfused_logits_and_gradients_gqa_and_bias():
    for cfg in (_cfg(), _cfg(model_type="qwen2")):  # qwen2: q/k/v biases go through the stacked matmul too
        plain, fused = _pair(cfg)
        assert all(m.fused for m in fused.modules() if hasattr(m, "fused"))
        x = torch.randint(0, 97, (2, 11))
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-12, atol=1e-12)
        for m in (plain, fused):
            m(x, x).__getitem__(0).backward()
        for (name, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_fused_model_exports_the_same_safetensors(tmp_path):
    plain, fused = _pair(_cfg())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]
    save_hf(plain.float(), None, tmp_path / "plain")
    save_hf(fused.float(), None, tmp_path / "fused")
    a, b = read_safetensors(tmp_path / "plain"), read_safetensors(tmp_path / "fused")
    assert sorted(a) == sorted(b) and "model.layers.0.self_attn.q_proj.weight" in b
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_fusion_refused_for_wrapped_projections_and_switchable():
    model = Llama(_cfg())
    model.model.layers[0].self_attn.q_proj = nn.Sequential(nn.Linear(32, 32))  # as an adapter wrapper would
    assert set_fused_projections(model, True) == "a projection is wrapped (LoRA)"
    assert not any(m.fused for m in model.modules() if hasattr(m, "fused"))
    assert set_fused_projections(Llama(_cfg()), False) is None


def test_sdpa_order_prefers_cudnn_on_hopper_and_is_a_no_op_on_cpu():
    assert sdpa_order((9, 0))[:2] == ["cudnn", "flash"]
    assert sdpa_order((8, 0))[:2] == ["flash", "cudnn"]
    assert sdpa_order((9, 0), "flash")[:2] == ["flash", "cudnn"]
    assert pin_sdpa_backend(torch.device("cpu")) is None
