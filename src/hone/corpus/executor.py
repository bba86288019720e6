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
from concurrent.futures.process import BrokenProcessPool
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


_TASKS_RUN = 0  # per process: what HONE_CORPUS_FAULT counts


def _run_and_mark(task: Task) -> dict:
    result = task.fn(*task.args)
    _maybe_fault()
    mark_done(task.marker, {"result": result})
    return result


def _maybe_fault() -> None:
    """``HONE_CORPUS_FAULT=kill:tasks=N``: SIGKILL this process when its N-th shard task has
    written its output but not yet its marker, the worst moment for a restart (tests)."""
    global _TASKS_RUN
    _TASKS_RUN += 1
    spec = os.environ.get("HONE_CORPUS_FAULT")
    if spec and spec.startswith("kill:tasks=") and _TASKS_RUN == int(spec.split("=", 1)[1]):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class LocalExecutor:
    """Runs tasks in a pool of worker processes (in this process when one worker suffices).

    The pool is made on the first parallel ``map`` and kept for the next ones (the passes of
    a step, the steps of a build): workers are forked while this process is still small,
    so they do not carry what a later global pass (dedup's clusters) holds in memory."""

    name = "local"

    def __init__(self, workers: int | None = None):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.workers = max(1, workers or cores)
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable[[Any], dict], items: list) -> list[dict]:
        if self.workers == 1 or len(items) <= 1:
            return [fn(item) for item in items]
        if self._pool is None:
            # fork starts workers in milliseconds and shares the parent's imports; elsewhere spawn.
            ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx)
        try:
            return list(self._pool.map(fn, items))
        except BrokenProcessPool:
            self.close()  # a worker died (killed, out of memory): the next map starts a new pool
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __del__(self):
        self.close()


class RayExecutor:
    """Runs tasks as Ray remote functions (``ray.init()`` joins a running cluster or starts a
    local one). Results are identical to the local executor's: the same task functions and
    markers, only the placement differs."""

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise HoneError("the ray executor needs Ray: pip install 'hone[ray]' (or use executor 'local')") from None
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
