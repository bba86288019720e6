"""Model shapes: presets, HF ``config.json`` files, inline specs; parameters and FLOPs per token.

FLOPs convention (Megatron-LM / PaLM / torchtitan "model FLOPs"): per trained token
``6 * (N_nonembedding + V*h) + 12 * l * h * s``, i.e. 6 FLOPs per weight of every matmul
(the LM head counted, the input embedding lookup not), plus the attention scores and
values (``QK^T`` and ``AV``) over the full ``s``, not halved for the causal mask. For a
GPT shape this equals Megatron's per-iteration ``72 B s l h^2 (1 + s/6h + V/12lh)``.
Recomputation is never counted here (that is hardware FLOPs, see ``timing``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

from hone.errors import HoneError


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer: ``arch`` 'llama' (RMSNorm, SwiGLU, GQA, RoPE, no biases) or
    'gpt' (LayerNorm, GeLU MLP, biases, learned positions, dropout)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    arch: str = "llama"
    tied_embeddings: bool = False
    max_seq: int = 2048  # learned position table size for 'gpt'
    head_size: int = 0  # per-head width when it is not hidden // heads (0: hidden // heads)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @lru_cache(maxsize=256)  # noqa: B019 (frozen, hashable; the search calls it ~1e5 times)
    def layer_params(self) -> int:
        h, f, kv, q = self.hidden, self.ffn, self.kv_dim, self.q_dim
        attn = h * q + 2 * h * kv + q * h
        if self.arch == "gpt":
            return attn + (h + 2 * kv + h) + 2 * h * f + f + h + 4 * h  # + biases, 2 LayerNorms
        return attn + 3 * h * f + 2 * h  # SwiGLU, 2 RMSNorms

    def embedding_params(self) -> int:
        pos = self.max_seq * self.hidden if self.arch == "gpt" else 0
        return self.vocab * self.hidden + pos

    def head_params(self) -> int:
        """LM head (0 when tied) plus the final norm."""
        norm = 2 * self.hidden if self.arch == "gpt" else self.hidden
        return (0 if self.tied_embeddings else self.vocab * self.hidden) + norm

    def params(self) -> int:
        return self.layers * self.layer_params() + self.embedding_params() + self.head_params()

    def nonembedding_params(self) -> int:
        return self.layers * self.layer_params()

    def flops_per_token(self, seq: int) -> float:
        """Training model FLOPs per token (forward + backward): :func:`flops_per_token`."""
        return flops_per_token(self, seq)

    def summary(self) -> dict:
        return {"name": self.name, "arch": self.arch, "layers": self.layers, "hidden": self.hidden,
                "heads": self.heads, "kv_heads": self.kv_heads, "ffn": self.ffn, "vocab": self.vocab,
                "tied_embeddings": self.tied_embeddings, "params": self.params(),
                "nonembedding_params": self.nonembedding_params()}


FLOPS_CONVENTION = "6*(N_nonembedding + V*h) + 12*l*h*s per token (Megatron/PaLM model FLOPs, no recompute)"


def flops_per_token(shape: ModelShape, seq: int) -> float:
    """Training model FLOPs per token (forward + backward) at sequence length ``seq``:
    ``6 * (N_nonembedding + V*h) + 12 * l * h * s`` (``h`` in the attention term is the
    query width, heads x head_dim, which is the hidden size unless the shape says otherwise).

    Causal attention is counted in full (``QK^T`` and ``AV`` over all ``s`` keys, not halved
    for the mask), as PaLM (Chowdhery et al. 2022, appendix B), Megatron-LM and torchtitan
    count it, so an MFU computed with it is comparable to theirs. The one FLOPs count of
    Hone: the planner's timing and MFU, the trainer's logged MFU and the benchmarks use it.
    """
    return (6.0 * (shape.nonembedding_params() + shape.vocab * shape.hidden)
            + 12.0 * shape.layers * shape.q_dim * seq)


def _llama(name, l, h, a, kv, f, v, tied=False):
    return ModelShape(name, l, h, a, kv, f, v, "llama", tied)


def _gpt(name, l, h, a, v=51200, seq=2048):
    return ModelShape(name, l, h, a, a, 4 * h, v, "gpt", True, seq)


PRESETS: dict[str, ModelShape] = {m.name: m for m in [
    _llama("llama3-8b", 32, 4096, 32, 8, 14336, 128256),
    _llama("llama3-70b", 80, 8192, 64, 8, 28672, 128256),
    _llama("llama3.1-405b", 126, 16384, 128, 8, 53248, 128256),
    _llama("llama2-7b", 32, 4096, 32, 32, 11008, 32000),
    _llama("llama2-70b", 80, 8192, 64, 8, 28672, 32000),
    _llama("smollm2-135m", 30, 576, 9, 3, 1536, 49152, tied=True),
    _llama("smollm2-1.7b", 24, 2048, 32, 32, 8192, 49152, tied=True),
    # The two benchmark shapes of the training issue (issue 4).
    _llama("hone-125m", 12, 768, 12, 12, 2048, 32000),
    _llama("hone-1b", 16, 2048, 32, 8, 8192, 128256),
    _gpt("gpt3-175b", 96, 12288, 96, v=50257),
    # Narayanan et al. 2021 (Megatron-LM, SC'21) Table 1 shapes, vocab 51200, seq 2048.
    _gpt("gpt-1.7b", 24, 2304, 24), _gpt("gpt-3.6b", 30, 3072, 32), _gpt("gpt-7.5b", 36, 4096, 32),
    _gpt("gpt-18b", 40, 6144, 48), _gpt("gpt-39b", 48, 8192, 64), _gpt("gpt-76b", 60, 10240, 80),
    _gpt("gpt-145b", 80, 12288, 96), _gpt("gpt-310b", 96, 16384, 128), _gpt("gpt-530b", 105, 20480, 128),
    _gpt("gpt-1t", 128, 25600, 160), _gpt("gpt-22b", 48, 6144, 64),
]}

_INLINE_KEYS = {"layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "arch", "tied", "name"}


def parse_inline(spec: str) -> ModelShape:
    """``layers=32,hidden=4096,heads=32,kv_heads=8,ffn=14336,vocab=128256[,arch=gpt|llama][,tied=1]``."""
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, val = part.partition("=")
        key = key.strip()
        if not sep or key not in _INLINE_KEYS:
            raise HoneError(f"model spec {spec!r}: bad field {part!r} (fields: {', '.join(sorted(_INLINE_KEYS))})")
        fields[key] = val.strip()
    missing = {"layers", "hidden", "heads", "vocab"} - fields.keys()
    if missing:
        raise HoneError(f"model spec {spec!r}: missing {', '.join(sorted(missing))}")
    arch = fields.get("arch", "llama")
    if arch not in ("llama", "gpt"):
        raise HoneError(f"model spec {spec!r}: arch must be llama or gpt (got {arch!r})")
    try:
        nums = {k: int(v) for k, v in fields.items() if k in {"layers", "hidden", "heads", "kv_heads", "ffn", "vocab"}}
    except ValueError:
        raise HoneError(f"model spec {spec!r}: layers, hidden, heads, kv_heads, ffn, vocab must be integers") from None
    h = nums["hidden"]
    shape = ModelShape(fields.get("name", "custom"), nums["layers"], h, nums["heads"],
                       nums.get("kv_heads", nums["heads"]),
                       nums.get("ffn", 4 * h), nums["vocab"], arch, fields.get("tied", "0") in ("1", "true", "yes"))
    return validate(shape, f"model spec {spec!r}")


def from_hf_config(path: Path) -> ModelShape:
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise HoneError(f"{path}: cannot read HF config ({e})") from None
    try:
        if "n_layer" in cfg or "n_embd" in cfg:  # GPT-2 style
            h = cfg["n_embd"]
            shape = ModelShape(Path(path).parent.name or "hf", cfg["n_layer"], h, cfg["n_head"], cfg["n_head"],
                               cfg.get("n_inner") or 4 * h, cfg["vocab_size"], "gpt", True,
                               cfg.get("n_positions", 2048))
        else:
            a = cfg["num_attention_heads"]
            shape = ModelShape(Path(path).parent.name or "hf", cfg["num_hidden_layers"], cfg["hidden_size"], a,
                               cfg.get("num_key_value_heads", a), cfg["intermediate_size"], cfg["vocab_size"], "llama",
                               bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise HoneError(f"{path}: HF config lacks {e.args[0]!r}") from None
    return validate(shape, str(path))


def shape_from_dict(d: dict, name: str = "trained model") -> ModelShape:
    """A shape from its fields (``dataclasses.asdict`` of one, as ``heal/model.json`` holds them
    next to the device); keys that are not fields are ignored, absent optional ones take defaults."""
    known = {f.name for f in fields(ModelShape)}
    return ModelShape(**{"name": name, **{k: v for k, v in d.items() if k in known}})


def validate(shape: ModelShape, where: str) -> ModelShape:
    for f in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab"):
        if getattr(shape, f) <= 0:
            raise HoneError(f"{where}: {f} must be positive (got {getattr(shape, f)})")
    if shape.hidden % shape.heads:
        raise HoneError(f"{where}: hidden {shape.hidden} is not divisible by heads {shape.heads}")
    if shape.heads % shape.kv_heads:
        raise HoneError(f"{where}: heads {shape.heads} is not divisible by kv_heads {shape.kv_heads}")
    return shape


def load_shape(spec: str) -> ModelShape:
    """A preset name, a path to an HF ``config.json`` (or its directory), or an inline spec."""
    if spec in PRESETS:
        return PRESETS[spec]
    if "=" in spec:
        return parse_inline(spec)
    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
    if p.suffix == ".json" or p.exists():
        if not p.exists():
            raise HoneError(f"{p}: file not found")
        return from_hf_config(p)
    raise HoneError(f"unknown model {spec!r}: use a preset ({', '.join(sorted(PRESETS))}), "
                    "a config.json path, or layers=..,hidden=..,heads=..,kv_heads=..,ffn=..,vocab=..")


def with_name(shape: ModelShape, name: str) -> ModelShape:
    return replace(shape, name=name)
