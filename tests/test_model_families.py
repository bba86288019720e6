"""Hone's Llama against transformers for each family on its fast path: Llama 2 / 3.1 / 3.2,
every rope type they use, Mistral's sliding window, Qwen2 biases, Qwen3 q/k norms.

Tiny random configs (CPU, fp32): transformers' model is built from its own config class,
its weights are loaded into ours by name, and the logits, the loss and every parameter
gradient of one training step must match.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hone.errors import HoneError
from hone.model.hf import load_hf, save_hf
from hone.model.llama import Llama, LlamaConfig, fast_path_refusal

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 128, 24
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}

# name -> (transformers config class name, its keyword arguments)
CASES = {
    "llama2-mha": ("LlamaConfig", dict(SHAPE)),
    "llama3.1-gqa": ("LlamaConfig", dict(SHAPE, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3)),
    "llama3.2-tied": ("LlamaConfig", dict(SHAPE, num_key_value_heads=1, tie_word_embeddings=True,
                                          rope_scaling=LLAMA3)),
    "llama-attention-bias": ("LlamaConfig", dict(SHAPE, num_key_value_heads=2, attention_bias=True)),
    "linear-rope": ("LlamaConfig", dict(SHAPE, num_key_value_heads=2, rope_scaling={"rope_type": "linear",
                                                                                       "factor": 4.0})),
    # max_position_embeddings below the sequence: the NTK base grows with its length.
    "dynamic-rope": ("LlamaConfig", dict(SHAPE, max_position_embeddings=16, num_key_value_heads=2,
                                         rope_scaling={"type": "dynamic", "factor": 2.0})),
    "yarn-rope": ("LlamaConfig", dict(SHAPE, num_key_value_heads=2,
                                      rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 16})),
    "yarn-mscale": ("LlamaConfig", dict(SHAPE, rope_scaling={"rope_type": "yarn", "factor": 8.0, "mscale": 0.707,
                                                             "mscale_all_dim": 1.0, "beta_fast": 16,
                                                             "original_max_position_embeddings": 8})),
    "mistral-window": ("MistralConfig", dict(SHAPE, num_key_value_heads=2, sliding_window=5)),
    "qwen2-bias": ("Qwen2Config", dict(SHAPE, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-window-upper-layers": ("Qwen2Config", dict(SHAPE, num_key_value_heads=2, use_sliding_window=True,
                                                      sliding_window=6, max_window_layers=1)),
    "qwen3-qk-norm": ("Qwen3Config", dict(SHAPE, num_key_value_heads=2, head_dim=16, rope_theta=1e6)),
    "qwen3-bias-yarn": ("Qwen3Config", dict(SHAPE, num_key_value_heads=2, head_dim=16, attention_bias=True,
                                            rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                          "original_max_position_embeddings": 32})),
}


def _hf_model(name: str, seed: int = 0):
    cls_name, kwargs = CASES[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls_name)(**kwargs, initializer_range=0.1)  # large enough that rope errors show
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # norms and biases away from their init, so a missing one shows
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _ours(hf_model) -> Llama:
    cfg = LlamaConfig.from_hf_dict(hf_model.config.to_dict())
    return Llama.from_state_dict(cfg, {k: v.clone() for k, v in hf_model.state_dict().items()}).eval()


def _ids(seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_one_training_step_match_transformers(name: str) -> None:
    hf = _hf_model(name)
    ours = _ours(hf)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)

    # A fresh transformers model: its dynamic rope keeps the frequencies of the longest sequence seen.
    hf = _hf_model(name)
    x, y = ids[:, :-1], ids[:, 1:]
    loss, _ = ours.train()(x, y)
    loss.backward()
    hf_loss = F.cross_entropy(hf.train()(input_ids=x).logits.flatten(0, 1), y.flatten())
    hf_loss.backward()
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)
    hf_params = dict(hf.named_parameters())
    for pname, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[pname].grad, atol=1e-5, rtol=1e-3, msg=pname)


def test_the_window_changes_the_logits() -> None:
    """The Mistral case is no accident of a window wider than the sequence."""
    hf = _hf_model("mistral-window")
    ours = _ours(hf)
    wide = Llama.from_state_dict(LlamaConfig.from_hf_dict({**hf.config.to_dict(), "sliding_window": None}),
                                 ours.state_dict()).eval()
    ids = _ids()
    with torch.no_grad():
        a, b = ours(ids), wide(ids)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("name,arch", [("mistral-window", "MistralForCausalLM"),
                                       ("qwen3-qk-norm", "Qwen3ForCausalLM")])
def test_save_hf_loads_in_transformers_with_the_same_logits(tmp_path: Path, name: str, arch: str) -> None:
    ours = _ours(_hf_model(name, seed=3))
    out = save_hf(ours, None, tmp_path / "ckpt")
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(hf).__name__ == arch
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
    back, _ = load_hf(out)
    assert back.config == ours.config


def test_to_hf_dict_round_trips_every_family() -> None:
    for name in CASES:
        cfg = LlamaConfig.from_hf_dict(_hf_model(name).config.to_dict())
        assert LlamaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg, name
        hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
        assert LlamaConfig.from_hf_dict(hf_cfg.to_dict()) == cfg, name


def test_family_defaults_for_absent_keys() -> None:
    base = dict(SHAPE, num_key_value_heads=2)
    assert LlamaConfig.from_hf_dict({**base, "model_type": "mistral"}).sliding_window == 4096
    qwen3 = LlamaConfig.from_hf_dict({**base, "model_type": "qwen3"})
    assert qwen3.head_dim == 128 and qwen3.sliding_window is None and qwen3.eos_token_id is None
    bias_llama = LlamaConfig(**base, attention_bias=True)  # q/k/v bias only: Qwen2's layout
    assert bias_llama.model_type == "qwen2" and bias_llama.to_hf_dict()["architectures"] == ["Qwen2ForCausalLM"]


@pytest.mark.parametrize("change,reason", [
    ({"model_type": "gemma2"}, "model_type 'gemma2' (Hone's Llama covers llama, mistral, qwen2, qwen3)"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}},
     "rope_scaling type 'longrope'"),
    ({"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}}, "rope_scaling type 'proportional'"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config (quant_method 'gptq')"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
])
def test_fast_path_refusal_names_the_feature(change: dict, reason: str) -> None:
    d = {**LlamaConfig(**SHAPE).to_hf_dict(), **change}
    assert fast_path_refusal(d) == reason
    with pytest.raises(HoneError) as e:
        LlamaConfig.from_hf_dict(d)
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_fast_path_accepts_every_family() -> None:
    for name in CASES:
        assert fast_path_refusal(_hf_model(name).config.to_dict()) is None, name
    assert fast_path_refusal(LlamaConfig(**SHAPE).to_hf_dict()) is None
