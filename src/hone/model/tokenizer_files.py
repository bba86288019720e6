"""The base model's tokenizer files, carried into every model a run exports.

An HF directory's own files (``tokenizer.json``, ``tokenizer_config.json`` with its chat
template and special tokens, ``special_tokens_map.json``, ``generation_config.json``, ...) are
copied byte for byte. A GGUF file has no such files, so they are written from its metadata:
the tokenizer, ``tokenizer_config.json`` with the GGUF's ``tokenizer.chat_template``, BOS / EOS /
pad tokens, and ``generation_config.json``. The document conventions of the run
(:class:`hone.tokens.conventions.TokenConventions`) are read from the same files.

    files = hf_tokenizer_files(Path("Llama-3.2-1B"))
    conv = conventions_of(tokenizer, files, recipe.model)
    save_hf(model, tokenizer, out, tokenizer_files=files)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from hone.errors import HoneError
from hone.model.gguf import gguf_meta, gguf_reader
from hone.recipe import ModelConfig
from hone.tokens import EOS_TOKEN
from hone.tokens.conventions import TokenConventions

# What transformers reads for a tokenizer and for generation, besides the weights and config.json.
TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                        "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
                        "vocab.json", "merges.txt")


def hf_tokenizer_files(model_dir: Path) -> dict[str, bytes]:
    """The tokenizer and generation files of an HF model directory, as they are."""
    model_dir = Path(model_dir)
    return {name: (model_dir / name).read_bytes() for name in TOKENIZER_FILE_NAMES if (model_dir / name).is_file()}


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def gguf_tokenizer_files(path_or_reader: Any, tokenizer: Tokenizer) -> dict[str, bytes]:
    """HF tokenizer files for a GGUF's tokenizer: its chat template and special tokens kept."""
    reader = gguf_reader(path_or_reader)

    def token(key: str) -> str | None:
        tid = gguf_meta(reader, key, None)
        return tokenizer.id_to_token(int(tid)) if tid is not None else None

    arch = gguf_meta(reader, "general.architecture", "llama")
    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    pad = token("tokenizer.ggml.padding_token_id") or eos
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "pad_token": pad,
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(gguf_meta(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(gguf_meta(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(gguf_meta(reader, f"{arch}.context_length", 2048)),
    }
    template = gguf_meta(reader, "tokenizer.chat_template", None)
    if template:
        config["chat_template"] = str(template)
    special = {k: v for k, v in config.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token") and v}
    generation = {k: gguf_meta(reader, f"tokenizer.ggml.{k}", None) for k in ("bos_token_id", "eos_token_id")}
    generation["pad_token_id"] = tokenizer.token_to_id(pad) if pad else None
    return {"tokenizer.json": tokenizer.to_str(pretty=True).encode("utf-8"),
            "tokenizer_config.json": _dump(config), "special_tokens_map.json": _dump(special),
            "generation_config.json": _dump({k: v for k, v in generation.items() if v is not None})}


def trained_tokenizer_files(tokenizer: Tokenizer, max_length: int) -> dict[str, bytes]:
    """Files for the BPE Hone trains for a random model: ``<|endoftext|>`` ends documents and pads."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": EOS_TOKEN,
              "pad_token": EOS_TOKEN, "add_bos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": max_length}
    eos = tokenizer.token_to_id(EOS_TOKEN)
    return {"tokenizer.json": tokenizer.to_str(pretty=True).encode("utf-8"),
            "tokenizer_config.json": _dump(config),
            "special_tokens_map.json": _dump({"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}),
            "generation_config.json": _dump({"eos_token_id": eos, "pad_token_id": eos})}


def _json_file(files: dict[str, bytes], name: str) -> dict:
    if name not in files:
        return {}
    try:
        data = json.loads(files[name].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HoneError(f"{name}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def conventions_of(tokenizer: Tokenizer, files: dict[str, bytes], model: ModelConfig | None = None,
                   model_config: dict | None = None) -> TokenConventions:
    """The run's document conventions: the recipe's ``model.*_token`` / ``add_bos`` fields, else
    what the tokenizer files say (see :meth:`TokenConventions.detect`)."""
    tc = _json_file(files, "tokenizer_config.json")
    mc = dict(model_config or {})
    for k, v in _json_file(files, "generation_config.json").items():
        mc.setdefault(k, v)
    return TokenConventions.detect(tokenizer, tc, mc, eos_token=model.eos_token if model else None,
                                   bos_token=model.bos_token if model else None,
                                   pad_token=model.pad_token if model else None,
                                   add_bos=model.add_bos if model else None)


def with_pad_token(files: dict[str, bytes], conventions: TokenConventions) -> dict[str, bytes]:
    """The files with ``pad_token`` set in tokenizer_config.json when they name none (so a
    batch can be padded with the exported tokenizer); every other byte unchanged."""
    tc = _json_file(files, "tokenizer_config.json")
    if not tc or tc.get("pad_token") or conventions.pad_token is None:
        return files
    return {**files, "tokenizer_config.json": _dump({**tc, "pad_token": conventions.pad_token})}
