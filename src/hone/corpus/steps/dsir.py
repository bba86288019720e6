"""DSIR: importance resampling of a pool toward a handful of target examples (Xie et al. 2023).

Features are lowercased word unigrams + bigrams hashed into ``m`` buckets. Two bag-of-ngram
distributions, ``p_target`` (the examples) and ``p_raw`` (the pool), each with a small
pseudo-count, give every document a log importance weight

    log w(x) = sum_j count_j(x) * (log p_target[j] - log p_raw[j])

and ``k`` documents are drawn without replacement by Gumbel top-k on ``log w`` (plain top-k
when ``deterministic``). Documents shorter than ``min_words`` are dropped first: a weight
from three words is noise.

    from hone.corpus.steps.dsir import dsir_scores
    logw = dsir_scores(pool_texts, ["an example of the domain", ...])
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import xxhash

from hone.corpus.executor import Task, get_executor, run_tasks
from hone.corpus.read import Quarantine, StepStats, batched, expand_inputs, load_examples, read_shard
from hone.corpus.runner import finish_output, keep_or_drop, merged, prepare_output, run_key, step_manifest
from hone.corpus.write import ShardWriter
from hone.errors import HoneError
from hone.recipe import DsirSettings, OneLineErrors

_WORD = re.compile(r"\w+")
_BIGRAM_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: bigram (a, b) != (b, a)


class DsirConfig(OneLineErrors, DsirSettings):
    """DSIR settings (:class:`hone.recipe.DsirSettings`, the fields of the ``dsir`` step)."""


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class NgramHasher:
    """Hashes unigrams and bigrams into ``m`` buckets; each distinct word is hashed once."""

    def __init__(self, m: int = 10_000):
        self.m = m
        self._cache: dict[str, int] = {}

    def word_hashes(self, toks: list[str]) -> np.ndarray:
        cache = self._cache
        for w in set(toks).difference(cache):
            cache[w] = xxhash.xxh64_intdigest(w.encode("utf-8"))
        # map + fromiter: the per-token lookups run in C, not in a Python loop body
        return np.fromiter(map(cache.__getitem__, toks), dtype=np.uint64, count=len(toks))

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
    or the examples themselves), writing OUTDIR/part-NNNNN.parquet + .hone/manifest.json.

    Streaming, three passes over the shards on the executor (memory: the bucket counts and
    a few numbers per document, never the texts): (1) per shard, the raw bucket counts and
    each document's n-gram count; (2) log w of every document from p_target / p_raw;
    (3) Gumbel top-k over all log w (in the main process), then each shard writes its kept
    documents. The selection is the one ``dsir_select`` makes on the pool in memory.
    """

    if not target:
        raise HoneError("dsir: give target (a file of example documents: .txt paragraphs, jsonl or parquet)")
    cfg = DsirConfig(**params)
    targets = _load_targets(target, text_field)
    if not targets:
        raise HoneError("dsir: no target examples")
    digest = xxhash.xxh64_hexdigest("\x00".join(targets).encode("utf-8"))  # a changed target file is another run
    t0, out_dir, shards = time.perf_counter(), Path(out_dir), expand_inputs(inputs)
    config = {"step": "dsir", **cfg.model_dump(), "target": target if isinstance(target, str) else "<list>",
              "target_hash": digest, "text_field": text_field}
    work, done = prepare_output(out_dir, run_key(shards, config))
    if done is not None:
        return done
    work.mkdir(parents=True, exist_ok=True)
    ex = executor or get_executor()
    counted = run_tasks(ex, [Task(work / f"counts-{i:05d}", _count_task, (sh, text_field, cfg, work, i))
                             for i, sh in enumerate(shards)])
    counts = sum((np.load(work / f"counts-{i:05d}.npy") for i in range(len(shards))), np.zeros(cfg.buckets))
    ngrams = np.concatenate([np.load(work / f"ngrams-{i:05d}.npy") for i in range(len(shards))] or [np.zeros(0)])
    ok = ngrams >= 0  # -1: too short
    hasher = NgramHasher(cfg.buckets)
    p_raw = (counts + cfg.pseudo_count) / (counts + cfg.pseudo_count).sum()
    log_ratio = np.log(distribution(hasher.features(targets), cfg.pseudo_count)) - np.log(p_raw)
    median = float(np.median(np.maximum(ngrams[ok], 1.0))) if ok.any() else 1.0
    np.save(work / "log_ratio.npy", log_ratio)
    run_tasks(ex, [Task(work / f"logw-{i:05d}", _logw_task, (sh, text_field, cfg, work, i, median))
                   for i, sh in enumerate(shards)])
    logw = np.concatenate([np.load(work / f"logw-{i:05d}.npy") for i in range(len(shards))] or [np.zeros(0)])
    keep = np.zeros(len(logw), dtype=bool)
    keep[gumbel_top_k(logw, cfg.k, cfg.seed, cfg.deterministic)] = True
    np.save(work / "keep.npy", keep)
    offsets = np.concatenate(([0], np.cumsum([r["docs"] for r in counted]))).astype(np.int64)
    written = run_tasks(ex, [Task(work / f"part-{i:05d}", _write_task,
                                  (sh, text_field, cfg, work, out_dir, i, int(offsets[i])))
                             for i, sh in enumerate(shards)])
    read, step = merged(counted, "read"), merged(written, "dsir")
    parts = [f"part-{i:05d}.parquet" for i in range(len(shards))]
    info = {"target_docs": len(targets), "eligible": int(ok.sum()),
            "log_w": _summary(logw[ok]) if ok.any() else {}}
    manifest = step_manifest("dsir", shards, read, step, config, parts, t0, dsir=info)
    return finish_output(out_dir, manifest, [out_dir / p for p in parts],
                         [work / f"quarantine-{i:05d}.jsonl" for i in range(len(shards))])


