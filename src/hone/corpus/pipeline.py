"""The curate stage: read → heuristic filters → exact dedup → domain retrieval → Parquet.

Every step is a generator over records with one contract: a ``decide(doc)`` answers
``None`` (keep) or a reason (drop). Each step counts docs and bytes in, kept and dropped
per reason, so the manifest can assert ``in == kept + sum(dropped)``. The domain step drops
nothing: documents it does not retrieve stay as ``general`` (the replay pool).

Example (CPU, seconds)::

    from hone.corpus.pipeline import curate
    manifest = curate(recipe.curate, [Path("runs/demo/pool/pool.jsonl")], Path("runs/demo"))
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from hone.corpus import filters
from hone.corpus.build_config import check_steps, copy_quarantine, run_steps, steps_manifest
from hone.corpus.dedup import ExactDedup
from hone.corpus.executor import get_executor
from hone.corpus.read import Quarantine, StepStats, read_input_jsonl, read_inputs
from hone.corpus.retrieve import retrieve
from hone.corpus.runner import run_decide
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
    return run_decide(docs, decide, stats, dropped)


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


def config_json(cfg: CurateConfig) -> dict:
    """The config as the manifest records it (no ``steps`` key when the default steps ran)."""
    return cfg.model_dump(mode="json", exclude=None if cfg.steps else {"steps"})


def input_key(cfg: CurateConfig, inputs: list[Path], text_field: str) -> str:
    """Hash of the config and the inputs' paths, sizes and mtimes: the rerun-skip key."""
    files = []
    for p in inputs:
        if not p.exists():
            raise HoneError(f"{p}: input file not found")
        st = p.stat()
        files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps([config_json(cfg), files, text_field], sort_keys=True)
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
    if cfg.steps:
        manifest = curate_steps(cfg, inputs, corpus_dir, text_field, progress)
        mark_done(corpus_dir, {"key": key})
        return manifest
    t0 = time.perf_counter()
    stats = {step: StepStats() for step in STEPS}
    dropped: dict[str, list[dict]] = {"filter": [], "dedup": []}
    quarantine = Quarantine(corpus_dir / "quarantine" / "quarantine.jsonl")
    docs = _ticks(read_input_jsonl(inputs, text_field, quarantine, stats["read"]), "read", progress)
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


def curate_steps(cfg: CurateConfig, inputs: list[Path], corpus_dir: Path, text_field: str = "text",
                 progress: Progress | None = None) -> dict:
    """``curate.steps`` through the runner of ``hone data build`` (OUT/corpus/steps/NN-type),
    then the last step's documents as the corpus (``write_corpus``, which the tokenizer reads).
    A document no step gave a domain is ``general``."""
    t0 = time.perf_counter()
    check_steps(cfg.steps, "curate.steps")
    steps = run_steps(cfg.steps, inputs, corpus_dir / "steps", text_field, get_executor("local"),
                      log=(lambda m: progress("steps", 0, None)) if progress else (lambda m: None))
    summary = steps_manifest(steps, cfg.steps)
    docs = list(read_inputs([Path(p) for p in summary["final_shards"]])) if summary["final_shards"] else []
    domains: dict[str, int] = {}
    for d in docs:
        d["domain"] = d.get("domain") or REPLAY
        domains[d["domain"]] = domains.get(d["domain"], 0) + 1
    shards = write_corpus(docs, corpus_dir)
    copy_quarantine(Path(steps[0]["dir"]), corpus_dir)
    dropped_dir = corpus_dir / "dropped"
    _write_dropped(dropped_dir, {})
    for s in steps if cfg.write_dropped else []:
        audit = Path(s["dir"]) / "dropped" / "dropped.jsonl"
        if audit.exists():
            dropped_dir.mkdir(parents=True, exist_ok=True)
            (dropped_dir / f"{s['name']}.jsonl").write_bytes(audit.read_bytes())
    manifest = {"inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in inputs], **summary,
                "domains": domains, "retrieval": retrieval_quality(docs, cfg.domain.name),
                "quarantined": {r: d["docs"] for r, d in summary["steps"][f"{steps[0]['name']}/read"]
                                .get("quarantined", {}).items()},
                "shards": [p.name for p in shards], "config": config_json(cfg),
                "seconds": round(time.perf_counter() - t0, 3)}
    write_json(corpus_dir / "manifest.json", manifest)
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
        "config": config_json(cfg),
        "seconds": round(seconds, 3),
    }
