"""`hone train --nproc N` on the CPU with gloo: 2-process DDP and FSDP2 equal 1 process,
kill -9 (also mid-checkpoint) then the same command again is bitwise identical, checkpoints reshard
between world sizes, and the multi-node launch material."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tiny_runs import assert_same_run, hone_process, run_metrics, tiny_recipe_text

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def _recipe_text(workdir: Path, **train) -> str:
    return tiny_recipe_text(workdir, steps=STEPS, **train)


@pytest.fixture(scope="module")
def prepared(tiny12):
    """The shared run directory whose data stages are done, with a recipe per layout."""
    root = tiny12.root
    (root / "ddp.toml").write_text(_recipe_text(root / "base", data_parallel="ddp"))
    (root / "tp.toml").write_text(_recipe_text(root / "base", tp=2))
    (root / "ac.toml").write_text(_recipe_text(root / "base", activation_checkpointing=True, micro_batch=2))
    return root


def _hone(*args, env=None, check=True) -> subprocess.CompletedProcess:
    return hone_process(*args, env=env, check=check, timeout=300)


def _workdir(prepared: Path, name: str) -> Path:
    dest = prepared / name
    if not dest.exists():
        shutil.copytree(prepared / "base", dest)
    return dest


@pytest.fixture(scope="module")
def one_process(tiny12):
    return tiny12.one()


@pytest.fixture(scope="module")
def two_fsdp(tiny12):
    return tiny12.two()


def _assert_same_run(a: Path, b: Path, *, exact: bool) -> None:
    assert_same_run(a, b, steps=STEPS, exact=exact, grad_norm=False)


def test_two_process_fsdp_matches_one_process(one_process, two_fsdp):
    wd, _ = two_fsdp
    _assert_same_run(one_process, wd, exact=False)
    summary = json.loads((wd / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["plan"]["data_parallel"] == "fsdp"


def test_two_process_ddp_matches_one_process(prepared, one_process):
    wd = _workdir(prepared, "ddp2")
    _hone("train", prepared / "ddp.toml", "--workdir", wd, "--fresh", "--nproc", 2)
    _assert_same_run(one_process, wd, exact=False)
    assert json.loads((wd / "train_summary.json").read_text())["plan"]["data_parallel"] == "ddp"


def test_two_process_tensor_parallel_matches_one_process(prepared, one_process):
    wd = _workdir(prepared, "tp2")
    _hone("train", prepared / "tp.toml", "--workdir", wd, "--fresh", "--nproc", 2)
    _assert_same_run(one_process, wd, exact=False)
    assert json.loads((wd / "train_summary.json").read_text())["plan"]["tp"] == 2


def test_activation_checkpointing_and_micro_batches_match(prepared, one_process):
    """Recomputing activations and accumulating 4 micro-batches of 2 change nothing but memory."""
    wd = _workdir(prepared, "ac")
    out = _hone("train", prepared / "ac.toml", "--workdir", wd, "--fresh")
    assert "4 micro-batches x 2 seqs" in out.stdout
    _assert_same_run(one_process, wd, exact=False)


def test_kill9_during_checkpoint_write_then_resume_is_bitwise_identical(prepared, one_process):
    wd = _workdir(prepared, "killed_in_ckpt")
    proc = _hone("train", prepared / "fsdp.toml", "--workdir", wd, "--fresh", env={"HONE_FAULT": "kill:ckpt=8"},
                 check=False)
    assert proc.returncode == -9
    ckpts = wd / "checkpoints"
    assert (ckpts / ".step_000008.tmp").exists() and not (ckpts / "step_000008").exists()
    resumed = _hone("train", prepared / "fsdp.toml", "--workdir", wd)
    assert "resumed from" in resumed.stdout and "step_000004" in resumed.stdout
    _assert_same_run(one_process, wd, exact=True)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000008", "step_000012"]


def test_kill9_of_one_worker_then_resume_is_bitwise_identical(prepared, two_fsdp):
    wd = _workdir(prepared, "killed_worker")
    proc = _hone("train", prepared / "fsdp.toml", "--workdir", wd, "--fresh", "--nproc", 2,
                 env={"HONE_FAULT": "kill:step=6:rank=1"}, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: torchrun with 2 processes exited")
    assert "worker rank 1" in proc.stderr and "killed by SIGKILL" in proc.stderr
    assert "Traceback" not in proc.stderr
    _hone("train", prepared / "fsdp.toml", "--workdir", wd, "--nproc", 2)
    _assert_same_run(two_fsdp[0], wd, exact=True)


def test_resume_on_another_world_size(prepared, one_process):
    """1 process to step 6, 2 processes to step 9, 1 process to the end: each resumes the other's
    checkpoint and the run equals one process throughout."""
    wd = _workdir(prepared, "reshard")
    _hone("train", prepared / "fsdp.toml", "--workdir", wd, "--fresh", "--max-steps", 6)
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["step_000004", "step_000006"]
    _hone("train", prepared / "fsdp.toml", "--workdir", wd, "--nproc", 2, "--max-steps", 9)
    assert sorted(p.name for p in (wd / "checkpoints").iterdir())[-1] == "step_000009"
    out = _hone("train", prepared / "fsdp.toml", "--workdir", wd)
    assert "resumed from" in out.stdout and "step 9" in out.stdout
    _assert_same_run(one_process, wd, exact=False)


def test_bad_tensor_parallel_degree_is_one_line(prepared, tmp_path):
    recipe = tmp_path / "tp3.toml"
    recipe.write_text(_recipe_text(prepared / "tp3", tp=3))
    proc = _hone("train", recipe, "--nproc", 2, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: train.tp (3) does not divide the number of processes (2)"


def test_multinode_prints_torchrun_and_writes_slurm(prepared, tmp_path):
    proc = _hone("train", prepared / "fsdp.toml", "--workdir", tmp_path / "mn", "--nnodes", 4, "--nproc", 8)
    assert "torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d" in proc.stdout
    script = (tmp_path / "mn" / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=8" in script
    assert "srun python -m hone.train.torchrun --nnodes 4" in script and "-m hone.train.worker" in script
    # Preemption: Slurm signals the script 120 s ahead; status 75 (checkpoint written) requeues the job.
    assert "#SBATCH --signal=B:USR1@120" in script and "#SBATCH --requeue" in script
    assert "trap 'signalled=1; kill -USR1 \"$pid\" 2>/dev/null' USR1 TERM" in script
    assert 'if [ "$status" -eq 75 ]; then' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert not (tmp_path / "mn" / "checkpoints").exists()


def test_parent_holds_no_weights_while_workers_train(two_fsdp):
    """`hone train --nproc 2`: the calling process lets go of the base model before torchrun
    starts (each worker loads only its shards) and builds the trained one from the checkpoint."""
    _, seen = two_fsdp
    assert seen == [0]


def test_two_processes_track_from_rank_zero_only(two_fsdp, monkeypatch):
    """[log] mlflow under torchrun: one MLflow run (rank 0's) holding each step of metrics.jsonl
    once, then the evaluation table and report.html from the end of the run."""
    from mlflow.tracking import MlflowClient

    from hone.train.tracking import scalars

    wd, _ = two_fsdp
    state = json.loads((wd / "tracking.json").read_text())["mlflow"]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when told to
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("dist").experiment_id])
    assert [r.info.run_id for r in runs] == [state["run_id"]]
    got = {}
    for key in client.get_run(state["run_id"]).data.metrics:
        for m in client.get_metric_history(state["run_id"], key):
            assert (m.key, m.step) not in got, f"{m.key} step {m.step} sent twice"
            got[(m.key, m.step)] = m.value
    want = {(k, row["step"]): v for row in run_metrics(wd) for k, v in scalars(row).items()}
    assert {k: v for k, v in got.items() if not k[0].startswith("eval/")} == want
    table = json.loads((wd / "eval.json").read_text())
    assert {k: v for k, v in got.items() if k[0].startswith("eval/")} == {
        (f"eval/{k}", STEPS): v for k, v in scalars(table).items()}
    assert {a.path for a in client.list_artifacts(state["run_id"])} == {"eval.json", "recipe.json", "report.html"}
