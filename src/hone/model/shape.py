"""Conversions between the model's config and the planner's shape.

:class:`hone.model.llama.LlamaConfig` is what the model is built from (transformers' field
names, rotary and tokenizer details); :class:`hone.plan.shapes.ModelShape` is the shape the
planner, the FLOPs count and the supervisor's re-planning read. These two functions are the
only place one is turned into the other.
"""

from __future__ import annotations

from typing import Any

from hone.errors import HoneError
from hone.model.llama import LlamaConfig
from hone.plan.shapes import ModelShape

__all__ = ["config_of", "shape_of"]


def shape_of(cfg: LlamaConfig, name: str = "trained model") -> ModelShape:
    """The planner's shape of a Llama config (``head_size`` only where head_dim is not hidden // heads)."""
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    return ModelShape(name, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, kv,
                      cfg.intermediate_size, cfg.vocab_size, "llama", bool(cfg.tie_word_embeddings),
                      cfg.max_position_embeddings,
                      0 if head_dim * cfg.num_attention_heads == cfg.hidden_size else head_dim)


def config_of(shape: ModelShape, **overrides: Any) -> LlamaConfig:
    """A Llama config of ``shape``; ``overrides`` set the config's other fields (rope_theta, ...)."""
    if shape.arch != "llama":
        raise HoneError(f"model {shape.name!r}: arch {shape.arch!r} has no Llama config (only 'llama' does)")
    fields: dict[str, Any] = dict(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=shape.max_seq, tie_word_embeddings=shape.tied_embeddings)
    fields.update(overrides)
    return LlamaConfig(**fields)
