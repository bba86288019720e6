"""Hugging Face model directories (safetensors only, never pickles), in and out.

    save_hf(model, tok, Path("runs/x/final"))          # loads with transformers' from_pretrained
    model, tok = load_hf(Path("runs/x/final"))

Large models are written as transformers shards them: ``model-00001-of-0000N.safetensors``
and ``model.safetensors.index.json`` (``weight_map``, ``metadata.total_size``), each shard at
most ``max_shard_bytes`` (one file when everything fits).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from hone.errors import HoneError
from hone.model.hf_backend import HFCausalLM, choose_backend
from hone.model.llama import Llama, LlamaConfig
from hone.model.weights import INDEX_FILE, SINGLE_FILE
from hone.rundir import atomic_dir, write_json

# transformers' save_pretrained default (5 GB a shard)
MAX_SHARD_BYTES = 5 * 10**9


def save_hf(
    model: Llama | HFCausalLM,
    tokenizer: Tokenizer | None,
    outdir: Path | str,
    extra_files: dict[str, dict] | None = None,
    tokenizer_files: dict[str, bytes] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write a directory ``transformers.from_pretrained`` loads; swapped in atomically.

    ``extra_files`` adds JSON files (name -> content), e.g. the training state beside the weights.
    ``tokenizer_files`` (name -> bytes, see :mod:`hone.model.tokenizer_files`) are written as they
    are, in place of the tokenizer files generated from ``tokenizer``: the base model's own
    tokenizer, chat template, special tokens and generation config travel unchanged.
    ``max_shard_bytes`` caps each weights file (transformers' sharded layout beyond it).
    """
    outdir = Path(outdir)
    if isinstance(model, HFCausalLM):  # the transformers backend: its own save_pretrained, HF names and config
        cfg = model.config.get_text_config()
        write_model = partial(model.save_pretrained, max_shard_size=max_shard_bytes)
    else:
        cfg, write_model = model.config, partial(_write_llama, model, max_shard_bytes=max_shard_bytes)
    with atomic_dir(outdir) as tmp:
        write_model(tmp)
        if tokenizer is not None and not tokenizer_files:
            tokenizer.save(str(tmp / "tokenizer.json"))
            write_json(tmp / "tokenizer_config.json", _tokenizer_config(tokenizer, cfg))
        for name, content in (tokenizer_files or {}).items():
            (tmp / name).write_bytes(content)
        for name, content in (extra_files or {}).items():
            write_json(tmp / name, content)
    return outdir


def _write_llama(model: Llama, outdir: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    cfg = model.config
    dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    tensors = {
        name: t.detach()
        for name, t in model.state_dict().items()
        if not (cfg.tie_word_embeddings and name == "lm_head.weight")
    }
    write_safetensors(tensors, outdir, max_shard_bytes)
    write_json(outdir / "config.json", cfg.to_hf_dict(torch_dtype=dtype))
    write_json(outdir / "generation_config.json", _generation_config(cfg))


def shard_plan(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order, as transformers splits them: a shard is closed when the
    next tensor would take it past ``max_shard_bytes`` (a tensor larger than that gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in sizes.items():
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def shard_file_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_safetensors(tensors: dict[str, torch.Tensor], outdir: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """``model.safetensors``, or shards of at most ``max_shard_bytes`` and their index, into ``outdir``
    (the caller's temporary directory: :func:`save_hf` swaps it in whole). Each shard's tensors are
    copied to the CPU only while that shard is written."""
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    shards = shard_plan(sizes, max_shard_bytes)
    files = shard_file_names(len(shards))
    for names, file in zip(shards, files):
        save_file({k: tensors[k].to("cpu").contiguous() for k in names}, str(outdir / file), metadata={"format": "pt"})
    if len(files) > 1:
        write_json(outdir / INDEX_FILE, {"metadata": {"total_size": sum(sizes.values())},
                                         "weight_map": {k: f for names, f in zip(shards, files) for k in names}})


def _generation_config(cfg: LlamaConfig) -> dict[str, Any]:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}


def _tokenizer_config(tokenizer: Tokenizer, cfg: LlamaConfig) -> dict[str, Any]:
    def text(token_id: int | list[int] | None) -> str | None:
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        return tokenizer.id_to_token(token_id) if token_id is not None else None

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(cfg.bos_token_id),
        "eos_token": text(cfg.eos_token_id),
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }


def load_hf(path: Path | str, dtype: torch.dtype | None = None,
            backend: str = "auto") -> tuple[Llama | HFCausalLM, Tokenizer | None]:
    """An HF directory (safetensors only) as a model and its tokenizer: Hone's own Llama for the
    configs it builds exactly, else the transformers backend (``backend``, the recipe's
    ``model.backend``, as :func:`hone.model.hf_backend.choose_backend` decides).

    ``dtype`` None keeps the stored dtype. The tokenizer is None when there is no tokenizer.json.
    """
    path = Path(path)
    config = read_hf_config(path)
    chosen, reason = choose_backend(config, backend)
    if chosen == "transformers":
        model = HFCausalLM.from_pretrained(path, dtype, reason)
    else:
        tensors = read_safetensors(path)
        if dtype is not None:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        model = Llama.from_state_dict(LlamaConfig.from_hf_dict(config), tensors)
    tok_path = path / "tokenizer.json"
    return model, Tokenizer.from_file(str(tok_path)) if tok_path.is_file() else None


def read_hf_config(path: Path) -> dict:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise HoneError(f"{config_path}: file not found (not a Hugging Face model directory?)")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HoneError(f"{config_path}: not valid JSON ({e})") from None


def meta_hf(path: Path | str, backend: str = "auto") -> Llama | HFCausalLM:
    """An HF directory's model on the meta device (fp32 parameters, no storage, no weights read):
    Hone's Llama, or the transformers backend as :func:`load_hf` would choose; config.json alone
    is enough (for `hone train --dry-run`)."""
    path = Path(path)
    config = read_hf_config(path)
    chosen, reason = choose_backend(config, backend)
    if chosen == "transformers":
        return HFCausalLM.on_meta(path, reason)
    with torch.device("meta"):
        return Llama(LlamaConfig.from_hf_dict(config))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if not index.is_file():
        raise HoneError(f"{single}: file not found (nor {index.name}; only safetensors weights are read)")
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (path / shard).is_file():
            raise HoneError(f"{path / shard}: file not found (listed in {index.name})")
        tensors.update(load_file(str(path / shard)))
    return tensors
