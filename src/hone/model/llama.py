"""Our own single-device decoder for the Llama family: Llama 2 / 3 / 3.1 / 3.2, Mistral,
Qwen2 / 2.5, Qwen3 (and SmolLM2, a Llama).

Parameter names match each family's transformers ``*ForCausalLM`` state_dict exactly, so
weights move between the two with ``load_state_dict`` and no renaming; ``to_hf_dict`` writes
the family's own architecture and config keys. No parallelism lives here: a separate function
wraps the model for TP / FSDP (see STYLE.md, rule 1). ``fast_path_refusal`` says why an HF
config is not one this model builds exactly (the transformers backend builds those).

    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4)
    model = Llama(cfg).init_weights(seed=0)
    logits = model(torch.randint(0, 256, (1, 8)))   # [1, 8, 256]
    cache = KVCache(cfg.num_hidden_layers)          # generation: then feed only the new tokens
    logits = model(prompt_ids, cache=cache)
    logits = model(next_ids, cache=cache)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from hone.errors import HoneError
from hone.model.documents import attention_mask as document_mask, document_positions, flex_attention, uses_flex
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
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}
# transformers' defaults for the keys a family's config.json may leave out (each changes the model).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"max_position_embeddings": 131072, "sliding_window": 4096, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"max_position_embeddings": 32768, "sliding_window": 4096, "max_window_layers": 28,
              "bos_token_id": None, "eos_token_id": None},
    "qwen3": {"max_position_embeddings": 32768, "sliding_window": 4096, "max_window_layers": 28, "head_dim": 128,
              "bos_token_id": None, "eos_token_id": None},
}
_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
               "bos_token_id", "eos_token_id")
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(kw_only=True)
class LlamaConfig:
    """Shape of a Llama-family model; field names and meanings are transformers' own, except
    ``attention_bias`` (q/k/v only) and ``o_proj_bias`` (HF Llama's and Qwen3's attention_bias
    sets both)."""

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
    rope_scaling: dict[str, Any] | None = None  # None, or {"rope_type": "llama3" | "linear" | "dynamic" | "yarn", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2 style)
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    o_proj_bias: bool = False  # bias on o_proj too (with attention_bias; HF Llama / Qwen3 attention_bias=true)
    sliding_window: int | None = None  # attend to the last N positions only (Mistral; Qwen's use_sliding_window)
    layer_types: list[str] | None = None  # per layer "full_attention" / "sliding_attention"; None: all alike
    model_type: str = "llama"  # the family: llama, mistral, qwen2 (q/k/v bias), qwen3 (q/k norm)

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
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        self._normalize_family()
        self._normalize_window()

    def _normalize_family(self) -> None:
        if self.model_type not in FAMILIES:
            raise HoneError(f"model_type {self.model_type!r} is not one of Hone's Llama families {FAMILIES}")
        if self.model_type == "qwen2":
            self.attention_bias = True  # Qwen2 always has q/k/v bias; its config has no flag
        elif self.attention_bias and not self.o_proj_bias and self.model_type in ("llama", "mistral"):
            # HF Llama's attention_bias also puts one on o_proj: q/k/v-only bias is Qwen2's layout.
            self.model_type = "qwen2"
        if self.o_proj_bias and not (self.attention_bias and self.model_type in ("llama", "qwen3")):
            raise HoneError("o_proj_bias needs attention_bias and model_type 'llama' or 'qwen3' "
                            f"(got model_type {self.model_type!r}, attention_bias {self.attention_bias})")
        if self.model_type == "qwen3" and self.attention_bias != self.o_proj_bias:
            raise HoneError("model_type 'qwen3': attention_bias puts a bias on q/k/v and o_proj alike "
                            "(set o_proj_bias to the same value)")

    def _normalize_window(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise HoneError(f"sliding_window {self.sliding_window} must be at least 1")
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {FULL, SLIDING}:
                raise HoneError(f"layer_types must name {FULL!r} or {SLIDING!r} for each of the "
                                f"{self.num_hidden_layers} layers (got {self.layer_types})")
            if self.sliding_window is None or SLIDING not in self.layer_types:
                self.sliding_window, self.layer_types = None, None
            elif FULL not in self.layer_types:
                self.layer_types = None
        if self.sliding_window is not None and self.model_type == "llama":
            raise HoneError("sliding_window needs model_type 'mistral', 'qwen2' or 'qwen3' (Llama has none)")
        if self.layer_types is not None and self.model_type == "mistral":
            raise HoneError("model_type 'mistral' applies sliding_window to every layer: layer_types must be None")

    @property
    def has_windows(self) -> bool:
        """Whether any layer attends within a sliding window."""
        return any(self.window_of(i) for i in range(self.num_hidden_layers))

    def window_of(self, layer: int) -> int | None:
        """The sliding window of layer ``layer``, None for full causal attention."""
        if self.sliding_window is None or (self.layer_types is not None and self.layer_types[layer] != SLIDING):
            return None
        return self.sliding_window

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from a llama / mistral / qwen2 / qwen3 ``config.json`` dict; unknown keys are ignored,
        a feature this model does not build (see :func:`fast_path_refusal`) is a HoneError."""
        missing = [k for k in _REQUIRED_HF_KEYS if d.get(k) is None]
        if missing:
            raise HoneError(f"model config is missing required key {missing[0]!r}")
        reason = fast_path_refusal(d)
        if reason:
            raise HoneError(f"model config: {reason} is not built by Hone's own Llama (the transformers backend "
                            "builds it)")
        model_type = d.get("model_type") or "llama"
        defaults = _FAMILY_DEFAULTS[model_type]
        kwargs: dict[str, Any] = {k: defaults[k] for k in _SHAPE_KEYS if k in defaults and d.get(k) is None}
        kwargs.update({k: d[k] for k in _SHAPE_KEYS if d.get(k) is not None})
        bias = bool(d.get("attention_bias"))
        kwargs.update(attention_bias=bias, o_proj_bias=bias and model_type in ("llama", "qwen3"))
        kwargs.update(_window_from_hf(d, model_type))
        theta, scaling = _rope_from_hf(d)
        return cls(**kwargs, rope_theta=theta, rope_scaling=scaling, model_type=model_type)

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A ``config.json`` dict for transformers: the family's own architecture and keys."""
        own = ("attention_bias", "o_proj_bias", "sliding_window", "layer_types", "model_type")
        d = {k: v for k, v in asdict(self).items() if k not in own}
        d.update(
            architectures=[_ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            hidden_act="silu",
            attention_dropout=0.0,
            initializer_range=0.02,
            use_cache=True,
            torch_dtype=torch_dtype,
        )
        if self.model_type == "llama":
            d.update(attention_bias=self.o_proj_bias, mlp_bias=False, pretraining_tp=1)
        elif self.model_type == "mistral":
            d.update(sliding_window=self.sliding_window)
        else:
            d.update(_qwen_window_keys(self))
            if self.model_type == "qwen3":
                d.update(attention_bias=self.attention_bias)
        return d

    def num_parameters(self) -> int:
        """Count of distinct parameters (a tied lm_head counts once)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.attention_bias else 0)
        attn += (h if self.o_proj_bias else 0) + (2 * self.head_dim if self.model_type == "qwen3" else 0)
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head


def fast_path_refusal(config: dict[str, Any]) -> str | None:
    """None when Hone's Llama builds this HF ``config.json`` dict exactly, else a short reason
    (``"model_type 'gemma2' (...)"``, ``"rope_scaling type 'longrope'"``, ``"mlp_bias"``).

    Only features are judged: a config missing a required key gives None here and a HoneError
    naming the key in :meth:`LlamaConfig.from_hf_dict`.
    """
    model_type = config.get("model_type") or "llama"
    if model_type not in FAMILIES:
        return f"model_type {model_type!r} (Hone's Llama covers {', '.join(FAMILIES)})"
    quant = config.get("quantization_config")
    if quant:
        return f"quantization_config (quant_method {quant.get('quant_method')!r})" if isinstance(quant, dict) \
            else "quantization_config"
    act = config.get("hidden_act") or "silu"
    if act not in ("silu", "swish"):
        return f"hidden_act {act!r}"
    if config.get("mlp_bias"):
        return "mlp_bias"
    if config.get("attention_dropout"):
        return f"attention_dropout {config['attention_dropout']}"
    _, scaling = _rope_from_hf(config)
    scaling = scaling if isinstance(scaling, dict) else {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        return f"rope_scaling type {rope_type!r}"
    partial = scaling.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        return f"partial_rotary_factor {partial}"
    if model_type in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        other = sorted(set(config.get("layer_types") or ()) - {FULL, SLIDING})
        if other:
            return f"layer_types {other}"
    return None


def _window_from_hf(d: dict[str, Any], model_type: str) -> dict[str, Any]:
    """``sliding_window`` and ``layer_types`` as transformers reads them for each family."""
    defaults = _FAMILY_DEFAULTS[model_type]
    if model_type == "mistral":  # one window for every layer; an absent key is transformers' default 4096
        return {"sliding_window": d.get("sliding_window", defaults["sliding_window"])}
    if model_type == "llama" or not d.get("use_sliding_window"):
        return {}
    window = d.get("sliding_window", defaults["sliding_window"])
    first = d.get("max_window_layers", defaults["max_window_layers"])
    types = d.get("layer_types") or [SLIDING if i >= first else FULL for i in range(d["num_hidden_layers"])]
    return {"sliding_window": window, "layer_types": list(types)}


def _qwen_window_keys(cfg: LlamaConfig) -> dict[str, Any]:
    if cfg.sliding_window is None:
        return {"use_sliding_window": False, "sliding_window": None}
    types = cfg.layer_types or [SLIDING] * cfg.num_hidden_layers
    leading_full = next((i for i, t in enumerate(types) if t == SLIDING), len(types))
    return {"use_sliding_window": True, "sliding_window": cfg.sliding_window, "max_window_layers": leading_full,
            "layer_types": list(types)}


def _normalize_rope_scaling(scaling: dict[str, Any] | None, max_position_embeddings: int) -> dict[str, Any] | None:
    if not scaling:
        return None
    scaling = dict(scaling)
    legacy = scaling.pop("type", None)
    rope_type = scaling.get("rope_type") or legacy or "default"
    scaling["rope_type"] = rope_type
    scaling.pop("rope_theta", None)
    if scaling.get("partial_rotary_factor") in (1, 1.0):
        del scaling["partial_rotary_factor"]
    if rope_type == "default":
        return None
    if rope_type not in ROPE_TYPES:
        raise HoneError(f"rope_scaling type {rope_type!r} is not supported by Hone's own Llama "
                        f"(it builds {', '.join(ROPE_TYPES)})")
    if "partial_rotary_factor" in scaling:
        raise HoneError(f"rope_scaling partial_rotary_factor {scaling['partial_rotary_factor']} is not supported")
    for key in _ROPE_REQUIRED[rope_type]:
        if scaling.get(key) is None:
            raise HoneError(f"rope_scaling of type {rope_type!r} is missing {key!r}")
    if rope_type in ("llama3", "yarn"):  # transformers' default: the model's own length
        scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    return scaling


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the v4 keys or transformers v5's ``rope_parameters``."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        return float(theta), params
    return float(d.get("rope_theta") or 10000.0), d.get("rope_scaling")


# --------------------------------------------------------------------------- rotary embeddings


def rope_inv_freq(cfg: LlamaConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse rotary frequencies, as transformers computes them for each ``rope_type``.

    ``seq_len`` matters only for dynamic NTK scaling: past ``max_position_embeddings`` the
    base grows with the length of the sequence (None: at most that length, the plain base).
    """
    dim = cfg.head_dim
    s = cfg.rope_scaling or {"rope_type": "default"}
    kind = s["rope_type"]
    if kind == "yarn":
        return _yarn_inv_freq(cfg.rope_theta, dim, s, cfg.max_position_embeddings)
    base: float | torch.Tensor = cfg.rope_theta
    if kind == "dynamic":
        base = _dynamic_base(cfg, s["factor"], seq_len)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, s)
    return inv_freq


