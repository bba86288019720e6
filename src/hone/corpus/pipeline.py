"""The curate stage: the recipe's ``[curate]`` steps through the step runner, then the corpus.

``curate.steps`` lists any steps (as a ``hone data build`` file's ``[[steps]]``); without
them, ``[curate]``'s own fields are the default list: ``filter`` (the heuristic filters),
``dedup`` (exact dedup) and ``domain`` (BM25 retrieval that labels the documents it finds
with the domain's name and keeps the rest as ``general``, the replay pool). Each step writes
``corpus/.hone/steps/NAME/``; the last one's documents become ``corpus/part-*.parquet`` (what
the tokenizer reads, and all that pandas / pyarrow / datasets see in ``corpus/``), and
``corpus/.hone/manifest.json`` counts every step, so that ``in == kept + dropped`` holds per step.

Example (CPU, seconds)::

    from hone.corpus.pipeline import curate
    manifest = curate(recipe.curate, [Path("runs/demo/pool/pool.jsonl")], Path("runs/demo"))
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from hone.corpus.executor import get_executor
from hone.corpus.read import read_inputs
from hone.corpus.runner import clear_legacy, dropped_file, manifest_file, meta_dir
from hone.corpus.steps import copy_quarantine, run_steps, steps_manifest
from hone.corpus.write import write_corpus
from hone.errors import HoneError
from hone.recipe import CurateConfig, CurateStep, ExactDedupStep, FilterStep, RetrieveStep
from hone.rundir import atomic_path, clear_done, is_done, mark_done, parts_manifest, read_json, write_json

REPLAY = "general"  # domain of every kept document the retrieval did not pick
DEFAULT_NAMES = ["filter", "dedup", "domain"]  # the step directories (and manifest keys) of the default list
Log = Callable[[str], None]


def default_steps(cfg: CurateConfig) -> list[CurateStep]:
    """``[curate]``'s own fields as steps: filter, exact dedup, domain retrieval keeping the rest."""
    d = cfg.domain
    return [FilterStep(type="filter", write_dropped=cfg.write_dropped, **cfg.filters.model_dump()),
            ExactDedupStep(type="exact_dedup", by_text=cfg.exact_dedup, write_dropped=cfg.write_dropped),
            RetrieveStep(type="retrieve", name=d.name, query=d.keywords, examples=d.examples, top_k=d.top_k,
                         expand="prf" if d.prf_docs else "none", keep_rest=True, prf_docs=d.prf_docs,
                         prf_terms=d.prf_terms)]


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
    if not is_done(corpus_dir) or not parts_manifest(corpus_dir).exists():  # (an older run's too)
        return None
    if read_json(marker).get("key") != key:
        return None
    return read_json(parts_manifest(corpus_dir))


def curate(cfg: CurateConfig, inputs: list[Path], out_dir: Path, text_field: str = "text",
           log: Log = lambda m: None) -> dict:
    """Curate ``inputs`` into ``out_dir/corpus``; return the manifest.

    A rerun with the same config and unchanged inputs returns the stored manifest at once
    (and an interrupted one skips the steps and shards it finished).
    """
    inputs, corpus_dir = [Path(p) for p in inputs], Path(out_dir) / "corpus"
    if cfg.domain is None and not cfg.steps:
        raise HoneError("curate.domain: required without curate.steps (how to find the domain documents)")
    domain_name = cfg.domain.name if cfg.domain is not None else None
    if domain_name == REPLAY:
        raise HoneError(f"curate.domain.name: '{REPLAY}' is reserved for the replay pool; pick another name")
    key = input_key(cfg, inputs, text_field)
    if (manifest := _finished(corpus_dir, key)) is not None:
        return manifest
    clear_done(corpus_dir)
    clear_legacy(corpus_dir)
    t0 = time.perf_counter()
    steps, names = (cfg.steps, None) if cfg.steps else (default_steps(cfg), DEFAULT_NAMES)
    ran = run_steps(steps, inputs, meta_dir(corpus_dir) / "steps", text_field, get_executor("local"), log, names)
    summary = steps_manifest(ran, steps, names)
    docs = list(read_inputs(summary["final_shards"])) if summary["final_shards"] else []
    domains = {domain_name: 0, REPLAY: 0} if domain_name else {}
    for d in docs:
        d["domain"] = d.get("domain") or REPLAY
        domains[d["domain"]] = domains.get(d["domain"], 0) + 1
    shards = write_corpus(docs, corpus_dir)
    copy_quarantine(Path(ran[0]["dir"]), corpus_dir)
    _copy_dropped(ran, meta_dir(corpus_dir) / "dropped")
    query = next((s["manifest"]["query"] for s in reversed(ran) if "query" in s["manifest"]), None)
    read = ran[0]["manifest"]["steps"]["read"]
    manifest = {
        "inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in inputs],
        # Unreadable input lines are the read step's drops (each also in .hone/quarantine/).
        "steps": {"read": {**read, "dropped": {**read["dropped"], **read.get("quarantined", {})}, "quarantined": {}},
                  **{s["name"]: s["manifest"]["steps"][steps[i].type] for i, s in enumerate(ran)}},
        "totals": summary["totals"],
        "domains": domains,
        "retrieval": retrieval_quality(docs, domain_name) if domain_name else None,
        "query": query,
        "quarantined": {r: d["docs"] for r, d in read.get("quarantined", {}).items()},
        "shards": [p.name for p in shards],
        "step_dirs": summary["step_dirs"],
        "skipped_steps": summary["skipped_steps"],
        "config": config_json(cfg),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(manifest_file(corpus_dir), manifest)
    mark_done(corpus_dir, {"key": key})
    return manifest


def _copy_dropped(ran: list[dict], dropped_dir: Path) -> None:
    """Each step's removed documents (when it kept them) as .hone/dropped/NAME.jsonl."""
    for old in dropped_dir.glob("*.jsonl") if dropped_dir.is_dir() else []:
        old.unlink()  # an audit file from an earlier run would describe other inputs
    for s in ran:
        audit = dropped_file(Path(s["dir"]))
        if audit.exists():
            with atomic_path(dropped_dir / f"{s['name']}.jsonl") as tmp:
                tmp.write_bytes(audit.read_bytes())
