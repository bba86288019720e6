"""The curate stage: read → heuristic filters → exact dedup → domain retrieval → Parquet.

Every step is a generator over records with one contract: a ``decide(doc)`` answers
``None`` (keep) or a reason (drop). Each step counts docs and bytes in, kept and dropped
per reason, so the manifest can assert ``in == kept + sum(dropped)``. The domain step drops
nothing: documents it does not retrieve stay as ``general`` (the replay pool).

Example (CPU, seconds)::

    from hone.corpus import curate
    manifest = curate(recipe.curate, [Path("runs/demo/pool/pool.jsonl")], Path("runs/demo"))
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from hone.corpus import filters
from hone.corpus.dedup import ExactDedup
from hone.corpus.read import Quarantine, StepStats, read_jsonl
from hone.corpus.retrieve import retrieve
from hone.corpus.write import write_corpus
from hone.errors import HoneError
from hone.recipe import CurateConfig, DomainConfig
from hone.rundir import clear_done, is_done, mark_done, read_json, write_json, write_jsonl

STEPS = ("read", "filter", "dedup", "domain")
REPLAY = "general"  # domain of every kept document the retrieval did not pick
Progress = Callable[[str, int, "int | None"], None]  # (step, docs done, total or None)
Decide = Callable[[dict], "str | tuple[str, dict] | None"]


def run_step(docs: Iterable[dict], decide: Decide, stats: StepStats, dropped: list[dict] | None) -> Iterator[dict]:
    """Yield the documents ``decide`` keeps; count (and optionally keep for audit) the rest."""
    for doc in docs:
        nbytes = len(doc["text"].encode("utf-8"))
        verdict = decide(doc)
        if verdict is None:
            stats.keep(nbytes)
            yield doc
            continue
        reason, detail = verdict if isinstance(verdict, tuple) else (verdict, {})
        stats.drop(reason, nbytes)
        if dropped is not None:
            dropped.append({"id": doc["id"], "source": doc["source"], "reason": reason, **detail,
                            "text": doc["text"], "meta": doc["meta"]})


def _ticks(docs: Iterable[dict], step: str, progress: Progress | None, every: int = 1000) -> Iterator[dict]:
    n = 0
    for n, doc in enumerate(docs, start=1):
        if progress is not None and n % every == 0:
            progress(step, n, None)
        yield doc
    if progress is not None:
        progress(step, n, n)


def assign_domain(docs: list[dict], cfg: DomainConfig, stats: StepStats) -> dict:
    """Set ``domain`` and ``domain_score`` on every doc; return the query for the manifest."""
    result = retrieve([d["text"] for d in docs], cfg)
    for doc, score, picked in zip(docs, result.scores, result.selected):
        doc["domain"] = cfg.name if picked else REPLAY
        doc["domain_score"] = float(score)
        stats.keep(len(doc["text"].encode("utf-8")))
    return {"seed_terms": result.query, "expansion_terms": result.expansion}


def retrieval_quality(docs: list[dict], name: str) -> dict | None:
    """Precision / recall / F1 of the domain against hidden ``meta.label`` (None if unlabelled).

    Only this report reads the labels; no selection step does.
    """
    labelled = [d for d in docs if isinstance(d["meta"].get("label"), str)]
    if not labelled:
        return None
    tp = sum(d["domain"] == name and d["meta"]["label"] == name for d in labelled)
    picked = sum(d["domain"] == name for d in labelled)
    truth = sum(d["meta"]["label"] == name for d in labelled)
    p = tp / picked if picked else 0.0
    r = tp / truth if truth else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f1, "labelled_docs": len(labelled),
            "label_positives": truth, "retrieved": picked, "true_positives": tp}


def input_key(cfg: CurateConfig, inputs: list[Path], text_field: str) -> str:
    """Hash of the config and the inputs' paths, sizes and mtimes: the rerun-skip key."""
    files = []
    for p in inputs:
        if not p.exists():
            raise HoneError(f"{p}: input file not found")
        st = p.stat()
        files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps([cfg.model_dump(mode="json"), files, text_field], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _finished(corpus_dir: Path, key: str) -> dict | None:
    marker = Path(str(corpus_dir) + ".done")
    if not is_done(corpus_dir) or not (corpus_dir / "manifest.json").exists():
        return None
    if read_json(marker).get("key") != key:
        return None
    return read_json(corpus_dir / "manifest.json")


def curate(cfg: CurateConfig, inputs: list[Path], out_dir: Path, text_field: str = "text",
           progress: Progress | None = None) -> dict:
    """Curate ``inputs`` (JSON lines) into ``out_dir/corpus``; return the manifest.

    A rerun with the same config and unchanged inputs returns the stored manifest at once.
    """
    inputs, corpus_dir = [Path(p) for p in inputs], Path(out_dir) / "corpus"
    if cfg.domain.name == REPLAY:
        raise HoneError(f"curate.domain.name: '{REPLAY}' is reserved for the replay pool; pick another name")
    key = input_key(cfg, inputs, text_field)
    if (manifest := _finished(corpus_dir, key)) is not None:
        return manifest
    clear_done(corpus_dir)
    t0 = time.perf_counter()
    stats = {step: StepStats() for step in STEPS}
    dropped: dict[str, list[dict]] = {"filter": [], "dedup": []}
    quarantine = Quarantine(corpus_dir / "quarantine" / "quarantine.jsonl")
    docs = _ticks(read_jsonl(inputs, text_field, quarantine, stats["read"]), "read", progress)
    docs = run_step(docs, lambda d: filters.check(d["text"], cfg.filters), stats["filter"], dropped["filter"])
    docs = list(run_step(docs, ExactDedup(by_text=cfg.exact_dedup), stats["dedup"], dropped["dedup"]))
    query = assign_domain(docs, cfg.domain, stats["domain"])
    if progress is not None:
        progress("domain", len(docs), len(docs))
    shards = write_corpus(docs, corpus_dir)
    quarantine.close()
    _write_dropped(corpus_dir / "dropped", dropped if cfg.write_dropped else {})
    manifest = _manifest(cfg, inputs, stats, docs, query, shards, quarantine, time.perf_counter() - t0)
    write_json(corpus_dir / "manifest.json", manifest)
    mark_done(corpus_dir, {"key": key})
    return manifest


def _write_dropped(dropped_dir: Path, dropped: dict[str, list[dict]]) -> None:
    for old in dropped_dir.glob("*.jsonl") if dropped_dir.is_dir() else []:
        old.unlink()  # an audit file from an earlier run would describe other inputs
    for step, rows in dropped.items():
        write_jsonl(dropped_dir / f"{step}.jsonl", rows)


def _manifest(cfg: CurateConfig, inputs: list[Path], stats: dict[str, StepStats], docs: list[dict],
              query: dict, shards: list[Path], quarantine: Quarantine, seconds: float) -> dict:
    domains = {cfg.domain.name: 0, REPLAY: 0}
    for d in docs:
        domains[d["domain"]] += 1
    return {
        "inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in inputs],
        # read counts raw line bytes; later steps count the UTF-8 bytes of the text.
        "steps": {step: s.as_dict() for step, s in stats.items()},
        "domains": domains,
        "retrieval": retrieval_quality(docs, cfg.domain.name),
        "query": query,
        "quarantined": dict(quarantine.counts),
        "shards": [p.name for p in shards],
        "config": cfg.model_dump(mode="json"),
        "seconds": round(seconds, 3),
    }
