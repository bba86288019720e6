"""The ``dedup`` step: MinHash LSH near-deduplication over shards (``hone data dedup``), with
candidates verified on their true shingle Jaccard and one survivor per cluster."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from hone.corpus.executor import Task, get_executor, run_tasks
from hone.corpus.minhash import MinHasher, UnionFind, band_keys, candidate_pairs, lsh_params, sorted_jaccard
from hone.corpus.read import Quarantine, StepStats, batched, expand_inputs, read_shard
from hone.corpus.runner import finish_output, keep_or_drop, merged, prepare_output, run_key, step_manifest
from hone.corpus.write import ShardWriter
from hone.recipe import DedupSettings, OneLineErrors
from hone.rundir import is_done, mark_done, read_json, write_jsonl

BATCH = 1024  # documents hashed at once: memory per worker stays flat with corpus size
VERIFY_CHUNK = 16384  # candidate pairs checked per batch of shingle sets held in memory


class NearDedupConfig(OneLineErrors, DedupSettings):
    """MinHash LSH settings (:class:`hone.recipe.DedupSettings`, the fields of the ``dedup``
    step) and the LSH and hasher they make. ``bands``/``rows`` override the choice from ``threshold``."""

    def lsh(self) -> tuple[int, int]:
        if self.bands and self.rows:  # their product is checked by DedupSettings
            return self.bands, self.rows
        return lsh_params(self.threshold, self.num_perm)

    def hasher(self):
        return MinHasher(num_perm=self.num_perm, ngram=self.ngram, unit=self.unit)


def _shard_docs(shard, text_field: str, quarantine, stats, max_doc_bytes: int):
    return read_shard(shard, text_field, quarantine, stats, max_doc_bytes)


def _silent():
    return Quarantine(None)  # second reads: the first pass already recorded the bad lines


def signature_task(shard, text_field: str, cfg: NearDedupConfig, bands: int, rows: int, work: Path, i: int) -> dict:
    """Pass 1, one shard: band keys of every document, and its distinct shingles (sorted
    uint32, appended to ``sets-i.bin`` batch by batch) for the exact check of candidates."""
    stats, q = StepStats(), Quarantine(work / f"quarantine-{i:05d}.jsonl")
    hasher, keys, sizes = cfg.hasher(), [], []
    with open(work / f"sets-{i:05d}.bin", "wb") as sets_file:
        for batch in batched(_shard_docs(shard, text_field, q, stats, cfg.max_doc_bytes), BATCH):
            sets, offsets = hasher.shingle_sets([d["text"] for d in batch])
            keys.append(band_keys(hasher.signatures_of(sets, offsets), bands, rows))
            sizes.append(np.diff(offsets))
            sets_file.write(sets.tobytes())
    q.close()
    keys_arr = np.concatenate(keys) if keys else np.zeros((0, bands), np.uint64)
    sizes_arr = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    np.save(work / f"keys-{i:05d}.npy", keys_arr)
    np.save(work / f"setoffs-{i:05d}.npy", np.concatenate(([0], np.cumsum(sizes_arr))).astype(np.int64))
    return {"docs": int(len(keys_arr)), "read": stats.as_dict()}


class _ShingleSets:
    """Every document's distinct shingles, read from the pass-1 files through memory maps."""

    def __init__(self, work: Path, nshards: int, doc_offsets: np.ndarray):
        self.doc_offsets = doc_offsets
        self.offs = [np.load(work / f"setoffs-{i:05d}.npy") for i in range(nshards)]
        self.maps = [np.memmap(work / f"sets-{i:05d}.bin", dtype=np.uint32, mode="r") if self.offs[i][-1] else
                     np.zeros(0, np.uint32) for i in range(nshards)]

    def __getitem__(self, doc: int) -> np.ndarray:
        i = int(np.searchsorted(self.doc_offsets, doc, side="right")) - 1
        k = doc - int(self.doc_offsets[i])
        return self.maps[i][self.offs[i][k]:self.offs[i][k + 1]]

    def empty(self) -> np.ndarray:
        return np.concatenate([np.diff(o) == 0 for o in self.offs]) if self.offs else np.zeros(0, bool)


def write_task(shard, text_field: str, cfg: NearDedupConfig, offset: int, work: Path, out: Path, i: int) -> dict:
    """Pass 3, one shard: write the survivors (all docs with ``mark_only``), count the rest."""
    clusters = np.load(work / "clusters.npz")
    # Sentinel past every index: lookups need no special case for an empty cluster list.
    members = np.append(clusters["members"], np.iinfo(np.int64).max)
    roots = np.append(clusters["roots"], -1)
    stats, writer = StepStats(), ShardWriter(out / f"part-{i:05d}.parquet")
    dropped = [] if cfg.write_dropped else None
    n = offset
    for batch in batched(_shard_docs(shard, text_field, _silent(), None, cfg.max_doc_bytes), BATCH):
        g = np.arange(n, n + len(batch))
        where = np.searchsorted(members, g)
        root = np.where(members[where] == g, roots[where], -1)
        verdicts = []
        for doc, gi, r in zip(batch, g, root):
            if cfg.cluster_column or cfg.mark_only:
                doc["dup_cluster"] = int(r)
            dup = r >= 0 and r != gi and not cfg.mark_only
            verdicts.append(("near_duplicate", {"dup_cluster": int(r)}) if dup else None)
        writer.write(list(keep_or_drop(batch, verdicts, stats, dropped, _dropped_record)))
        n += len(batch)
    writer.close()
    write_jsonl(work / f"dropped-{i:05d}.jsonl", dropped or [])
    return {"dedup": stats.as_dict()}


