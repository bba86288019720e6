"""The ``filter`` step: Gopher / C4 heuristic filters (:mod:`hone.corpus.filters`), shard by
shard on the executor, each shard with its completion marker."""

from __future__ import annotations

import time
from pathlib import Path

from hone.corpus import filters
from hone.corpus.executor import Task, get_executor, run_tasks
from hone.corpus.read import Quarantine, StepStats, batched, expand_inputs, read_shard
from hone.corpus.runner import finish_output, merged, prepare_output, run_decide, run_key, step_manifest
from hone.corpus.write import ShardWriter
from hone.recipe import FilterConfig
from hone.rundir import write_jsonl


def _filter_task(shard, text_field: str, cfg_json: dict, work: Path, out: Path, i: int, write_dropped: bool) -> dict:
    cfg = FilterConfig(**cfg_json)
    read, step, q = StepStats(), StepStats(), Quarantine(work / f"quarantine-{i:05d}.jsonl")
    dropped: list[dict] | None = [] if write_dropped else None
    writer = ShardWriter(out / f"part-{i:05d}.parquet")
    for batch in batched(read_shard(shard, text_field, q, read), 4096):
        writer.write(list(run_decide(batch, lambda d: filters.check(d["text"], cfg), step, dropped)))
    writer.close()
    q.close()
    write_jsonl(work / f"dropped-{i:05d}.jsonl", dropped or [])
    return {"read": read.as_dict(), "filter": step.as_dict()}


def filter_step(inputs: list, out_dir: Path, *, text_field: str = "text", executor=None, write_dropped: bool = False,
                **params) -> dict:
    """Gopher / C4 heuristic filters (``hone.recipe.FilterConfig`` fields), shard by shard;
    ``write_dropped`` keeps the removed documents in OUT/.hone/dropped/dropped.jsonl."""
    t0, out_dir, shards = time.perf_counter(), Path(out_dir), expand_inputs(inputs)
    cfg = FilterConfig(**params).model_dump()
    config = {**cfg, "write_dropped": write_dropped, "text_field": text_field}
    work, done = prepare_output(out_dir, run_key(shards, {"step": "filter", **config}))
    if done is not None:
        return done
    work.mkdir(parents=True, exist_ok=True)
    res = run_tasks(executor or get_executor(), [Task(work / f"part-{i:05d}", _filter_task,
                                                      (sh, text_field, cfg, work, out_dir, i, write_dropped))
                                                 for i, sh in enumerate(shards)])
    read, step = merged(res, "read"), merged(res, "filter")
    parts = [f"part-{i:05d}.parquet" for i in range(len(shards))]
    manifest = step_manifest("filter", shards, read, step, config, parts, t0)
    return finish_output(out_dir, manifest, [out_dir / p for p in parts],
                         [work / f"quarantine-{i:05d}.jsonl" for i in range(len(shards))],
                         [work / f"dropped-{i:05d}.jsonl" for i in range(len(shards))])
