"""Our Llama against transformers' logits on tiny random configs (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from hone.errors import HoneError
from hone.model.llama import Llama, LlamaConfig

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 256, 24
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=128)


def _ids(batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def _hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=ids).logits


def _ours_from_hf(hf_model) -> Llama:
    ours = Llama(LlamaConfig.from_hf_dict(hf_model.config.to_dict()))
    missing, unexpected = ours.load_state_dict(hf_model.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing  # tied heads may be absent
    return ours.eval()


def _hf_from_ours(cfg: LlamaConfig, seed: int = 0):
    """A random HF model built from our ``to_hf_dict``, perturbed so norms are not all ones."""
    torch.manual_seed(seed)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize(
    "cfg",
    [
        LlamaConfig(**TINY, num_attention_heads=4, tie_word_embeddings=True),
        LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0),
        LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=1, head_dim=32),
        LlamaConfig(
            **TINY,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, attention_bias=True),
    ],
    ids=["mha-tied", "gqa-untied", "mqa-headdim", "llama3-rope", "qkv-bias"],
)
def test_logits_match_transformers(cfg: LlamaConfig) -> None:
    hf = _hf_from_ours(cfg)
    ours = _ours_from_hf(hf)
    assert ours.config == cfg
    ids = _ids()
    with torch.no_grad():
        got = ours(ids)
    torch.testing.assert_close(got, _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_tied_head_shares_the_embedding() -> None:
    model = Llama(LlamaConfig(**TINY, num_attention_heads=4, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == model.config.num_parameters()


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_logits_match_other_families(kind: str) -> None:
    torch.manual_seed(0)
    shape = dict(TINY, num_attention_heads=4, num_key_value_heads=2)
    if kind == "mistral":
        hf_cfg = transformers.MistralConfig(**shape, sliding_window=None, rope_theta=10000.0)
        cls = transformers.MistralForCausalLM
    else:
        hf_cfg = transformers.Qwen2Config(**shape, tie_word_embeddings=True)
        cls = transformers.Qwen2ForCausalLM
    hf = cls(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)  # Qwen2 q/k/v biases start at zero
    ours = _ours_from_hf(hf)
    assert ours.config.attention_bias == (kind == "qwen2")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_longer_than_cached_rope_matches_fresh_tables() -> None:
    cfg = LlamaConfig(**dict(TINY, max_position_embeddings=8), num_attention_heads=4)
    model = Llama(cfg).init_weights(seed=0).eval()
    ids = _ids(1, 20)
    with torch.no_grad():
        long = model(ids)
        assert model.model.rope_cos.shape[0] == 20
        torch.testing.assert_close(model(ids[:, :8]), long[:, :8], atol=1e-5, rtol=1e-5)


def test_init_weights_is_seeded() -> None:
    cfg = LlamaConfig(**TINY, num_attention_heads=4)
    a, b = Llama(cfg).init_weights(seed=3), Llama(cfg).init_weights(seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not any("rope" in k for k in a.state_dict())


def test_from_hf_dict_names_missing_key_and_ignores_unknown() -> None:
    d = LlamaConfig(**TINY, num_attention_heads=4).to_hf_dict()
    d["some_future_field"] = 1
    assert LlamaConfig.from_hf_dict(d).hidden_size == 64
    del d["intermediate_size"]
    with pytest.raises(HoneError, match="intermediate_size"):
        LlamaConfig.from_hf_dict(d)


def test_from_hf_dict_reads_v5_rope_parameters() -> None:
    d = LlamaConfig(**TINY, num_attention_heads=4).to_hf_dict()
    del d["rope_theta"], d["rope_scaling"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    cfg = LlamaConfig.from_hf_dict(d)
    assert cfg.rope_theta == 12345.0 and cfg.rope_scaling is None


def test_unsupported_rope_scaling_is_rejected() -> None:
    with pytest.raises(HoneError, match="longrope"):
        LlamaConfig(**TINY, num_attention_heads=4, rope_scaling={"rope_type": "longrope", "factor": 2.0})
