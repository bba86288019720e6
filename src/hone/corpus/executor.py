"""Where curation work runs: local processes (default, all cores) or a Ray cluster.

*What* runs is a list of shard tasks, each a picklable top-level function and its
arguments; *where* is an executor. Every task writes its own completion marker
(``hone.rundir.mark_done``) holding its result, so a killed run started again skips the
finished shards and returns the same results an uninterrupted run would.

    ex = get_executor("local", workers=2)
    results = run_tasks(ex, [Task(marker_path, fn, args), ...])
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hone.errors import HoneError
from hone.rundir import is_done, mark_done, read_json


@dataclass(frozen=True)
class Task:
    """One shard of work: ``fn(*args)`` returns a JSON-able result stored in ``marker``."""

    marker: Path
    fn: Callable[..., dict]
    args: tuple = field(default_factory=tuple)


def _run_and_mark(task: Task) -> dict:
    result = task.fn(*task.args)
    mark_done(task.marker, {"result": result})
    return result


class LocalExecutor:
    """Runs tasks in a pool of worker processes (in this process when one worker suffices)."""

    name = "local"

    def __init__(self, workers: int | None = None):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.workers = max(1, workers or cores)

    def map(self, fn: Callable[[Any], dict], items: list) -> list[dict]:
        if self.workers == 1 or len(items) <= 1:
            return [fn(item) for item in items]
        # fork starts workers in milliseconds and shares the parent's imports; elsewhere spawn.
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with ProcessPoolExecutor(min(self.workers, len(items)), mp_context=ctx) as pool:
            return list(pool.map(fn, items))


class RayExecutor:
    """Runs tasks as Ray remote functions (``ray.init()`` joins a running cluster or starts a
    local one). Results are identical to the local executor's: the same task functions and
    markers, only the placement differs."""

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise HoneError("the ray executor needs Ray: pip install 'ray[default]' (or use executor 'local')") from None
        self.ray = ray
        self.workers = workers
        if not ray.is_initialized():
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                     log_to_driver=False, **({"num_cpus": workers} if workers and not address else {}))

    def map(self, fn: Callable[[Any], dict], items: list) -> list[dict]:
        remote = self.ray.remote(fn)
        return self.ray.get([remote.remote(item) for item in items])


def get_executor(name: str = "local", workers: int | None = None) -> LocalExecutor | RayExecutor:
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(workers)
    raise HoneError(f"executor must be 'local' or 'ray' (got {name!r})")


def run_tasks(executor: LocalExecutor | RayExecutor, tasks: list[Task]) -> list[dict]:
    """Results of every task, in task order; tasks whose marker exists are not run again."""
    todo = [t for t in tasks if not is_done(t.marker)]
    if todo:
        executor.map(_run_and_mark, todo)
    return [read_json(Path(str(t.marker) + ".done"))["result"] for t in tasks]


# --- the output directory of a step: shards, work files, manifest --------------------------

WORK = ".work"  # per-shard intermediate files and markers; kept so a restart can skip work


def run_key(shards: list, config: dict) -> str:
    """Hash of the config and every input shard's path, size and mtime."""
    import hashlib
    import json

    files = []
    for sh in shards:
        st = sh.path.stat()
        files.append([str(sh.path.resolve()), sh.kind, st.st_size, st.st_mtime_ns])
    blob = json.dumps([config, files], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare_output(out_dir: Path, key: str) -> tuple[Path, dict | None]:
    """(work dir, the stored manifest if this exact run already finished).

    Work from a run with another key (other inputs or config) is discarded; work from an
    interrupted run with the same key is kept, so its finished shards are skipped.
    """
    import shutil

    from hone.rundir import ensure_dir, write_json

    out_dir, work = Path(out_dir), Path(out_dir) / WORK
    ensure_dir(out_dir)
    key_file = work / "key.json"
    stored = read_json(key_file).get("key") if key_file.exists() else None
    if stored == key and is_done(out_dir / "manifest.json") and (out_dir / "manifest.json").exists():
        return work, read_json(out_dir / "manifest.json")
    if stored != key:
        shutil.rmtree(work, ignore_errors=True)
        write_json(key_file, {"key": key})
    Path(str(out_dir / "manifest.json") + ".done").unlink(missing_ok=True)
    return work, None


def finish_output(out_dir: Path, manifest: dict, parts: list[Path], quarantine_files: list[Path],
                  dropped_files: list[Path] | None = None) -> dict:
    """Gather per-shard audit files, remove stale shards, write manifest.json and its marker."""
    import json

    from hone.rundir import atomic_path, write_json

    out_dir = Path(out_dir)
    for name, files in (("quarantine/quarantine.jsonl", quarantine_files), ("dropped/dropped.jsonl", dropped_files or [])):
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


def totals(read: dict, steps: dict[str, dict]) -> dict:
    """Docs in (every input line / row / file), kept, dropped by the steps, quarantined."""
    quarantined = sum(d["docs"] for d in read.get("quarantined", {}).values())
    dropped = sum(d["docs"] for s in steps.values() for d in s["dropped"].values())
    dropped += sum(d["docs"] for d in read["dropped"].values())
    last = list(steps.values())[-1] if steps else read
    bytes_in = read["bytes_in"]
    return {"docs_in": read["docs_in"], "kept": last["docs_out"], "dropped": dropped, "quarantined": quarantined,
            "bytes_in": bytes_in, "bytes_out": last["bytes_out"]}


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
