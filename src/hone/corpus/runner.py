"""The one keep/drop loop and the one step manifest of every curation step.

A step decides per document: ``None`` keeps it, a reason string (or ``(reason, detail)``)
drops it. ``keep_or_drop`` applies the verdicts, counts docs and bytes per reason in a
``StepStats`` and optionally collects the dropped documents for the audit file;
``step_manifest`` makes the manifest every step directory holds (in OUT/.hone/), with
``totals`` asserting ``docs_in == kept + dropped + quarantined``.

    kept = list(run_decide(docs, decide, stats, dropped))
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from hone.corpus.read import Quarantine, StepStats, expand_inputs, read_shard
from hone.corpus.write import ShardWriter
from hone.errors import HoneError
from hone.rundir import (
    MANIFEST_FILE,
    PARTS_META_DIR,
    atomic_path,
    clear_done,
    ensure_dir,
    is_done,
    mark_done,
    read_json,
    write_json,
)


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


# --- the output directory of a step: parts at the top, everything else in .hone/ ----------
#
#   OUT/part-NNNNN.parquet                the kept documents (and nothing else at this level)
#   OUT/.hone/manifest.json (+ .done)     counts, config, shard names; the marker of a finished run
#   OUT/.hone/quarantine/quarantine.jsonl unreadable input lines, with file and line
#   OUT/.hone/dropped/dropped.jsonl       removed documents, when the step keeps them for audit
#   OUT/.hone/work/                       per-shard work files and task markers (a rerun skips done shards)
#   OUT/.hone/steps/NAME/                 (build, curate) each step's own output, in this same layout
#
# Why one hidden .hone/: so that pandas.read_parquet(OUT), pyarrow.dataset.dataset(OUT) and
# datasets.load_dataset("parquet", data_dir=OUT) read exactly the kept documents. pyarrow (and
# pandas, through it) skips names starting with "." or "_" (``ignore_prefixes``); datasets skips
# hidden names and "__" directories but not a single "_", so "_hone/" would be read as Parquet
# there. A subdirectory, unlike a sibling, travels with OUT when it is copied or moved.

META = PARTS_META_DIR
WORK = f"{META}/work"  # relative to OUT


def meta_dir(out_dir: Path) -> Path:
    """OUT/.hone: where a directory of parts keeps everything that is not a part."""
    return Path(out_dir) / META


def manifest_file(out_dir: Path) -> Path:
    """Where a directory of parts Hone writes keeps its manifest (read with rundir.parts_manifest,
    which also finds an older Hone's)."""
    return meta_dir(out_dir) / MANIFEST_FILE


def quarantine_file(out_dir: Path) -> Path:
    return meta_dir(out_dir) / "quarantine" / "quarantine.jsonl"


def dropped_file(out_dir: Path) -> Path:
    return meta_dir(out_dir) / "dropped" / "dropped.jsonl"


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


def clear_legacy(out_dir: Path) -> None:
    """Remove what an older Hone kept beside the parts (manifest.json, its marker, .work/,
    quarantine/, dropped/, steps/, a build's NN-type step directories), so that a directory
    written again reads with pandas / pyarrow / datasets. Only where manifest.json is one of
    Hone's (with ``totals`` and ``steps``): the sign that Hone wrote these files."""
    out_dir = Path(out_dir)
    old = out_dir / MANIFEST_FILE
    try:
        manifest = json.loads(old.read_text(encoding="utf-8")) if old.is_file() else None
    except (ValueError, OSError):
        manifest = None
    if not isinstance(manifest, dict) or not {"totals", "steps"} <= set(manifest):
        return
    step_dirs = [out_dir / Path(str(d)).name for d in manifest.get("step_dirs") or []]
    for d in [out_dir / ".work", out_dir / "quarantine", out_dir / "dropped", out_dir / "steps",
              *(d for d in step_dirs if (d / MANIFEST_FILE).is_file())]:
        if d.is_dir():
            shutil.rmtree(d)
    Path(str(old) + ".done").unlink(missing_ok=True)
    old.unlink()


def prepare_output(out_dir: Path, key: str) -> tuple[Path, dict | None]:
    """(work dir, the stored manifest if this exact run already finished).

    Work from a run with another key (other inputs or config) is discarded; work from an
    interrupted run with the same key is kept, so its finished shards are skipped.
    """

    out_dir, work = Path(out_dir), Path(out_dir) / WORK
    ensure_dir(out_dir)
    clear_legacy(out_dir)
    key_file, manifest = work / "key.json", manifest_file(out_dir)
    stored = read_json(key_file).get("key") if key_file.exists() else None
    if stored == key and is_done(manifest) and manifest.exists():
        return work, read_json(manifest)
    if stored != key:
        shutil.rmtree(work, ignore_errors=True)
        write_json(key_file, {"key": key})
    for tmp in out_dir.glob(".part-*.tmp"):  # a shard being written when the run was killed
        tmp.unlink(missing_ok=True)
    clear_done(manifest)
    return work, None


def finish_output(out_dir: Path, manifest: dict, parts: list[Path], quarantine_files: list[Path],
                  dropped_files: list[Path] | None = None) -> dict:
    """Gather per-shard audit files, remove stale shards, give every part one schema, write
    .hone/manifest.json and its marker."""

    out_dir = Path(out_dir)
    for target, files in ((quarantine_file(out_dir), quarantine_files), (dropped_file(out_dir), dropped_files or [])):
        present = [f for f in files if f.exists() and f.stat().st_size]
        if not present:
            target.unlink(missing_ok=True)
            continue
        with atomic_path(target) as tmp, open(tmp, "wb") as out:
            for f in present:
                out.write(f.read_bytes())
    for stale in set(out_dir.glob("part-*.parquet")) - set(parts):
        stale.unlink()
    unify_parts(parts)
    t = manifest["totals"]
    assert t["docs_in"] == t["kept"] + t["dropped"] + t["quarantined"], json.dumps(t)
    write_json(manifest_file(out_dir), manifest)
    mark_done(manifest_file(out_dir), {})
    return manifest


# --- one schema for every part of a directory -------------------------------------------------
# pyarrow and pandas take a directory's schema from its first file, datasets fails on a file
# with other columns and on a row group of no rows. Each shard task writes its part alone: an
# empty part has only the base columns (in one empty row group), and a score column with no
# value in a shard was typed float64 there.

def _part_schema(path: Path) -> pa.Schema:
    """The part's schema, with a column that holds no value typed null (any type fits it)."""
    pf = pq.ParquetFile(path)
    meta, schema = pf.metadata, pf.schema_arrow
    if len(schema) != meta.num_columns:  # nested columns: no one-to-one statistics; take it as it is
        return schema
    fields, groups = [], [meta.row_group(g) for g in range(meta.num_row_groups)]
    for i, f in enumerate(schema):
        stats = [(rg.column(i).statistics, rg.num_rows) for rg in groups]
        empty = all(s is not None and s.has_null_count and s.null_count == n for s, n in stats)
        fields.append(f.with_type(pa.null()) if empty else f)
    return pa.schema(fields)


def unify_parts(parts: list[Path]) -> None:
    """Rewrite (atomically) the parts whose columns differ from the union of all parts' columns,
    and those with an empty row group (an empty part is left with none)."""
    files = {p: pq.ParquetFile(p) for p in parts}
    schemas = {p: f.schema_arrow for p, f in files.items()}
    empty_groups = {p for p, f in files.items()
                    if any(f.metadata.row_group(g).num_rows == 0 for g in range(f.metadata.num_row_groups))}
    if len({str(s) for s in schemas.values()}) <= 1 and not empty_groups:
        return
    try:
        union = pa.unify_schemas([_part_schema(p) for p in parts], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise HoneError(f"{Path(parts[0]).parent}: the parts' columns do not fit together: {e}") from None
    target = pa.schema([f.with_type(pa.float64()) if pa.types.is_null(f.type) else f for f in union])
    for p, schema in schemas.items():
        if p in empty_groups or not schema.equals(target):
            _rewrite(p, target)


def _rewrite(path: Path, target: pa.Schema) -> None:
    pf = pq.ParquetFile(path)
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, target, compression="zstd") as writer:
            for g in range(pf.metadata.num_row_groups):
                if pf.metadata.row_group(g).num_rows == 0:
                    continue
                table = pf.read_row_group(g)
                cols = [table.column(f.name).cast(f.type) if f.name in table.column_names
                        else pa.nulls(len(table), f.type) for f in target]
                writer.write_table(pa.Table.from_arrays(cols, schema=target))


def publish_parts(parts: list[Path], out_dir: Path) -> list[Path]:
    """The parts (a build's last step's) as OUT/part-*.parquet: hard links where the file system
    allows (no second copy of the corpus), each renamed into place; other parts there go."""
    out_dir, published = Path(out_dir), []
    for src in map(Path, parts):
        target = out_dir / src.name
        with atomic_path(target) as tmp:
            tmp.unlink()
            try:
                os.link(src, tmp)
            except OSError:  # another device, no hard links: copy
                shutil.copyfile(src, tmp)
        published.append(target)
    for stale in set(out_dir.glob("part-*.parquet")) - set(published):
        stale.unlink()
    return published


def summary_line(name: str, manifest: dict, out_dir: Path) -> str:
    t = manifest["totals"]
    reasons = {}
    for s in manifest["steps"].values():
        for r, d in {**s["dropped"], **s.get("quarantined", {})}.items():
            reasons[r] = reasons.get(r, 0) + d["docs"]
    why = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda x: -x[1]))
    return (f"{name}: {t['docs_in']} in, {t['kept']} kept, {t['dropped']} dropped, {t['quarantined']} quarantined"
            f"{' (' + why + ')' if why else ''}; {t['bytes_in'] / 1e6:.1f} MB in, {t['bytes_out'] / 1e6:.1f} MB out; "
            f"{manifest.get('seconds', 0):.1f} s -> {out_dir}"
            + "".join(f"\n{name}: {note}" for note in manifest.get("notes", [])))


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
