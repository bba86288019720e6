"""Our own single-device Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2).

Parameter names match transformers' ``LlamaForCausalLM`` state_dict exactly, so weights move
between the two with ``load_state_dict`` and no renaming. No parallelism lives here: a
separate function wraps the model for TP / FSDP (see STYLE.md, rule 1).

    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4)
    model = Llama(cfg).init_weights(seed=0)
    logits = model(torch.randint(0, 256, (1, 8)))   # [1, 8, 256]
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from hone.errors import HoneError
from hone.model.loss import fused_linear_cross_entropy

# Positions precomputed at init; longer inputs grow the cache on demand.
_ROPE_CACHE_LEN = 4096
_REQUIRED_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(kw_only=True)
class LlamaConfig:
    """Shape of a Llama-family model; field names and meanings are transformers' own."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None, or {"rope_type": "llama3", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2 style); o_proj never has one
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise HoneError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise HoneError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from a llama / mistral / qwen2 ``config.json`` dict; unknown keys are ignored."""
        missing = [k for k in _REQUIRED_HF_KEYS if d.get(k) is None]
        if missing:
            raise HoneError(f"model config is missing required key {missing[0]!r}")
        model_type = d.get("model_type", "llama")
        if model_type not in _SUPPORTED_MODEL_TYPES:
            raise HoneError(f"model_type {model_type!r} is not supported (want one of {_SUPPORTED_MODEL_TYPES})")
        _warn_sliding_window(d)
        theta, scaling = _rope_from_hf(d)
        known = {f.name for f in fields(cls)} - {"rope_theta", "rope_scaling"}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        if model_type == "qwen2":
            kwargs["attention_bias"] = True  # Qwen2 always has q/k/v bias; its config has no flag
        if d.get("mlp_bias"):
            raise HoneError("mlp_bias=true is not supported")
        return cls(**kwargs, rope_theta=theta, rope_scaling=scaling)

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A ``config.json`` dict for transformers; Qwen2 when q/k/v carry a bias.

        HF Llama's ``attention_bias`` also puts a bias on o_proj, which we never have, so a
        biased model is described as Qwen2 (q/k/v bias only) to load into the same weights.
        """
        arch, model_type = ("Qwen2ForCausalLM", "qwen2") if self.attention_bias else ("LlamaForCausalLM", "llama")
        d = asdict(self)
        d.update(
            architectures=[arch],
            model_type=model_type,
            hidden_act="silu",
            mlp_bias=False,
            attention_dropout=0.0,
            initializer_range=0.02,
            pretraining_tp=1,
            use_cache=True,
            torch_dtype=torch_dtype,
        )
        if model_type == "qwen2":
            d.update(use_sliding_window=False, sliding_window=None)
            del d["attention_bias"]
        return d

    def num_parameters(self) -> int:
        """Count of distinct parameters (a tied lm_head counts once)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.attention_bias else 0)
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head


def _normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if not scaling:
        return None
    scaling = dict(scaling)
    rope_type = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    scaling["rope_type"] = rope_type
    scaling.pop("rope_theta", None)
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise HoneError(f"rope_scaling type {rope_type!r} is not supported (only 'llama3')")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise HoneError(f"rope_scaling of type 'llama3' is missing {key!r}")
    return scaling


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the v4 keys or transformers v5's ``rope_parameters``."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        return float(theta), _normalize_rope_scaling(params)
    return float(d.get("rope_theta") or 10000.0), d.get("rope_scaling")


def _warn_sliding_window(d: dict[str, Any]) -> None:
    window = d.get("sliding_window")
    uses = d.get("use_sliding_window", d.get("model_type") == "mistral")
    if uses and window and window < d.get("max_position_embeddings", 0):
        warnings.warn(
            f"sliding_window={window} is ignored: attention is full causal, "
            f"identical only for sequences up to {window} tokens",
            stacklevel=3,
        )


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse rotary frequencies, as transformers computes them (llama3 scaling included)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(inv_freq: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(length, device=inv_freq.device).float()
    freqs = positions[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the input dtype, then scale in the input dtype (as HF).
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds n_heads / tp of them.
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        gqa = {}
        if k.shape[1] != q.shape[1]:
            if x.is_cuda:  # flash attention reads shared K/V heads directly
                gqa = {"enable_gqa": True}
            else:  # expanding K/V is faster on CPU than SDPA's enable_gqa path
                rep = q.shape[1] // k.shape[1]
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder body (``model.*`` in HF names): embeddings, layers, final norm."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.config = cfg
        # Recompute each layer's activations in the backward pass (set by parallelize());
        # done here rather than by wrapping the layers so parameter names stay HF's.
        self.activation_checkpointing = False
        cos, sin = rope_tables(rope_inv_freq(cfg), min(cfg.max_position_embeddings, _ROPE_CACHE_LEN))
        # Non-persistent: derived from the config, so never part of a checkpoint.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_rope(self, device: torch.device | str = "cpu") -> None:
        """Recompute the cos/sin tables (after building on the meta device)."""
        cos, sin = rope_tables(rope_inv_freq(self.config).to(device), self.rope_cos.shape[0])
        self.rope_cos, self.rope_sin = cos, sin

    def rope(self, t: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if t > self.rope_cos.shape[0]:
            cos, sin = rope_tables(rope_inv_freq(self.config).to(self.rope_cos.device), t)
            self.rope_cos = cos.to(self.rope_cos.device, self.rope_cos.dtype)
            self.rope_sin = sin.to(self.rope_sin.device, self.rope_sin.dtype)
        return self.rope_cos[:t].to(dtype), self.rope_sin[:t].to(dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(input_ids.shape[1], x.dtype)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.norm(x)


class Llama(nn.Module):
    """Causal LM: ``forward(input_ids [B, T]) -> logits [B, T, V]``; HF parameter names."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                token_weight: float | None = None):
        """Logits ``[B, T, V]``; or, given ``targets``, ``(loss, per-token losses [B, T])``
        through the chunked linear + cross-entropy (no full logits tensor), where loss is
        the per-token losses summed times ``token_weight`` (default: their mean)."""
        if targets is None:
            return self.lm_head(self.model(input_ids))

        hidden = self.model(input_ids)
        weight = token_weight if token_weight is not None else 1.0 / targets.numel()
        loss, per_token = fused_linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                                     token_weight=weight)
        return loss, per_token.view(targets.shape)

    @classmethod
    def from_state_dict(cls, cfg: LlamaConfig, state_dict: dict[str, torch.Tensor]) -> Llama:
        """Build around existing tensors (no random init, no copy); HoneError on a name or shape mismatch.

        A tied model takes its head from the embedding; a stored ``lm_head.weight`` is ignored.
        """
        with torch.device("meta"):
            model = cls(cfg)
        tensors = dict(state_dict)
        if cfg.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
            raise HoneError(f"weights do not fit the config: {what} ({len(missing)} missing, {len(unexpected)} "
                            "unexpected)")
        for name, param in model.state_dict().items():
            if name in tensors and tensors[name].shape != param.shape:
                raise HoneError(f"weight {name!r} has shape {tuple(tensors[name].shape)}, config wants "
                                f"{tuple(param.shape)}")
        model.load_state_dict(tensors, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.model.reset_rope(model.model.embed_tokens.weight.device)
        return model

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> Llama:
        """Random init as HF does it: N(0, std) matrices, zero biases, unit norms. Returns self."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
