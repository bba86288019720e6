"""MinHash LSH near-duplicate detection, vectorized with numpy.

Shingles: word n-grams (``unit="word"``) or byte n-grams (``unit="char"``) of the lowercased
text. A word is a maximal run of bytes that are neither ASCII whitespace nor ASCII
punctuation (non-ASCII letters are word bytes); a document with fewer than n words is one
shingle. The Python reference, used by tests and the benchmark's datasketch baseline::

    words = re.findall(r"[^\\s!-/:-@\\[-`{-~]+", text.lower(), flags=re.ASCII)

Why numpy all the way: pure-Python MinHash libraries spend their time in a per-shingle
loop. Here the whole batch's bytes are one array; a word's hash comes from 8-byte loads of
its bytes (``word_hashes``), a shingle's from a weighted sum of its word hashes (uint64,
wrapping); each document keeps its distinct shingles as sorted uint32 (one sort for the
batch: ``per_doc_unique``), and the k permutations are multiply-shift hashes applied to all
of them at once, reduced per document with ``np.minimum.reduceat``.

LSH with b bands of r rows: two documents with Jaccard s share a band with probability
1 − (1 − s^r)^b. From a threshold we choose the largest r with a miss rate ≤ 1% at the
threshold itself, so pairs above it are nearly always candidates; each candidate pair is
then verified on its true shingle Jaccard, which keeps precision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import xxhash

from hone.errors import HoneError

M64 = np.uint64
PRIME = M64(0x100000001B3)  # FNV's 64-bit prime: the base of the polynomial byte hash
WORD_RE = re.compile(r"[^\s!-/:-@\[-`{-~]+", flags=re.ASCII)
MAX_MISS_AT_THRESHOLD = 0.01
SEED = 0x5EED


def _is_word_byte() -> np.ndarray:
    table = np.ones(256, dtype=bool)
    separators = b" \t\n\r\x0b\x0c" + bytes(range(33, 48)) + bytes(range(58, 65)) + bytes(range(91, 97))
    for c in separators + bytes(range(123, 127)):
        table[c] = False
    return table


WORD_BYTE = _is_word_byte()


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads every input bit over the output (in place on a copy)."""
    x = x ^ (x >> M64(30))
    x *= M64(0xBF58476D1CE4E5B9)
    x ^= x >> M64(27)
    x *= M64(0x94D049BB133111EB)
    x ^= x >> M64(31)
    return x


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) for a Jaccard threshold: the largest r whose miss rate at the threshold
    is ≤ 1% with b = num_perm // r bands (fewer, larger rows mean fewer false candidates)."""
    if not 0 < threshold < 1:
        raise HoneError(f"threshold must be between 0 and 1 (got {threshold})")
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if (1 - threshold**r) ** b <= MAX_MISS_AT_THRESHOLD:
            best = (b, r)
    return best


def collision_probability(s: float, bands: int, rows: int) -> float:
    return 1 - (1 - s**rows) ** bands


