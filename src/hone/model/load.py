"""The recipe's base model: SmolLM2 from its package, a GGUF file, an HF directory, or a
random model (with a BPE trained on the curated corpus), placed on the recipe's device."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer

from hone.errors import HoneError
from hone.model.gguf import gguf_config, gguf_reader, load_gguf, smollm2_gguf_path, tokenizer_from_gguf
from hone.model.hf import meta_hf
from hone.model.hf_backend import HFCausalLM
from hone.model.llama import Llama, LlamaConfig
from hone.model.tokenizer_files import conventions_of, gguf_tokenizer_files, hf_tokenizer_files, trained_tokenizer_files
from hone.model.weights import SafetensorsDir, TensorDict, WeightSource, load_weights, materialize, names_match
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
    """The recipe's ``[model]`` and its tokenizer, on ``train.device``: built on the meta device,
    materialized there and its weights loaded by name, the path every torchrun worker takes too
    (:func:`hone.model.weights.load_weights`)."""
    t0 = time.perf_counter()
    tok = base_tokenizer(recipe, workdir)
    model = base_meta_model(recipe, tok)
    device = pick_device(recipe.train.device)
    materialize(model, device)
    load_weights(model, base_weights(recipe, workdir, tok))
    n = sum(p.numel() for p in model.parameters()) / 1e6
    log(f"model: {recipe.model.source} ({n:.1f}M params, vocab {tok.get_vocab_size()}) loaded in "
        f"{time.perf_counter() - t0:.1f}s, on {device}")
    return model, tok


def _gguf_path(recipe: Recipe) -> Path:
    if recipe.model.source == "smollm2":
        return smollm2_gguf_path()
    if not Path(recipe.model.path).exists():
        raise HoneError(f"model.path: {recipe.model.path}: GGUF file not found")
    return Path(recipe.model.path)


def base_tokenizer(recipe: Recipe, workdir: Path) -> Tokenizer:
    """The base model's tokenizer, without its weights."""
    src = recipe.model
    if src.source in ("smollm2", "gguf"):
        return tokenizer_from_gguf(gguf_reader(_gguf_path(recipe)))
    if src.source == "hf":
        tok_path = Path(src.path) / "tokenizer.json"
        if not tok_path.is_file():
            if not (Path(src.path) / "config.json").is_file():
                raise HoneError(f"{Path(src.path) / 'config.json'}: file not found (not a Hugging Face model "
                                "directory?)")
            raise HoneError(f"model.path: {src.path}: no tokenizer.json beside the weights")
        return Tokenizer.from_file(str(tok_path))
    return random_model_tokenizer(recipe, workdir)


def random_model_config(recipe: Recipe, tok: Tokenizer | None) -> LlamaConfig:
    """The random model's config; without its tokenizer (a dry run) the vocabulary is model.random.vocab,
    the size the tokenizer is trained to."""
    r = recipe.model.random
    return LlamaConfig(vocab_size=tok.get_vocab_size() if tok is not None else r.vocab, hidden_size=r.hidden,
                       intermediate_size=r.ffn, num_hidden_layers=r.layers, num_attention_heads=r.heads,
                       num_key_value_heads=r.kv_heads,
                       max_position_embeddings=max(recipe.train.seq_len, recipe.eval.seq_len) + 1,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)


def base_meta_model(recipe: Recipe, tok: Tokenizer | None = None) -> torch.nn.Module:
    """The recipe's base model on the meta device (shapes and names, no storage): Hone's Llama,
    or the transformers backend for an HF directory it chooses (config.json alone is read). A random
    model's vocabulary is ``tok``'s."""
    src = recipe.model
    if src.source == "hf":
        return meta_hf(Path(src.path), backend=src.backend)
    cfg = gguf_config(gguf_reader(_gguf_path(recipe))) if src.source in ("smollm2", "gguf") \
        else random_model_config(recipe, tok)
    with torch.device("meta"):
        return Llama(cfg)


def base_weights(recipe: Recipe, workdir: Path, tok: Tokenizer | None = None) -> WeightSource:
    """Where the base model's weights come from: an HF directory's safetensors, read slice by slice;
    a GGUF file (dequantized whole: small models) or the seeded random init, in memory."""
    src = recipe.model
    if src.source == "hf":
        files = SafetensorsDir(Path(src.path))
        model = meta_hf(Path(src.path), backend=src.backend)
        if getattr(model, "backend", "hone") == "hone" or names_match(model, files):
            return files
        # transformers converts this family's stored tensors on load (fused experts, ...): whole, in memory
        files.close()
        return TensorDict(HFCausalLM.from_pretrained(Path(src.path), torch.float32).state_dict(), src.path)
    if src.source in ("smollm2", "gguf"):
        model, _ = load_gguf(_gguf_path(recipe))
        return TensorDict(model.state_dict(), str(_gguf_path(recipe)))
    model = Llama(random_model_config(recipe, tok or random_model_tokenizer(recipe, workdir)))
    model.init_weights(seed=recipe.run.seed)
    return TensorDict(model.state_dict(), f"random init (seed {recipe.run.seed})")


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
