"""Where curation work runs: local processes (default, all cores) or a Ray cluster.

*What* runs is a list of shard tasks, each a picklable top-level function and its
arguments; *where* is an executor. Every task writes its own completion marker
(``hone.rundir.mark_done``) holding its result, so a killed run started again skips the
finished shards and returns the same results an uninterrupted run would.

    ex = get_executor("local", workers=2)
    results = run_tasks(ex, [Task(marker_path, fn, args), ...])
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hone.corpus import filters
from hone.corpus.read import Quarantine, StepStats, batched, expand_inputs, read_shard
from hone.corpus.retrieve import retrieve
from hone.corpus.runner import keep_or_drop, run_decide, step_manifest, totals  # noqa: F401
from hone.corpus.write import ShardWriter
from hone.errors import HoneError
from hone.recipe import DomainConfig, FilterConfig
from hone.rundir import atomic_path, ensure_dir, is_done, mark_done, read_json, write_json


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


# --- steps built from the curate stage's pieces (filters, BM25 retrieval) ------------------

def _filter_task(shard, text_field: str, cfg_json: dict, work: Path, out: Path, i: int) -> dict:
    cfg = FilterConfig(**cfg_json)
    read, step, q = StepStats(), StepStats(), Quarantine(work / f"quarantine-{i:05d}.jsonl")
    writer = ShardWriter(out / f"part-{i:05d}.parquet")
    for batch in batched(read_shard(shard, text_field, q, read), 4096):
        writer.write(list(run_decide(batch, lambda d: filters.check(d["text"], cfg), step)))
    writer.close()
    q.close()
    return {"read": read.as_dict(), "filter": step.as_dict()}


def filter_step(inputs: list, out_dir: Path, *, text_field: str = "text", executor=None, **params) -> dict:
    """Gopher / C4 heuristic filters (``hone.recipe.FilterConfig`` fields), shard by shard."""

    t0, out_dir, shards = time.perf_counter(), Path(out_dir), expand_inputs(inputs)
    cfg = FilterConfig(**params).model_dump()
    work, done = prepare_output(out_dir, run_key(shards, {"step": "filter", **cfg, "text_field": text_field}))
    if done is not None:
        return done
    work.mkdir(parents=True, exist_ok=True)
    res = run_tasks(executor or get_executor(), [Task(work / f"part-{i:05d}", _filter_task,
                                                      (sh, text_field, cfg, work, out_dir, i))
                                                 for i, sh in enumerate(shards)])
    read, step = StepStats(), StepStats()
    for r in res:
        read.merge(r["read"])
        step.merge(r["filter"])
    parts = [f"part-{i:05d}.parquet" for i in range(len(shards))]
    manifest = step_manifest("filter", shards, read, step, {**cfg, "text_field": text_field}, parts, t0)
    return finish_output(out_dir, manifest, [out_dir / p for p in parts],
                         [work / f"quarantine-{i:05d}.jsonl" for i in range(len(shards))])


LLM_HELP = "needs an OpenAI-compatible endpoint: set HONE_LLM_URL (and HONE_LLM_KEY or OPENAI_API_KEY, HONE_LLM_MODEL)"


def llm_queries(seeds: list[str], n: int = 10) -> list[str]:
    """Query-of-CC bootstrapping: ask an OpenAI-compatible chat endpoint for more search
    queries about the seeds. The key comes from the environment and is never logged."""
    url = os.environ.get("HONE_LLM_URL")
    if not url:
        raise HoneError(f"--expand llm {LLM_HELP}")
    key = os.environ.get("HONE_LLM_KEY") or os.environ.get("OPENAI_API_KEY") or ""
    prompt = ("Seed topics or questions:\n" + "\n".join(f"- {s[:500]}" for s in seeds) +
              f"\n\nWrite {n} more short search queries (keywords or questions) that would find documents on "
              "the same subject. One per line, no numbering, nothing else.")
    body = json.dumps({"model": os.environ.get("HONE_LLM_MODEL", "gpt-4o-mini"),
                       "messages": [{"role": "user", "content": prompt}], "temperature": 0.7}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            content = json.loads(resp.read())["choices"][0]["message"]["content"]
    except Exception as e:  # network, HTTP status, unexpected JSON: one line, no key in it
        raise HoneError(f"LLM query expansion failed at {url}: {type(e).__name__}: {str(e)[:200]}") from None
    lines = [ln.strip().lstrip("-*0123456789. ").strip() for ln in content.splitlines()]
    return [ln for ln in lines if ln][:n]


def retrieve_step(inputs: list, out_dir: Path, *, text_field: str = "text", executor=None,
                  query: list[str] = (), examples: list[str] = (), top_k: int = 1000, expand: str = "prf",
                  name: str = "domain", keep_rest: bool = False, prf_docs: int = 10, prf_terms: int = 30) -> dict:
    """BM25 retrieval of the ``top_k`` documents closest to the queries / example documents.

    Not retrieved documents are dropped (``not_retrieved``), or with ``keep_rest`` kept with
    domain ``general``. BM25 needs the whole pool's statistics: this step holds the texts.
    """

    if expand not in ("none", "prf", "llm"):
        raise HoneError(f"expand must be none, prf or llm (got {expand!r})")
    t0, out_dir, shards = time.perf_counter(), Path(out_dir), expand_inputs(inputs)
    query, examples = list(query), list(examples)
    if not query and not examples:
        raise HoneError("retrieve needs --query TEXT or --examples FILE")
    config = {"step": "retrieve", "query": query, "examples": examples, "top_k": top_k, "expand": expand,
              "name": name, "keep_rest": keep_rest, "prf_docs": prf_docs, "prf_terms": prf_terms,
              "text_field": text_field}
    work, done = prepare_output(out_dir, run_key(shards, config))
    if done is not None:
        return done
    work.mkdir(parents=True, exist_ok=True)
    extra = llm_queries(query + examples) if expand == "llm" else []
    read, step, q = StepStats(), StepStats(), Quarantine(work / "quarantine-00000.jsonl")
    docs = [d for sh in shards for d in read_shard(sh, text_field, q, read)]
    q.close()
    cfg = DomainConfig(name=name, keywords=query + extra, examples=examples, top_k=top_k,
                       prf_docs=prf_docs if expand != "none" else 0, prf_terms=prf_terms)
    result = retrieve([d["text"] for d in docs], cfg)
    verdicts = []
    for doc, score, picked in zip(docs, result.scores, result.selected):
        if picked or keep_rest:
            doc["domain"], doc["domain_score"] = (name if picked else "general"), float(score)
        verdicts.append(None if picked or keep_rest else "not_retrieved")
    writer = ShardWriter(out_dir / "part-00000.parquet")
    writer.write(list(keep_or_drop(docs, verdicts, step)))
    writer.close()
    manifest = step_manifest("retrieve", shards, read, step, config, ["part-00000.parquet"], t0,
                             query={"seed_terms": result.query, "expansion_terms": result.expansion,
                                    "llm_queries": extra})
    return finish_output(out_dir, manifest, [out_dir / "part-00000.parquet"], [work / "quarantine-00000.jsonl"])