@dataclass(frozen=True)
class MinHasher:
    """Signatures and shingle hashes for batches of texts; deterministic for a given seed."""

    num_perm: int = 128
    ngram: int = 5
    unit: str = "word"  # "word" or "char"
    seed: int = SEED

    def __post_init__(self):
        if self.unit not in ("word", "char"):
            raise HoneError(f"shingle unit must be 'word' or 'char' (got {self.unit!r})")
        if self.ngram < 1 or self.num_perm < 1:
            raise HoneError(f"ngram and num_perm must be >= 1 (got {self.ngram}, {self.num_perm})")

    @property
    def _perm(self) -> np.ndarray:
        """One odd 64-bit multiplier per permutation (multiply-shift hashing)."""
        rng = np.random.default_rng(self.seed)
        return rng.integers(1, 2**63, size=self.num_perm, dtype=np.uint64) * M64(2) + M64(1)

    @property
    def _weights(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed + 1)
        return rng.integers(1, 2**63, size=self.ngram, dtype=np.uint64) * M64(2) + M64(1)

    def shingles(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(shingle hashes, per-document start offsets into them; length len(texts) + 1)."""
        data, starts = _concat(texts)
        if self.unit == "word":
            return self._word_shingles(data, starts)
        return self._char_shingles(data, starts)

    def shingle_sets(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Each document's distinct shingles as sorted uint32 (the top half of the 64-bit
        hash), concatenated, and their offsets: the compact form kept to verify candidates.

        32 bits are plenty for a Jaccard: two documents of n shingles share a spurious value
        with probability about n²/2³², a shift of Jaccard near 1e-4 at n = 10,000."""
        h, offsets = self.shingles(texts)
        return per_doc_unique(h, offsets)

    def _word_shingles(self, data: np.ndarray, doc_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        isw = WORD_BYTE[data]
        edges = np.diff(isw.view(np.int8), prepend=np.int8(0))
        ws, we = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # data ends with a separator
        if not len(ws):
            return np.zeros(0, np.uint64), np.zeros(len(doc_starts), np.int64)
        wh = word_hashes(data, ws, we)
        doc_of_word = np.searchsorted(doc_starts, ws, side="right") - 1
        return self._ngrams(wh, doc_of_word, len(doc_starts) - 1)

    def _char_shingles(self, data: np.ndarray, doc_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, ndocs = self.ngram, len(doc_starts) - 1
        lens = np.diff(doc_starts) - 1  # each text is followed by one separator byte
        pos = np.arange(len(data) - 1) if len(data) else np.zeros(0, np.int64)
        doc = np.searchsorted(doc_starts, pos, side="right") - 1
        end = np.minimum(pos + n, doc_starts[doc] + lens[doc])
        first = pos == doc_starts[doc]
        ok = (pos + n <= doc_starts[doc] + lens[doc]) | (first & (lens[doc] < n) & (lens[doc] > 0))
        pos, end, doc = pos[ok], end[ok], doc[ok]
        padded = np.concatenate((data.astype(np.uint64) + M64(1), np.zeros(n, np.uint64)))
        acc = np.zeros(len(pos), dtype=np.uint64)
        pw = _powers(n)
        for j in range(n):
            acc += np.where(pos + j < end, padded[pos + j] * pw[j], M64(0))
        return mix64(acc), np.searchsorted(doc, np.arange(ndocs + 1), side="left")

    def _ngrams(self, wh: np.ndarray, doc_of_word: np.ndarray, ndocs: int) -> tuple[np.ndarray, np.ndarray]:
        n, nw = self.ngram, len(wh)
        word_starts = np.searchsorted(doc_of_word, np.arange(ndocs + 1), side="left")
        rem = word_starts[doc_of_word + 1] - np.arange(nw)  # words left in the doc from here
        # Shingles: every position with n words left in its document, and the first word of a
        # document shorter than n (whose one shingle is all its words).
        full = np.flatnonzero(rem >= n)
        short = word_starts[:-1][(np.diff(word_starts) < n) & (np.diff(word_starts) > 0)]
        pos = np.sort(np.concatenate((full, short))) if len(short) else full
        padded = np.concatenate((wh, np.zeros(n, dtype=np.uint64)))
        w = self._weights
        acc = wh * w[0]  # contiguous slices for every position, then one gather
        for j in range(1, n):
            acc += padded[j:j + nw] * w[j]
        acc = acc[pos]
        if len(short):  # a short document's sum must stop at its own last word
            k = np.searchsorted(pos, short)
            acc[k] = 0
            for j in range(n):
                acc[k] += np.where(rem[short] > j, padded[short + j] * w[j], M64(0))
        return mix64(acc), np.searchsorted(doc_of_word[pos], np.arange(ndocs + 1), side="left")

    def signatures(self, texts: list[str], chunk: int = 2048) -> np.ndarray:
        """(len(texts), num_perm) uint32 MinHash signatures; an empty document gets all
        0xFFFFFFFF, which ``candidate_pairs`` is told to skip."""
        sets, offsets = self.shingle_sets(texts)
        return self.signatures_of(sets, offsets, chunk)

    def signatures_of(self, h: np.ndarray, offsets: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """Signatures from shingle values (``shingle_sets`` output, or any uint32/uint64 hashes).

        Permutation k maps x to the top 32 bits of ``a_k · (2x + 1) mod 2**64``: multiply-shift
        hashing of values that are already random hashes. Measured against an ideal estimator
        (binomial spread of the match rate at 128 permutations) on random sets, it is as good
        as ``a·x + b``, and the add cost as much as the multiply; ``2x + 1`` keeps 0 from
        being every permutation's minimum."""
        ndocs = len(offsets) - 1
        sig = np.full((ndocs, self.num_perm), np.uint32(0xFFFFFFFF), dtype=np.uint32)
        a = self._perm
        x = (np.asarray(h).astype(np.uint64) << M64(1)) | M64(1)
        nonempty = np.flatnonzero(np.diff(offsets) > 0)
        ends = offsets[nonempty + 1]
        # Groups of documents with about `chunk` shingles: a (k, S) uint64 block that stays in
        # cache; permutation-major so the per-document min runs over contiguous memory.
        d0 = 0
        while d0 < len(nonempty):
            d1 = min(max(d0 + 1, int(np.searchsorted(ends, offsets[nonempty[d0]] + chunk, side="right"))),
                     len(nonempty))
            docs = nonempty[d0:d1]
            lo, hi = offsets[docs[0]], offsets[docs[-1] + 1]
            block = np.multiply.outer(a, x[lo:hi])
            mins = np.minimum.reduceat(block, offsets[docs] - lo, axis=1)
            sig[docs] = (mins >> M64(32)).astype(np.uint32).T
            d0 = d1
        return sig


def _concat(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All lowercased texts as one uint8 array, each followed by a newline (a separator that
    is never a word byte); and the start offset of each text (plus the end)."""
    encoded = [t.lower().encode("utf-8", errors="replace") for t in texts]
    lens = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
    starts = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lens, out=starts[1:])
    data = np.frombuffer(b"\n".join(encoded) + b"\n", dtype=np.uint8) if texts else np.zeros(0, np.uint8)
    return data, starts


GOLDEN = M64(0x9E3779B97F4A7C15)
LONG_WORD = 64  # longer words are hashed one by one (xxh3); shorter ones 8 bytes at a time


def word_hashes(data: np.ndarray, ws: np.ndarray, we: np.ndarray) -> np.ndarray:
    """64-bit hash of every word ``data[ws[i]:we[i]]``, from 8-byte loads (no per-byte pass).

    An unaligned uint64 view of the bytes reads the 8 bytes at any offset; shifting left by
    the bytes past the word's end keeps exactly the word's bytes. Words up to 8 bytes take
    one load, up to 64 bytes one load per 8 bytes (vectorized over the words that long).
    """
    buf = np.zeros(len(data) + 8, dtype=np.uint8)
    buf[:len(data)] = data
    loads = np.ndarray(shape=(len(data) + 1,), dtype="<u8", buffer=buf, strides=(1,))
    length = (we - ws).astype(np.uint64)

    def chunk(pos: np.ndarray, left: np.ndarray) -> np.ndarray:
        return loads[pos] << ((M64(8) - np.minimum(left, M64(8))) * M64(8))

    h = mix64(chunk(ws, length) ^ (length * GOLDEN))
    idx, j = np.flatnonzero(length > 8), 1
    while len(idx) and j * 8 < LONG_WORD:
        h[idx] = mix64(h[idx] ^ chunk(ws[idx] + 8 * j, length[idx] - M64(8 * j)))
        j += 1
        idx = idx[length[idx] > M64(8 * j)]
    if len(idx):
        long = [xxhash.xxh3_64_intdigest(data[s:e].tobytes()) for s, e in zip(ws[idx].tolist(), we[idx].tolist())]
        h[idx] = mix64(np.array(long, dtype=np.uint64) ^ GOLDEN)
    return h


def per_doc_unique(h: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct top-32-bit values of each document's hashes (one sort for the batch)."""
    ndocs = len(offsets) - 1
    doc = np.repeat(np.arange(ndocs, dtype=np.uint64), np.diff(offsets))
    key = np.sort((doc << M64(32)) | (h >> M64(32)))
    if len(key):  # np.unique would hash then sort again: a sort and a mask are enough
        key = key[np.concatenate(([True], key[1:] != key[:-1]))]
    sets = (key & M64(0xFFFFFFFF)).astype(np.uint32)
    return sets, np.searchsorted(key >> M64(32), np.arange(ndocs + 1, dtype=np.uint64), side="left")


def _powers(n: int, base: np.uint64 = PRIME) -> np.ndarray:
    """base**k mod 2**64 for k < n (wrapping uint64), without a long sequential cumprod."""
    lo = np.full(1024, base, dtype=np.uint64)
    lo[0] = 1
    np.cumprod(lo, out=lo)
    hi = np.full(-(-max(n, 1) // 1024), int(lo[-1]) * int(base) % 2**64, dtype=np.uint64)
    hi[0] = 1
    np.cumprod(hi, out=hi)
    return np.multiply.outer(hi, lo).ravel()[:n]


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: one hash per band of r signature rows."""
    rng = np.random.default_rng(SEED + 2)
    w = rng.integers(1, 2**63, size=rows, dtype=np.uint64) * M64(2) + M64(1)
    keys = np.empty((len(sig), bands), dtype=np.uint64)
    for band in range(bands):
        part = sig[:, band * rows:(band + 1) * rows].astype(np.uint64)
        keys[:, band] = mix64((part * w[None, :]).sum(axis=1, dtype=np.uint64) + M64(band))
    return keys


MAX_ALL_PAIRS = 32  # larger buckets are paired as a chain plus a star, not all pairs


def candidate_pairs(keys: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(m, 2) int64 pairs (i < j) of documents sharing at least one band, deduplicated, sorted.

    A bucket of up to MAX_ALL_PAIRS documents gives all its pairs; a larger one (boilerplate
    copied thousands of times) gives consecutive pairs and pairs with its first member, which
    keeps the candidate count linear while verified edges still connect the copies. Buckets
    of one size are paired together (one gather per size, no loop over buckets).
    """
    n = len(keys)
    idx = np.arange(n) if valid is None else np.flatnonzero(valid)
    out = []
    for band in range(keys.shape[1]):
        k = keys[idx, band]
        order = np.argsort(k, kind="stable")  # stable: members of a bucket in index order
        ks, ids = k[order], idx[order]
        starts = np.flatnonzero(np.concatenate(([True], ks[1:] != ks[:-1]))) if len(ks) else np.zeros(0, np.int64)
        sizes = np.diff(np.append(starts, len(ks)))
        for size in np.unique(sizes[sizes > 1]).tolist():
            first = starts[sizes == size]
            if size <= MAX_ALL_PAIRS:
                members = ids[first[:, None] + np.arange(size)]
                i, j = np.triu_indices(size, 1)
                out.append(np.stack((members[:, i].ravel(), members[:, j].ravel()), axis=1))
                continue
            for s in first.tolist():
                members = ids[s:s + size]
                out.append(np.stack((members[:-1], members[1:]), axis=1))
                out.append(np.stack((np.full(size - 2, members[0]), members[2:]), axis=1))
    if not out:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(out).astype(np.int64)
    codes = np.unique(pairs[:, 0] * max(n, 1) + pairs[:, 1])
    return np.stack((codes // max(n, 1), codes % max(n, 1)), axis=1)


def sorted_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two sorted arrays of distinct values (``per_doc_unique`` output)."""
    if len(a) > len(b):
        a, b = b, a
    if not len(a):
        return 1.0 if not len(b) else 0.0
    pos = np.searchsorted(b, a)
    pos[pos == len(b)] = 0
    inter = int(np.count_nonzero(b[pos] == a))
    return inter / (len(a) + len(b) - inter)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two shingle-hash arrays (as sets)."""
    a, b = np.unique(a), np.unique(b)
    if not len(a) and not len(b):
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


class UnionFind:
    """Clusters over document indices; the root is always the smallest index (the survivor)."""

    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while (p := self.parent.get(root, root)) != root:
            root = p
        while (p := self.parent.get(x, x)) != root:  # path compression
            self.parent[x] = root
            x = p
        return root

    def union(self, a: int, b: int) -> None:
        self.parent.setdefault(a, a)
        self.parent.setdefault(b, b)
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo

    def roots(self) -> dict[int, int]:
        """Every index seen, mapped to its cluster's smallest index."""
        return {x: self.find(x) for x in list(self.parent)}
