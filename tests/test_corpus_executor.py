"""Executors: local processes give the same results as one process; Ray is optional."""

import importlib.util
import json

import pyarrow.parquet as pq
import pytest

from hone.corpus.executor import LocalExecutor, Task, get_executor, run_tasks
from hone.corpus.steps.dedup import NearDedupConfig, near_dedup
from hone.errors import HoneError


def _square(x):
    return {"y": x * x}


def test_run_tasks_skips_marked_tasks(tmp_path):
    tasks = [Task(tmp_path / f"t{i}", _square, (i,)) for i in range(4)]
    assert run_tasks(LocalExecutor(2), tasks) == [{"y": i * i} for i in range(4)]
    (tmp_path / "t1.done").write_text(json.dumps({"result": {"y": -1}}))
    assert run_tasks(LocalExecutor(2), tasks)[1] == {"y": -1}  # not run again


def _inputs(tmp_path):
    text = "the same sentence about rivers and stones repeats in every file of this little corpus"
    for k in range(3):
        (tmp_path / f"in{k}.jsonl").write_text(
            "".join(json.dumps({"text": f"{text} {k} {i} " + " ".join(map(str, range(i, i + 30)))}) + "\n"
                    for i in range(20)))
    return sorted(tmp_path.glob("in*.jsonl"))


def test_local_processes_match_single_process(tmp_path):
    inputs = _inputs(tmp_path)
    near_dedup(inputs, tmp_path / "one", NearDedupConfig(), executor=LocalExecutor(1))
    near_dedup(inputs, tmp_path / "two", NearDedupConfig(), executor=LocalExecutor(2))
    for i in range(3):
        assert pq.read_table(tmp_path / "one" / f"part-{i:05d}.parquet").equals(
            pq.read_table(tmp_path / "two" / f"part-{i:05d}.parquet"))


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed")
def test_ray_missing_is_a_clear_error():
    with pytest.raises(HoneError, match="pip install"):
        get_executor("ray")


@pytest.fixture
def ray_session():
    ray = pytest.importorskip("ray")
    yield
    ray.shutdown()  # no Ray threads left behind for later tests that fork


def test_ray_build_matches_local_byte_for_byte(tmp_path, ray_session):
    """A whole `hone data build` (filter, dedup, select) on a local Ray instance writes the
    same bytes as the local executor."""
    import random

    from hone.corpus.build_config import load_build, run_build

    rng, words = random.Random(0), "river stone cloud field light sound paper glass metal water gene cell".split()
    for k in range(3):
        texts = [" ".join(rng.choice(words) + str(rng.randrange(30)) for _ in range(rng.randrange(3, 40)))
                 for _ in range(30)]
        texts += [t + " again" for t in texts[:8]]
        (tmp_path / f"in{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + "{bad\n")
    outs = {}
    for name in ("local", "ray"):
        recipe = tmp_path / f"{name}.toml"
        recipe.write_text(f"""
[build]
inputs = ["{tmp_path}/in*.jsonl"]
output = "{tmp_path / name}"
executor = "{name}"
workers = 2

[[steps]]
type = "filter"
min_words = 5

[[steps]]
type = "dedup"
threshold = 0.5
cluster_column = true

[[steps]]
type = "select"
method = "random"
max_docs = 30
""")
        m = run_build(load_build(recipe), log=lambda msg: None)
        outs[name] = {str(p.relative_to(tmp_path / name)): p.read_bytes()
                      for p in sorted((tmp_path / name).rglob("*.parquet")) if "work" not in p.parts}
        outs[name + "_totals"] = m["totals"]
    assert len(outs["local"]) == 3 + 3 + 1 + 1 and outs["local"] == outs["ray"]  # the steps', then OUTPUT's
    assert outs["local_totals"] == outs["ray_totals"] and outs["local_totals"]["dropped"] > 0


def test_unknown_executor():
    with pytest.raises(HoneError, match="executor must be"):
        get_executor("slurm")
