"""Tokenize stage: corpus Parquet → token shards per split and domain, and what training used of them.

Layout (README "The run directory"; details in :mod:`hone.tokens.shards`)::

    tokens/<split>/<domain>/shard-00000.bin       # little-endian uint16 (vocab < 65536) or uint32
    tokens/<split>/<domain>/shard-00000.idx.npy   # int64 start of each document in the shard
    tokens/<split>/<domain>/index.json            # dtype, shards in reading order, totals, conventions

Every document is framed ``[BOS] ids EOS`` (:mod:`hone.tokens.conventions`), so a packed
training window never hides a document boundary from the model. The stage streams
(:mod:`hone.tokens.tokenize`); :mod:`hone.tokens.ledger` counts what a loader used.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hone.errors import HoneError
from hone.tokens.conventions import TokenConventions
from hone.tokens.ledger import token_ledger
from hone.tokens.shards import ShardedTokens, doc_offsets, load_tokens, token_dtype, tokenizer_hash
from hone.tokens.tokenize import tokenize_corpus, write_shard

__all__ = ["EOS_TOKEN", "ShardedTokens", "TokenConventions", "doc_offsets", "eos_id", "load_tokens", "read_corpus",
           "token_dtype", "token_ledger", "tokenize_corpus", "tokenizer_hash", "train_bpe", "write_shard"]

EOS_TOKEN = "<|endoftext|>"  # the separator of the BPE trained for random models


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
    """Texts of the curated corpus grouped by their ``domain`` column, in file order (in memory:
    for training a small BPE; the tokenize stage streams instead)."""
    files = sorted(Path(corpus_dir).glob("*.parquet"))
    if not files:
        raise HoneError(f"{corpus_dir}: no Parquet files (run the curate stage first)")
    groups: dict[str, list[str]] = {}
    for f in files:
        table = pq.read_table(f, columns=["text", "domain"])
        for text, domain in zip(table.column("text").to_pylist(), table.column("domain").to_pylist()):
            groups.setdefault(domain or "general", []).append(text)
    return groups
