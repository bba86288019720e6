"""`hone data build` killed (SIGKILL) mid-run and started again: finished shards are skipped,
the output is byte-for-byte the output of an uninterrupted run."""

import json
import os
import random
import subprocess
import sys

import pyarrow.dataset as ds

from hone.corpus.build_config import load_build, run_build
from hone.corpus.read import read_inputs

WORDS = "river stone cloud field light sound paper glass metal water enzyme gene cell protein".split()


def _inputs(d, shards=6, docs=40):
    rng = random.Random(0)
    d.mkdir()
    for k in range(shards):
        rows = []
        for i in range(docs):
            text = " ".join(rng.choice(WORDS) + str(rng.randrange(40)) for _ in range(rng.randrange(2, 60)))
            rows.append({"id": f"s{k}d{i}", "text": text})
            if i % 5 == 0:  # a near-copy in the same shard
                rows.append({"id": f"s{k}d{i}c", "text": text + " extra"})
        (d / f"in{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{bad line\n")


def _recipe(tmp_path, out):
    r = tmp_path / f"{out}.toml"
    r.write_text(f"""
[build]
inputs = ["{tmp_path / 'in'}"]
output = "{tmp_path / out}"
workers = 1

[[steps]]
type = "filter"
min_words = 3

[[steps]]
type = "dedup"
threshold = 0.7
cluster_column = true

[[steps]]
type = "select"
method = "random"
max_docs = 100
""")
    return r


def _killed(recipe, after_tasks):
    env = {**os.environ, "HONE_CORPUS_FAULT": f"kill:tasks={after_tasks}"}
    p = subprocess.run([sys.executable, "-m", "hone.cli", "data", "build", str(recipe)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stdout + p.stderr


def _files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet")) if "work" not in p.parts}


def test_killed_build_resumes_to_identical_output(tmp_path):
    _inputs(tmp_path / "in")
    ref = run_build(load_build(_recipe(tmp_path, "ref")), log=lambda m: None)

    recipe = _recipe(tmp_path, "out")
    out = tmp_path / "out"
    _killed(recipe, 9)  # 6 filter shards, then dedup pass 1: killed on its 3rd shard, before its marker
    steps = out / ".hone" / "steps"
    filter_parts = {p: p.stat().st_mtime_ns for p in (steps / "01-filter").glob("part-*.parquet")}
    assert len(filter_parts) == 6 and (steps / "01-filter" / ".hone" / "manifest.json").exists()
    work = steps / "02-dedup" / ".hone" / "work"
    done = {p: p.stat().st_mtime_ns for p in work.glob("keys-*.done")}
    assert sorted(p.name for p in done) == ["keys-00000.done", "keys-00001.done"]
    assert not (out / ".hone" / "manifest.json").exists() and not list(out.glob("part-*"))

    _killed(recipe, 7)  # again: 4 more dedup pass-1 shards, then the 3rd output shard of pass 3
    assert len(list(work.glob("part-*.done"))) == 2

    m = run_build(load_build(recipe), log=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in filter_parts} == filter_parts  # not run again
    assert {p: p.stat().st_mtime_ns for p in done} == done
    assert _files(out) == _files(tmp_path / "ref") and len(_files(out)) == 6 + 6 + 1 + 1  # steps, then OUTPUT's
    assert _files(out)["part-00000.parquet"] == _files(out)[".hone/steps/03-select/part-00000.parquet"]
    assert m["totals"] == ref["totals"] and m["steps"] == ref["steps"]
    assert m["totals"]["dropped"] > 0 and m["totals"]["quarantined"] == 6
    assert not list(out.rglob(".part-*.tmp"))
    ids = ds.dataset(out, format="parquet").to_table().column("id").to_pylist()  # OUTPUT reads as the kept docs
    assert ids == [r["id"] for r in read_inputs([out])] and len(ids) == m["totals"]["kept"]
