"""Tokenize stage: corpus Parquet → flat token shards per split and domain.

Layout (DESIGN.md "Token shards")::

    tokens/<split>/<domain>/shard-00000.bin   # little-endian uint16 (vocab < 65536) or uint32
    tokens/<split>/<domain>/index.json        # dtype, token counts, document offsets, tokenizer hash

Documents are separated by the EOS token, so a packed training window never hides a
document boundary from the model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hone.errors import HoneError
from hone.rundir import atomic_path, is_done, mark_done, read_json, write_json
from hone.tokens.conventions import TokenConventions

EOS_TOKEN = "<|endoftext|>"  # the separator of the BPE trained for random models


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def eos_id(tokenizer: Tokenizer) -> int:
    """The document separator detected from the tokenizer alone (see :mod:`hone.tokens.conventions`)."""
    return TokenConventions.detect(tokenizer).eos_id


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on ``texts`` (tiny random models); EOS is id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def read_corpus(corpus_dir: Path) -> dict[str, list[str]]:
    """Texts of the curated corpus grouped by their ``domain`` column, in file order."""
    files = sorted(Path(corpus_dir).glob("*.parquet"))
    if not files:
        raise HoneError(f"{corpus_dir}: no Parquet files (run the curate stage first)")
    groups: dict[str, list[str]] = {}
    for f in files:
        table = pq.read_table(f, columns=["text", "domain"])
        for text, domain in zip(table.column("text").to_pylist(), table.column("domain").to_pylist()):
            groups.setdefault(domain or "general", []).append(text)
    return groups


def write_shard(texts: list[str], tokenizer: Tokenizer, out_dir: Path, seed: int) -> dict:
    """Tokenize ``texts`` (shuffled with ``seed``) into one EOS-separated shard + index."""
    order = np.random.default_rng(seed).permutation(len(texts))
    vocab = tokenizer.get_vocab_size()
    dtype = np.dtype("<u2") if vocab < 65536 else np.dtype("<u4")
    eos = eos_id(tokenizer)
    encoded = tokenizer.encode_batch([texts[i] for i in order], add_special_tokens=False)
    pieces, offsets, n = [], [], 0
    for enc in encoded:
        ids = enc.ids + [eos]
        offsets.append(n)
        pieces.append(np.asarray(ids, dtype=dtype))
        n += len(ids)
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "shard-00000.bin") as tmp:
        flat.tofile(tmp)
    index = {
        "dtype": dtype.str,
        "shards": [{"file": "shard-00000.bin", "tokens": int(n), "docs": len(offsets)}],
        "tokens": int(n),
        "docs": len(offsets),
        "doc_offsets": offsets,
        "eos_id": eos,
        "tokenizer_hash": tokenizer_hash(tokenizer),
    }
    write_json(out_dir / "index.json", index)
    return index


def tokenize_corpus(corpus_dir: Path, tokenizer: Tokenizer, out_dir: Path, seed: int = 0) -> dict:
    """Tokenize every domain of the corpus into ``out_dir/train/<domain>/``; skip if done."""
    out_dir = Path(out_dir)
    marker = out_dir / "train"
    thash = tokenizer_hash(tokenizer)
    if is_done(marker) and read_json(Path(str(marker) + ".done")).get("tokenizer_hash") == thash:
        return {d.name: read_json(d / "index.json") for d in sorted(marker.iterdir()) if d.is_dir()}
    summary = {}
    for domain, texts in sorted(read_corpus(corpus_dir).items()):
        summary[domain] = write_shard(texts, tokenizer, marker / domain, seed)
    mark_done(marker, {"tokenizer_hash": thash, "domains": {k: v["tokens"] for k, v in summary.items()}})
    return summary


def load_tokens(domain_dir: Path) -> np.ndarray:
    """Memory-map a domain's token shards (one flat array per domain)."""
    domain_dir = Path(domain_dir)
    index_path = domain_dir / "index.json"
    if not index_path.exists():
        raise HoneError(f"{index_path}: token index not found (run the tokenize stage first)")
    index = read_json(index_path)
    arrays = [np.memmap(domain_dir / s["file"], dtype=np.dtype(index["dtype"]), mode="r")
              for s in index["shards"]]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
