"""Reading a domain's token shards: one array-like over all of them, and their document offsets.

A domain directory (written by :mod:`hone.tokens.tokenize`)::

    shard-00000.bin       # the framed documents' ids, little-endian uint16 (vocab < 65536) or uint32
    shard-00000.idx.npy   # int64 start of each document in the shard
    shard-00000.done      # the shard's record: a rerun reuses the shard when it matches
    index.json            # dtype, the shards in reading order, totals, conventions, tokenizer hash

The training stream is the shards concatenated in ``index.json``'s order. :func:`load_tokens`
serves it without concatenating: one shard is its memory map, several are a
:class:`ShardedTokens` that slices across shard boundaries.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from hone.errors import HoneError
from hone.rundir import read_json


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian unsigned type that holds every id of the vocabulary."""
    return np.dtype("<u2") if vocab_size < 65536 else np.dtype("<u4")


class ShardedTokens:
    """Several shards read as one flat array: ``len``, ``dtype`` and slicing ``[a:b]`` across
    shard boundaries (what :class:`hone.train.data.TokenStream` needs), each shard memory-mapped
    when first touched."""

    ndim = 1

    def __init__(self, paths: list[Path], lengths: list[int], dtype: np.dtype):
        self.paths = [Path(p) for p in paths]
        self.dtype = np.dtype(dtype)
        self.bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self._maps: list[np.memmap | None] = [None] * len(self.paths)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def shard(self, i: int) -> np.ndarray:
        if self._maps[i] is None:
            self._maps[i] = open_shard(self.paths[i], self.dtype, int(self.bounds[i + 1] - self.bounds[i]))
        return self._maps[i]

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._range(start, max(start, stop))
            return self.take(np.arange(start, stop, step))
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"index {key} out of range for {n} tokens")
            s = int(np.searchsorted(self.bounds, i, side="right")) - 1
            return self.shard(s)[i - self.bounds[s]]
        return self.take(np.asarray(key))

    def _range(self, start: int, stop: int) -> np.ndarray:
        pieces = []
        s = int(np.searchsorted(self.bounds, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self.bounds[s + 1]))
            pieces.append(self.shard(s)[start - self.bounds[s]:end - self.bounds[s]])
            start, s = end, s + 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Tokens at the positions ``idx`` (any order, negative from the end)."""
        idx = np.asarray(idx, dtype=np.int64)
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} tokens")
        which = np.searchsorted(self.bounds, idx, side="right") - 1
        out = np.empty(idx.shape, dtype=self.dtype)
        for s in np.unique(which):
            mask = which == s
            out[mask] = self.shard(int(s))[idx[mask] - self.bounds[s]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        flat = self._range(0, len(self))
        return np.asarray(flat, dtype=dtype) if dtype is not None else np.asarray(flat)

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self)} tokens, {len(self.paths)} shards, {self.dtype})"


def open_shard(path: Path, dtype: np.dtype, tokens: int | None = None) -> np.ndarray:
    """A shard's memory map; its length checked against the index when given."""
    path = Path(path)
    if not path.is_file():
        raise HoneError(f"{path}: token shard not found (run the tokenize stage again)")
    dtype = np.dtype(dtype)
    size = path.stat().st_size
    if tokens is not None and size != tokens * dtype.itemsize:
        raise HoneError(f"{path}: {size} bytes, the index says {tokens} tokens of {dtype.itemsize} bytes "
                        f"(a partial shard: run the tokenize stage again)")
    if size == 0:  # np.memmap refuses an empty file
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def read_index(domain_dir: Path) -> dict:
    index_path = Path(domain_dir) / "index.json"
    if not index_path.exists():
        raise HoneError(f"{index_path}: token index not found (run the tokenize stage first)")
    return read_json(index_path)


def load_tokens(domain_dir: Path) -> np.ndarray | ShardedTokens:
    """A domain's token stream, the shards in the index's order: the memory map of its one
    shard, or a :class:`ShardedTokens` view over several (nothing is copied or concatenated)."""
    domain_dir = Path(domain_dir)
    index = read_index(domain_dir)
    dtype = np.dtype(index["dtype"])
    shards = index["shards"]
    if len(shards) == 1:
        return open_shard(domain_dir / shards[0]["file"], dtype, shards[0].get("tokens"))
    if not shards:
        return np.empty(0, dtype=dtype)
    return ShardedTokens([domain_dir / s["file"] for s in shards], [int(s["tokens"]) for s in shards], dtype)


def doc_offsets(domain_dir: Path) -> np.ndarray:
    """Start of every document in the domain's stream (int64, reading order): from each shard's
    ``.idx.npy``, or the ``doc_offsets`` list of an index written without them (a union stream
    of the experts, or a run directory from before the side files)."""
    domain_dir = Path(domain_dir)
    index = read_index(domain_dir)
    shards = index["shards"]
    if not all("offsets" in s for s in shards):
        return np.asarray(index.get("doc_offsets", []), dtype=np.int64)
    parts, start = [], 0
    for s in shards:
        path = domain_dir / s["offsets"]
        if not path.is_file():
            raise HoneError(f"{path}: document offsets not found (run the tokenize stage again)")
        parts.append(np.load(path) + start)
        start += int(s["tokens"])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