def _dynamic_base(cfg: LlamaConfig, factor: float, seq_len: int | None) -> float | torch.Tensor:
    """NTK-aware base for ``seq_len`` positions; transformers computes it in Python floats at init
    and in fp32 tensors when a longer sequence updates it, so we do the same."""
    dim, max_pos = cfg.head_dim, cfg.max_position_embeddings
    if seq_len is None or seq_len <= max_pos:
        return cfg.rope_theta * ((factor * max_pos / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    length = torch.maximum(torch.tensor(seq_len), torch.tensor(max_pos))
    return cfg.rope_theta * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(base: float, dim: int, s: dict[str, Any], max_pos: int) -> torch.Tensor:
    factor = s["factor"]
    old_len = s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


def rope_attention_factor(cfg: LlamaConfig) -> float:
    """The factor on cos / sin: YaRN's attention temperature, 1 for every other rope type."""
    s = cfg.rope_scaling
    if s is None or s["rope_type"] != "yarn":
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor, m, m_all = s["factor"], s.get("mscale"), s.get("mscale_all_dim")
    return float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)


def rope_tables(inv_freq: torch.Tensor, length: int, *, start: int = 0,
                scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin [length - start, head_dim] of positions ``start .. length - 1``, times ``scale``."""
    positions = torch.arange(start, length, device=inv_freq.device).float()
    freqs = positions[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    if scale == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * scale, emb.sin() * scale


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# --------------------------------------------------------------------------- the KV cache


class KVCache:
    """Keys and values of every layer for the positions seen so far (generation).

    ``model(ids, cache=cache)`` attends over the cached positions, appends the new ones and
    advances ``offset``, the position of the next token. A sliding-window layer keeps only its
    last ``window - 1`` positions: no later token can see older ones.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.offset = 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               window: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(past + new keys, past + new values, number of past positions) of ``layer``; keeps the new ones."""
        past_k, past_v = self.keys[layer], self.values[layer]
        n_past = 0 if past_k is None else past_k.shape[2]
        if past_k is not None:
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        keep = k.shape[2] if window is None else min(k.shape[2], window - 1)
        self.keys[layer], self.values[layer] = k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:]
        return k, v, n_past


def _attention_mask(t: int, n_past: int, window: int | None,
                    device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """(boolean mask [t, n_past + t] or None, is_causal) for ``t`` queries after ``n_past`` keys."""
    if n_past == 0 and (window is None or t <= window):
        return None, True
    if t == 1 and (window is None or n_past < window):
        return None, False
    q = torch.arange(n_past, n_past + t, device=device)[:, None]
    k = torch.arange(n_past + t, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask, False


# --------------------------------------------------------------------------- the model


def fused_linear(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """``tuple(lin(x) for lin in linears)`` as one matmul over their weights stacked by rows.

    The parameters stay the separate HF-named ones (load, export, checkpoints, optimizer state
    unchanged); only the forward reads x once and launches one GEMM instead of several. The stack
    costs one copy of these weights per forward, small next to the activations it saves reading."""
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    return F.linear(x, weight, bias).split([lin.out_features for lin in linears], dim=-1)


def set_fused_projections(model: nn.Module, on: bool) -> str | None:
    """Compute q/k/v and gate/up with one matmul each in every layer of ``model`` (on) or one
    per projection (off). Returns why fusion was refused, None when the choice was applied.

    Refused (left off) when a projection is not a plain ``nn.Linear`` (LoRA adapters wrap them)
    or its weight is a DTensor before any data-parallel wrapping (tensor parallel shards each
    projection on its own: a stack of shards is not the shard of the stack)."""
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    if on:
        projections = [p for m in attn for p in (m.q_proj, m.k_proj, m.v_proj)] \
            + [p for m in mlps for p in (m.gate_proj, m.up_proj)]
        if any(type(p) is not nn.Linear for p in projections):
            return "a projection is wrapped (LoRA)"
        if any(hasattr(p.weight, "device_mesh") and "tp" in (p.weight.device_mesh.mesh_dim_names or ())
               for p in projections):
            return "tensor parallel shards the projections"
    for m in attn + mlps:
        m.fused = on
    return None


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
    def __init__(self, cfg: LlamaConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=cfg.o_proj_bias)
        self.qk_norm = cfg.model_type == "qwen3"
        if self.qk_norm:  # Qwen3: RMSNorm of each head's q and k, before rotary
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.layer_idx = layer_idx
        self.window = cfg.window_of(layer_idx)
        self.fused = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, doc_mask=None) -> torch.Tensor:
        """``doc_mask``: packed documents' attention (:mod:`hone.model.documents`), a boolean
        ``[B, 1, T, T]`` mask or a flex_attention BlockMask; None: causal (and windowed) as usual."""
        b, t, _ = x.shape
        if self.fused:  # one matmul for q, k and v (see set_fused_projections)
            q, k, v = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj))
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # -1 heads: under tensor parallelism each rank holds n_heads / tp of them.
        q = q.view(b, t, -1, self.head_dim)
        k = k.view(b, t, -1, self.head_dim)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if doc_mask is not None and not isinstance(doc_mask, torch.Tensor):  # a BlockMask: flex_attention (GPU)
            return self.o_proj(flex_attention(q, k, v, doc_mask).transpose(1, 2).reshape(b, t, -1))
        n_past = 0
        if cache is not None:
            k, v, n_past = cache.extend(self.layer_idx, k, v, self.window)
        mask, causal = (doc_mask, False) if doc_mask is not None else _attention_mask(t, n_past, self.window, x.device)
        gqa = {}
        if k.shape[1] != q.shape[1]:
            if x.is_cuda:  # flash attention reads shared K/V heads directly
                gqa = {"enable_gqa": True}
            else:  # expanding K/V is faster on CPU than SDPA's enable_gqa path
                rep = q.shape[1] // k.shape[1]
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **gqa)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = fused_linear(x, (self.gate_proj, self.up_proj))
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, doc_mask=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, doc_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder body (``model.*`` in HF names): embeddings, layers, final norm."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.config = cfg
        # Recompute each layer's activations in the backward pass (set by parallelize());
        # done here rather than by wrapping the layers so parameter names stay HF's.
        self.activation_checkpointing = False
        cos, sin = self._tables(rope_inv_freq(cfg), min(cfg.max_position_embeddings, _ROPE_CACHE_LEN))
        # Non-persistent: derived from the config, so never part of a checkpoint.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _tables(self, inv_freq: torch.Tensor, length: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(inv_freq, length, start=start, scale=rope_attention_factor(self.config))

    def reset_rope(self, device: torch.device | str = "cpu") -> None:
        """Recompute the cos/sin tables (after building on the meta device)."""
        cos, sin = self._tables(rope_inv_freq(self.config).to(device), self.rope_cos.shape[0])
        self.rope_cos, self.rope_sin = cos, sin

    def rope(self, t: int, dtype: torch.dtype, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin of positions ``offset .. offset + t - 1``."""
        end, cfg = offset + t, self.config
        if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "dynamic" and end > cfg.max_position_embeddings:
            # Dynamic NTK: frequencies of a sequence this long, as transformers recomputes them.
            cos, sin = self._tables(rope_inv_freq(cfg, end).to(self.rope_cos.device), end, start=offset)
            return cos.to(dtype), sin.to(dtype)
        if end > self.rope_cos.shape[0]:
            cos, sin = self._tables(rope_inv_freq(cfg).to(self.rope_cos.device), end)
            self.rope_cos = cos.to(self.rope_cos.device, self.rope_cos.dtype)
            self.rope_sin = sin.to(self.rope_sin.device, self.rope_sin.dtype)
        return self.rope_cos[offset:end].to(dtype), self.rope_sin[offset:end].to(dtype)

    def document_inputs(self, position_ids: torch.Tensor, document_ids: torch.Tensor,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(cos, sin ``[B, 1, T, head_dim]`` at ``position_ids``, ``{window: mask}``) of packed documents
        (:func:`hone.model.documents.document_positions`): what each layer gets instead of plain causal inputs."""
        cfg = self.config
        # Positions restart per document, so the tables need only reach the longest document (dynamic
        # NTK depends on that length, as transformers takes it from the largest position id).
        dynamic = cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "dynamic"
        cos, sin = self.rope_at(position_ids, dtype, int(position_ids.max()) + 1 if dynamic else position_ids.shape[1])
        flex = uses_flex(document_ids.device)
        windows = {cfg.window_of(i) for i in range(cfg.num_hidden_layers)}
        masks = {w: document_mask(document_ids, w, flex=flex) for w in windows}
        return cos, sin, masks

    def rope_at(self, position_ids: torch.Tensor, dtype: torch.dtype, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin ``[B, 1, T, head_dim]`` at ``position_ids``, from the tables of a ``length``-token sequence."""
        cos, sin = self.rope(length, dtype)
        return cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states; with ``position_ids`` and ``document_ids`` (``[B, T]``, no cache) packed
        documents are kept apart; with ``position_ids`` and ``attention_mask`` (boolean ``[B, 1, T, T]``,
        True where a query may attend to a key; no cache, no sliding window) any pattern: the task
        evaluation reads a question once and its choices beside it in one row."""
        x = self.embed_tokens(input_ids)
        offset = cache.offset if cache is not None else 0
        if attention_mask is not None:
            if cache is not None or position_ids is None or document_ids is not None:
                raise HoneError("an attention mask needs position_ids, and no KV cache or document_ids")
            if self.config.has_windows:
                raise HoneError("an attention mask is not combined with sliding windows")
            cos, sin = self.rope_at(position_ids, x.dtype, int(position_ids.max()) + 1)
            masks = {None: attention_mask}
        elif document_ids is not None:
            if cache is not None or position_ids is None:
                raise HoneError("packed documents need position_ids with document_ids, and no KV cache")
            cos, sin, masks = self.document_inputs(position_ids, document_ids, x.dtype)
        else:
            (cos, sin), masks = self.rope(input_ids.shape[1], x.dtype, offset), {}
        for layer in self.layers:
            mask = masks.get(layer.self_attn.window)
            if self.activation_checkpointing and torch.is_grad_enabled() and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, None, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, mask)
        if cache is not None:
            cache.offset = offset + input_ids.shape[1]
        return self.norm(x)


class Llama(nn.Module):
    """Causal LM: ``forward(input_ids [B, T]) -> logits [B, T, V]``; HF parameter names.

    ``doc_eos_id`` (None, or set by :func:`hone.model.documents.set_doc_eos_id` when training
    starts): the training forward ``model(ids, targets)`` keeps the documents packed in ``ids``
    apart at that end-of-document id. Logits, the decoder body and the KV cache (evaluation,
    generation: one document at a time) never do.
    """

    doc_eos_id: int | None = None

    def __init__(self, cfg: LlamaConfig, *, fused_projections: bool = False) -> None:
        """``fused_projections``: one matmul for q/k/v and one for gate/up (:func:`set_fused_projections`;
        the parameters and their names are the same either way)."""
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        set_fused_projections(self, fused_projections)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                token_weight: float | None = None, cache: KVCache | None = None):
        """Logits ``[B, T, V]``; or, given ``targets``, ``(loss, per-token losses [B, T])``
        through the chunked linear + cross-entropy (no full logits tensor), where loss is
        the per-token losses summed times ``token_weight`` (default: their mean).

        With a ``cache`` the ids continue the cached positions (and are added to the cache)."""
        if targets is None:
            return self.lm_head(self.model(input_ids, cache))

        if self.doc_eos_id is not None and cache is None:
            position_ids, document_ids = document_positions(input_ids, self.doc_eos_id)
            hidden = self.model(input_ids, position_ids=position_ids, document_ids=document_ids)
        else:
            hidden = self.model(input_ids, cache)
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