BATCH = 1024  # documents featurized at once


def _eligible_batches(shard, text_field: str, cfg: DsirConfig, quarantine=None, stats=None):
    """Batches of (docs, n-gram features of the eligible ones, eligible mask)."""
    hasher = NgramHasher(cfg.buckets)
    for batch in batched(read_shard(shard, text_field, quarantine, stats), BATCH):
        ok = np.array([len(words(d["text"])) >= cfg.min_words for d in batch], dtype=bool)
        yield batch, hasher.features([d["text"] for d, o in zip(batch, ok) if o]), ok


def _count_task(shard, text_field: str, cfg: DsirConfig, work: Path, i: int) -> dict:
    """Pass 1, one shard: raw bucket counts (eligible documents) and n-grams per document."""
    stats, q = StepStats(), Quarantine(work / f"quarantine-{i:05d}.jsonl")
    counts, ngrams = np.zeros(cfg.buckets), []
    for batch, x, ok in _eligible_batches(shard, text_field, cfg, q, stats):
        counts += np.asarray(x.sum(axis=0)).ravel()
        n = np.full(len(batch), -1.0)
        n[ok] = np.asarray(x.sum(axis=1)).ravel()
        ngrams.append(n)
    q.close()
    np.save(work / f"counts-{i:05d}.npy", counts)
    n_all = np.concatenate(ngrams) if ngrams else np.zeros(0)
    np.save(work / f"ngrams-{i:05d}.npy", n_all)
    return {"docs": int(len(n_all)), "read": stats.as_dict()}


def _logw_task(shard, text_field: str, cfg: DsirConfig, work: Path, i: int, median: float) -> dict:
    """Pass 2, one shard: log importance weight of every document (-inf: too short)."""
    log_ratio = np.load(work / "log_ratio.npy")
    out = []
    for batch, x, ok in _eligible_batches(shard, text_field, cfg, Quarantine(None)):
        logw = np.full(len(batch), -np.inf)
        if ok.any():
            lw = np.asarray(x @ log_ratio, dtype=np.float64)
            if cfg.length_norm:  # as in dsir_scores
                lw = lw / np.maximum(np.asarray(x.sum(axis=1)).ravel(), 1.0) * median
            logw[ok] = lw
        out.append(logw)
    np.save(work / f"logw-{i:05d}.npy", np.concatenate(out) if out else np.zeros(0))
    return {}


def _write_task(shard, text_field: str, cfg: DsirConfig, work: Path, out: Path, i: int, offset: int) -> dict:
    """Pass 3, one shard: the sampled documents with ``domain_score`` (and ``domain``)."""
    logw, keep = np.load(work / f"logw-{i:05d}.npy"), np.load(work / "keep.npy", mmap_mode="r")
    stats, writer, n = StepStats(), ShardWriter(out / f"part-{i:05d}.parquet"), 0
    for batch in batched(read_shard(shard, text_field, Quarantine(None)), BATCH):
        verdicts = []
        for d in batch:
            if not np.isfinite(logw[n]):
                verdicts.append("too_short")
            elif keep[offset + n]:
                d["domain_score"] = float(logw[n])
                if cfg.name:
                    d["domain"] = cfg.name
                verdicts.append(None)
            else:
                verdicts.append("not_sampled")
            n += 1
        writer.write(list(keep_or_drop(batch, verdicts, stats)))
    writer.close()
    return {"dsir": stats.as_dict()}


def _load_targets(target, text_field: str) -> list[str]:
    if isinstance(target, (list, tuple)):
        return [str(t) for t in target]

    return load_examples(target, text_field)
