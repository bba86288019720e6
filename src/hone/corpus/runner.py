"""The one keep/drop loop and the one step manifest of every curation step.

A step decides per document: ``None`` keeps it, a reason string (or ``(reason, detail)``)
drops it. ``keep_or_drop`` applies the verdicts, counts docs and bytes per reason in a
``StepStats`` and optionally collects the dropped documents for the audit file;
``step_manifest`` writes the manifest every step directory holds, with
``totals`` asserting ``docs_in == kept + dropped + quarantined``.

    kept = list(run_decide(docs, decide, stats, dropped))
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from hone.corpus.read import Quarantine, StepStats, expand_inputs, read_shard
from hone.corpus.write import ShardWriter
from hone.rundir import atomic_path, ensure_dir, is_done, mark_done, read_json, write_json


def dropped_record(doc: dict, reason: str, detail: dict) -> dict:
    """What the audit file keeps of a dropped document."""
    rec = {"id": doc["id"]}
    for key in ("source", "src_file", "src_row"):
        if key in doc:
            rec[key] = doc[key]
    return {**rec, "reason": reason, **detail, "text": doc["text"], "meta": doc.get("meta", {})}


def _apply(doc: dict, verdict, stats: StepStats, dropped: list[dict] | None, record=dropped_record) -> bool:
    nbytes = len(doc["text"].encode("utf-8"))
    if verdict is None:
        stats.keep(nbytes)
        return True
    reason, detail = verdict if isinstance(verdict, tuple) else (verdict, {})
    stats.drop(reason, nbytes)
    if dropped is not None:
        dropped.append(record(doc, reason, detail))
    return False


def keep_or_drop(docs: Iterable[dict], verdicts: Iterable, stats: StepStats,
                 dropped: list[dict] | None = None, record=dropped_record) -> Iterator[dict]:
    """Yield the documents whose verdict (one per document, in order) is None; count (and
    optionally keep for audit, as ``record(doc, reason, detail)``) the rest."""
    for doc, verdict in zip(docs, verdicts):
        if _apply(doc, verdict, stats, dropped, record):
            yield doc


def run_decide(docs: Iterable[dict], decide, stats: StepStats, dropped: list[dict] | None = None) -> Iterator[dict]:
    """``keep_or_drop`` with a per-document ``decide``, streaming: each document is decided
    when it is reached, so stateful deciders (exact dedup) see them in order."""
    for doc in docs:
        if _apply(doc, decide(doc), stats, dropped):
            yield doc


def merged(results: list[dict], key: str) -> StepStats:
    """One step's counts over its shard tasks' results (each holds ``key``: a StepStats dict)."""
    stats = StepStats()
    for res in results:
        stats.merge(res[key])
    return stats


def totals(read: dict, steps: dict[str, dict]) -> dict:
    """Docs in (every input line / row / file), kept, dropped by the steps, quarantined."""
    quarantined = sum(d["docs"] for d in read.get("quarantined", {}).values())
    dropped = sum(d["docs"] for s in steps.values() for d in s["dropped"].values())
    dropped += sum(d["docs"] for d in read["dropped"].values())
    last = list(steps.values())[-1] if steps else read
    return {"docs_in": read["docs_in"], "kept": last["docs_out"], "dropped": dropped, "quarantined": quarantined,
            "bytes_in": read["bytes_in"], "bytes_out": last["bytes_out"]}


def step_manifest(command: str, shards: list, read: StepStats, step: StepStats, config: dict, parts: list[str],
                  t0: float, after_config: dict | None = None, **extra) -> dict:
    """The manifest of one step's output directory (the same keys for every step), with a
    step's own keys (``extra``: before ``shards``; ``after_config``: before ``seconds``)."""
    steps = {"read": read.as_dict(), command: step.as_dict()}
    return {"command": command, "inputs": list(dict.fromkeys(str(s.path) for s in shards)), "steps": steps,
            "totals": totals(steps["read"], {command: steps[command]}),
            "quarantined": {r: d["docs"] for r, d in steps["read"].get("quarantined", {}).items()},
            **extra, "shards": parts, "config": config, **(after_config or {}),
            "seconds": round(time.perf_counter() - t0, 3)}


# --- the output directory of a step: shards, work files, manifest --------------------------

WORK = ".work"  # per-shard intermediate files and markers; kept so a restart can skip work