def _dropped_record(doc: dict, reason: str, detail: dict) -> dict:
    """The audit record of a near duplicate (no meta: the survivor's cluster says why)."""
    return {"id": doc["id"], "src_file": doc["src_file"], "src_row": doc["src_row"],
            "reason": reason, **detail, "text": doc["text"]}


def _verify(pairs: np.ndarray, sets: _ShingleSets, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    sims = np.empty(len(pairs), dtype=np.float64)
    for lo in range(0, len(pairs), VERIFY_CHUNK):  # pairs come sorted: a chunk touches few docs
        chunk = pairs[lo:lo + VERIFY_CHUNK]
        cache = {int(d): np.asarray(sets[int(d)]) for d in np.unique(chunk)}  # one memmap slice per doc
        sims[lo:lo + len(chunk)] = [sorted_jaccard(cache[a], cache[b]) for a, b in chunk.tolist()]
    return pairs[sims >= threshold] if len(pairs) else pairs, sims


def cluster_pass(shards, work: Path, cfg: NearDedupConfig, offsets: np.ndarray) -> dict:
    """Pass 2 (global): candidates from shared bands → exact Jaccard → union-find clusters."""
    marker = work / "clusters"
    if is_done(marker):
        return read_json(Path(str(marker) + ".done"))
    sets = _ShingleSets(work, len(shards), offsets)
    keys = np.concatenate([np.load(work / f"keys-{i:05d}.npy") for i in range(len(shards))])
    pairs = candidate_pairs(keys, ~sets.empty())
    del keys
    edges, _ = _verify(pairs, sets, cfg.threshold)
    uf = UnionFind()
    for a, b in edges.tolist():
        uf.union(a, b)
    roots = uf.roots()
    members = np.array(sorted(roots), dtype=np.int64)
    np.savez(work / "clusters.npz", members=members, roots=np.array([roots[m] for m in members], dtype=np.int64))
    info = {"candidate_pairs": int(len(pairs)), "verified_pairs": int(len(edges)),
            "clusters": len(set(roots.values())), "docs_in_clusters": int(len(members)),
            "rejected_candidates": int(len(pairs) - len(edges))}
    mark_done(marker, info)
    del sets
    for i in range(len(shards)):  # the largest work files: not needed once clusters are known
        (work / f"sets-{i:05d}.bin").unlink(missing_ok=True)
    return info


def near_dedup(inputs: list, out_dir: Path, cfg: NearDedupConfig = NearDedupConfig(), text_field: str = "text",
               executor=None) -> dict:
    """MinHash LSH near-dedup of ``inputs`` into ``out_dir`` (Parquet shards + .hone/manifest.json).

    Three passes, the per-shard ones on the executor, each shard task with its completion
    marker: (1) band keys and distinct shingles per shard; (2) candidate pairs, exact
    shingle Jaccard, union-find (one survivor per cluster: its first document in input
    order); (3) write the survivors. Inputs are read twice (passes 1 and 3), never held.
    """
    t0 = time.perf_counter()
    executor = executor or get_executor()
    out_dir, shards = Path(out_dir), expand_inputs(inputs)
    bands, rows = cfg.lsh()
    config = {"step": "dedup", **cfg.model_dump(), "text_field": text_field}
    work, done = prepare_output(out_dir, run_key(shards, config))
    if done is not None:
        return done
    work.mkdir(parents=True, exist_ok=True)
    sig = run_tasks(executor, [Task(work / f"keys-{i:05d}", signature_task, (sh, text_field, cfg, bands, rows, work, i))
                               for i, sh in enumerate(shards)])
    offsets = np.concatenate(([0], np.cumsum([r["docs"] for r in sig]))).astype(np.int64)
    lsh = cluster_pass(shards, work, cfg, offsets)
    out = run_tasks(executor, [Task(work / f"part-{i:05d}", write_task,
                                    (sh, text_field, cfg, int(offsets[i]), work, out_dir, i))
                               for i, sh in enumerate(shards)])
    read, dedup = merged(sig, "read"), merged(out, "dedup")
    manifest = step_manifest("dedup", shards, read, dedup, {**cfg.model_dump(), "text_field": text_field},
                             [f"part-{i:05d}.parquet" for i in range(len(shards))], t0,
                             after_config={"executor": executor.name}, lsh={"bands": bands, "rows": rows, **lsh})
    parts = [out_dir / p for p in manifest["shards"]]
    return finish_output(out_dir, manifest, parts, [work / f"quarantine-{i:05d}.jsonl" for i in range(len(shards))],
                         [work / f"dropped-{i:05d}.jsonl" for i in range(len(shards))])


def dedup_step(inputs: list, out_dir: Path, *, text_field: str = "text", executor=None, **params) -> dict:
    """The ``dedup`` step of ``hone data build``: ``NearDedupConfig`` fields as keywords."""
    return near_dedup(inputs, out_dir, NearDedupConfig(**params), text_field, executor)


