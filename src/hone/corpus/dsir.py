"""DSIR: importance resampling of a pool toward a handful of target examples (Xie et al. 2023).

Features are lowercased word unigrams + bigrams hashed into ``m`` buckets. Two bag-of-ngram
distributions, ``p_target`` (the examples) and ``p_raw`` (the pool), each with a small
pseudo-count, give every document a log importance weight

    log w(x) = sum_j count_j(x) * (log p_target[j] - log p_raw[j])

and ``k`` documents are drawn without replacement by Gumbel top-k on ``log w`` (plain top-k
when ``deterministic``). Documents shorter than ``min_words`` are dropped first: a weight
from three words is noise.

    from hone.corpus.dsir import dsir_scores
    logw = dsir_scores(pool_texts, ["an example of the domain", ...])
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import xxhash

from hone.errors import HoneError

_WORD = re.compile(r"\w+")
_BIGRAM_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: bigram (a, b) != (b, a)


@dataclass(frozen=True)
class DsirConfig:
    """DSIR settings (the ``dsir`` step of ``hone data build``; ``hone data dsir`` options)."""

    k: int = 1000  # documents to keep
    buckets: int = 10_000  # hashed n-gram buckets (m)
    pseudo_count: float = 0.1  # added to every bucket's count before normalizing
    min_words: int = 5  # shorter documents are dropped (too_short)
    length_norm: bool = True  # log w per n-gram × median length (False: the paper's plain sum)
    deterministic: bool = False  # plain top-k instead of Gumbel top-k
    seed: int = 0
    name: str | None = None  # domain label written on kept documents (None: leave as is)

    def __post_init__(self) -> None:
        for f, v in (("k", self.k), ("buckets", self.buckets), ("min_words", self.min_words)):
            if v < (0 if f == "min_words" else 1):
                raise HoneError(f"dsir.{f} must be >= {0 if f == 'min_words' else 1} (got {v})")
        if self.pseudo_count <= 0:
            raise HoneError(f"dsir.pseudo_count must be > 0 (got {self.pseudo_count})")


def config_from(cls, params: dict, step: str):
    """A step config from keyword parameters; an unknown one is a one-line error."""
    names = {f.name for f in fields(cls)}
    bad = sorted(set(params) - names)
    if bad:
        raise HoneError(f"{step}: unknown field {bad[0]!r} (known: {', '.join(sorted(names))})")
    return cls(**params)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class NgramHasher:
    """Hashes unigrams and bigrams into ``m`` buckets; each distinct word is hashed once."""

    def __init__(self, m: int = 10_000):
        self.m = m
        self._cache: dict[str, int] = {}

    def word_hashes(self, toks: list[str]) -> np.ndarray:
        cache = self._cache
        out = np.empty(len(toks), dtype=np.uint64)
        for i, w in enumerate(toks):
            h = cache.get(w)
            if h is None:
                h = cache[w] = xxhash.xxh64_intdigest(w.encode("utf-8"))
            out[i] = h
        return out

    def buckets(self, text: str) -> np.ndarray:
        h = self.word_hashes(words(text))
        with np.errstate(over="ignore"):  # wrap-around is the point of the mixing
            bi = h[:-1] * _BIGRAM_MIX + (h[1:] ^ (h[1:] >> np.uint64(29)))
        return (np.concatenate([h, bi]) % np.uint64(self.m)).astype(np.int64)

    def features(self, texts: list[str]) -> sp.csr_matrix:
        """Documents × buckets count matrix (float64, CSR)."""
        rows, cols = [], []
        for i, t in enumerate(texts):
            b = self.buckets(t)
            cols.append(b)
            rows.append(np.full(len(b), i, dtype=np.int64))
        r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        x = sp.csr_matrix((np.ones(len(c)), (r, c)), shape=(len(texts), self.m))
        x.sum_duplicates()
        return x


def distribution(x: sp.csr_matrix, pseudo_count: float) -> np.ndarray:
    """Bucket probabilities from a count matrix, smoothed by ``pseudo_count`` per bucket."""
    counts = np.asarray(x.sum(axis=0)).ravel() + pseudo_count
    return counts / counts.sum()


def dsir_scores(texts: list[str], target_texts: list[str], buckets: int = 10_000, pseudo_count: float = 0.1,
                length_norm: bool = True) -> np.ndarray:
    """log importance weight of every text (p_raw fitted on ``texts`` themselves)."""
    if not target_texts:
        raise HoneError("dsir: no target examples")
    hasher = NgramHasher(buckets)
    x, xt = hasher.features(texts), hasher.features(target_texts)
    log_ratio = np.log(distribution(xt, pseudo_count)) - np.log(distribution(x, pseudo_count))
    logw = x @ log_ratio
    if length_norm:
        # Per n-gram, times the median document length: the weight a typical-length document
        # with this text's n-gram mix would get (the paper's chunks all have one length; ours
        # vary, and the raw sum favours long documents). Same scale as the sum for Gumbel.
        n = np.maximum(np.asarray(x.sum(axis=1)).ravel(), 1.0)
        logw = logw / n * np.median(n)
    return np.asarray(logw, dtype=np.float64)


def gumbel_top_k(logw: np.ndarray, k: int, seed: int = 0, deterministic: bool = False) -> np.ndarray:
    """Indices of ``k`` items drawn without replacement with probability ∝ exp(logw), best first.

    Gumbel top-k: the k largest ``logw + Gumbel noise`` are such a sample; ``-inf`` is never
    drawn. ``deterministic`` takes the k largest ``logw`` (ties: earlier index first).
    """
    keys = np.asarray(logw, dtype=np.float64)
    if not deterministic:
        keys = keys + np.random.default_rng(seed).gumbel(size=len(keys))
    order = np.argsort(-keys, kind="stable")
    order = order[np.isfinite(keys[order])]
    return order[:k]


def dsir_select(docs: list[dict], target_texts: list[str], cfg: DsirConfig = DsirConfig()) -> tuple[list, dict]:
    """Per document ``None`` (kept, ``domain_score`` = log w set on it) or a drop reason."""
    n_words = np.array([len(words(d["text"])) for d in docs], dtype=np.int64)
    ok = n_words >= cfg.min_words
    idx = np.flatnonzero(ok)
    logw = np.full(len(docs), -np.inf)
    if len(idx):
        logw[idx] = dsir_scores([docs[i]["text"] for i in idx], target_texts, cfg.buckets, cfg.pseudo_count,
                                cfg.length_norm)
    chosen = set(gumbel_top_k(logw, cfg.k, cfg.seed, cfg.deterministic).tolist())
    verdicts = []
    for i, d in enumerate(docs):
        if not ok[i]:
            verdicts.append("too_short")
            continue
        d["domain_score"] = float(logw[i])
        if i in chosen:
            if cfg.name:
                d["domain"] = cfg.name
            verdicts.append(None)
        else:
            verdicts.append("not_sampled")
    info = {"target_docs": len(target_texts), "eligible": int(ok.sum()),
            "log_w": _summary(logw[idx]) if len(idx) else {}}
    return verdicts, info


def _summary(x: np.ndarray) -> dict:
    q = np.quantile(x, [0.0, 0.5, 0.9, 1.0])
    return {"min": round(float(q[0]), 3), "median": round(float(q[1]), 3), "p90": round(float(q[2]), 3),
            "max": round(float(q[3]), 3)}


def dsir_step(inputs: list, out_dir: Path, *, text_field: str = "text", executor=None,
              target: str | list[str] | None = None, **params) -> dict:
    """The ``dsir`` step of ``hone data build`` (``target`` = a file of example documents,
    or the examples themselves), writing OUTDIR/part-00000.parquet + manifest.json."""
    from hone.corpus.select import whole_pool_step

    if not target:
        raise HoneError("dsir: give target (a file of example documents: .txt paragraphs, jsonl or parquet)")
    cfg = config_from(DsirConfig, params, "dsir")
    targets = _load_targets(target, text_field)
    digest = xxhash.xxh64_hexdigest("\x00".join(targets).encode("utf-8"))  # a changed target file is another run
    return whole_pool_step("dsir", inputs, out_dir, text_field,
                           {**asdict(cfg), "target": target if isinstance(target, str) else "<list>",
                            "target_hash": digest},
                           lambda docs: dsir_select(docs, targets, cfg))


def _load_targets(target, text_field: str) -> list[str]:
    if isinstance(target, (list, tuple)):
        return [str(t) for t in target]
    from hone.corpus.build_config import load_examples

    return load_examples(target, text_field)