def run_key(shards: list, config: dict) -> str:
    """Hash of the config and every input shard's path, size and mtime."""
    files = []
    for sh in shards:
        try:
            st = sh.path.stat()
            files.append([str(sh.path.resolve()), sh.kind, st.st_size, st.st_mtime_ns, sh.start, sh.end])
        except OSError as e:  # a broken link, a vanished file: the reader quarantines it
            files.append([str(sh.path.absolute()), sh.kind, type(e).__name__])
    blob = json.dumps([config, files], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare_output(out_dir: Path, key: str) -> tuple[Path, dict | None]:
    """(work dir, the stored manifest if this exact run already finished).

    Work from a run with another key (other inputs or config) is discarded; work from an
    interrupted run with the same key is kept, so its finished shards are skipped.
    """

    out_dir, work = Path(out_dir), Path(out_dir) / WORK
    ensure_dir(out_dir)
    key_file = work / "key.json"
    stored = read_json(key_file).get("key") if key_file.exists() else None
    if stored == key and is_done(out_dir / "manifest.json") and (out_dir / "manifest.json").exists():
        return work, read_json(out_dir / "manifest.json")
    if stored != key:
        shutil.rmtree(work, ignore_errors=True)
        write_json(key_file, {"key": key})
    for tmp in out_dir.glob(".part-*.tmp"):  # a shard being written when the run was killed
        tmp.unlink(missing_ok=True)
    Path(str(out_dir / "manifest.json") + ".done").unlink(missing_ok=True)
    return work, None


def finish_output(out_dir: Path, manifest: dict, parts: list[Path], quarantine_files: list[Path],
                  dropped_files: list[Path] | None = None) -> dict:
    """Gather per-shard audit files, remove stale shards, write manifest.json and its marker."""

    out_dir = Path(out_dir)
    for name, files in (("quarantine/quarantine.jsonl", quarantine_files),
                        ("dropped/dropped.jsonl", dropped_files or [])):
        target = out_dir / name
        present = [f for f in files if f.exists() and f.stat().st_size]
        if not present:
            target.unlink(missing_ok=True)
            continue
        with atomic_path(target) as tmp, open(tmp, "wb") as out:
            for f in present:
                out.write(f.read_bytes())
    for stale in set(out_dir.glob("part-*.parquet")) - set(parts):
        stale.unlink()
    t = manifest["totals"]
    assert t["docs_in"] == t["kept"] + t["dropped"] + t["quarantined"], json.dumps(t)
    write_json(out_dir / "manifest.json", manifest)
    mark_done(out_dir / "manifest.json", {})
    return manifest


def summary_line(name: str, manifest: dict, out_dir: Path) -> str:
    t = manifest["totals"]
    reasons = {}
    for s in manifest["steps"].values():
        for r, d in {**s["dropped"], **s.get("quarantined", {})}.items():
            reasons[r] = reasons.get(r, 0) + d["docs"]
    why = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda x: -x[1]))
    return (f"{name}: {t['docs_in']} in, {t['kept']} kept, {t['dropped']} dropped, {t['quarantined']} quarantined"
            f"{' (' + why + ')' if why else ''}; {t['bytes_in'] / 1e6:.1f} MB in, {t['bytes_out'] / 1e6:.1f} MB out; "
            f"{manifest.get('seconds', 0):.1f} s -> {out_dir}")


# --- whole-pool steps (dsir in memory, rate, select) -------------------------------------------------------

Decide = Callable[[list[dict]], "tuple[list[str | None], dict]"]


def whole_pool_step(name: str, inputs: list, out_dir: Path, text_field: str, config: dict, decide: Decide) -> dict:
    """Read all inputs, ``decide`` per document (None keeps; a string is the drop reason),
    write the kept ones (with the columns ``decide`` added) to OUT/part-00000.parquet and
    the manifest. A finished run with the same inputs and config is not run again.

    These steps need pool-wide statistics (p_raw, standardized scores, a global budget):
    they hold the texts of the pool in memory.
    """
    t0, out_dir, shards = time.perf_counter(), Path(out_dir), expand_inputs(inputs)
    config = {"step": name, **config, "text_field": text_field}
    work, done = prepare_output(out_dir, run_key(shards, config))
    if done is not None:
        return done
    work.mkdir(parents=True, exist_ok=True)
    read, step, q = StepStats(), StepStats(), Quarantine(work / "quarantine-00000.jsonl")
    docs = [d for sh in shards for d in read_shard(sh, text_field, q, read)]
    q.close()
    verdicts, info = decide(docs) if docs else ([], {})
    writer = ShardWriter(out_dir / "part-00000.parquet")
    writer.write(list(keep_or_drop(docs, verdicts, step)))
    writer.close()
    manifest = step_manifest(name, shards, read, step, config, ["part-00000.parquet"], t0, **{name: info})
    return finish_output(out_dir, manifest, [out_dir / "part-00000.parquet"], [work / "quarantine-00000.jsonl"])
