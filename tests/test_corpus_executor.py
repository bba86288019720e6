"""Executors: local processes give the same results as one process; Ray is optional."""

import importlib.util
import json

import pyarrow.parquet as pq
import pytest

from hone.corpus.dedup import NearDedupConfig, near_dedup
from hone.corpus.executor import LocalExecutor, Task, get_executor, run_tasks
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


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed")
def test_ray_matches_local(tmp_path):
    inputs = _inputs(tmp_path)
    near_dedup(inputs, tmp_path / "local", NearDedupConfig(), executor=LocalExecutor(1))
    near_dedup(inputs, tmp_path / "ray", NearDedupConfig(), executor=get_executor("ray", 2))
    for i in range(3):
        assert pq.read_table(tmp_path / "local" / f"part-{i:05d}.parquet").equals(
            pq.read_table(tmp_path / "ray" / f"part-{i:05d}.parquet"))


def test_unknown_executor():
    with pytest.raises(HoneError, match="executor must be"):
        get_executor("slurm")
