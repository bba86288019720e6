"""The recipe's base model: SmolLM2 from its package, a GGUF file, an HF directory, or a
random model (with a BPE trained on the curated corpus), placed on the recipe's device."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer

from hone.errors import HoneError
from hone.model.gguf import load_gguf, smollm2_gguf_path
from hone.model.hf import load_hf
from hone.model.llama import Llama, LlamaConfig
from hone.model.tokenizer_files import conventions_of, gguf_tokenizer_files, hf_tokenizer_files, trained_tokenizer_files
from hone.recipe import Recipe
from hone.rundir import CORPUS_DIR, TOKENIZER_FILE, read_json, source_train_dir, write_text
from hone.tokens import read_corpus, train_bpe
from hone.tokens.conventions import TokenConventions

Log = Callable[[str], None]


def pick_device(choice: str) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else the CPU; ``cuda`` without one is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise HoneError("train.device is 'cuda' but torch sees no CUDA device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def load_base_model(recipe: Recipe, workdir: Path, log: Log) -> tuple[torch.nn.Module, Tokenizer]:
    """The recipe's ``[model]`` and its tokenizer, on ``train.device``."""
    src = recipe.model
    t0 = time.perf_counter()
    if src.source == "smollm2":
        model, tok = load_gguf(smollm2_gguf_path())
    elif src.source == "gguf":
        if not Path(src.path).exists():
            raise HoneError(f"model.path: {src.path}: GGUF file not found")
        model, tok = load_gguf(Path(src.path))
    elif src.source == "hf":
        model, tok = load_hf(Path(src.path), backend=recipe.model.backend)
        if tok is None:
            raise HoneError(f"model.path: {src.path}: no tokenizer.json beside the weights")
    else:
        tok = random_model_tokenizer(recipe, workdir)
        r = src.random
        cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=r.hidden, intermediate_size=r.ffn,
                          num_hidden_layers=r.layers, num_attention_heads=r.heads, num_key_value_heads=r.kv_heads,
                          max_position_embeddings=max(recipe.train.seq_len, recipe.eval.seq_len) + 1,
                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
        model = Llama(cfg)
        model.init_weights(seed=recipe.run.seed)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    device = pick_device(recipe.train.device)
    model.to(device)
    log(f"model: {src.source} ({n:.1f}M params, vocab {tok.get_vocab_size()}) loaded in "
        f"{time.perf_counter() - t0:.1f}s, on {device}")
    return model, tok


def base_tokenizer_files(recipe: Recipe, tokenizer: Tokenizer) -> dict[str, bytes]:
    """The base model's tokenizer files, to travel with every exported model
    (:mod:`hone.model.tokenizer_files`): an HF directory's own, a GGUF's from its metadata."""
    src = recipe.model
    if src.source == "hf":
        return hf_tokenizer_files(Path(src.path))
    if src.source in ("smollm2", "gguf"):
        return gguf_tokenizer_files(smollm2_gguf_path() if src.source == "smollm2" else Path(src.path), tokenizer)
    return trained_tokenizer_files(tokenizer, max(recipe.train.seq_len, recipe.eval.seq_len) + 1)


def base_conventions(recipe: Recipe, tokenizer: Tokenizer, files: dict[str, bytes]) -> TokenConventions:
    """How the run frames documents: the recipe's model.eos_token / bos_token / add_bos /
    pad_token, else the base's tokenizer files and config."""
    config = {}
    if recipe.model.source == "hf" and (Path(recipe.model.path) / "config.json").is_file():
        config = read_json(Path(recipe.model.path) / "config.json")
    return conventions_of(tokenizer, files, recipe.model, config)


def random_model_tokenizer(recipe: Recipe, workdir: Path) -> Tokenizer:
    """Train (once) a BPE on the curated pool and the sources' training documents for the tiny random model."""
    path = workdir / TOKENIZER_FILE
    if path.exists():
        return Tokenizer.from_file(str(path))
    corpora = ([workdir / CORPUS_DIR] if recipe.data.uses_pool else []) + [
        source_train_dir(workdir, s.name) for s in recipe.data.sources]
    texts = [t for corpus in corpora for group in read_corpus(corpus).values() for t in group]
    tok = train_bpe(texts, recipe.model.random.vocab)
    write_text(path, tok.to_str())
    return tok
