"""What a cluster does to a job, on this CPU with gloo: preemption (SIGTERM mid-run -> every rank
finishes its step, a checkpoint, status 75; the same command again resumes to bitwise the same
weights) and two torchrun "nodes" on localhost meeting through the c10d rendezvous of the
printed multi-node line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hone.rundir import read_events
from hone.train.preempt import EXIT_PREEMPTED
from tiny_runs import assert_same_run, clean_env, hone_process, run_metrics, tiny_recipe_text

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
SLOW = "slow:step=1:ms=150"  # every step 150 ms longer: time to signal mid-run (changes no number)


def _recipe_text(workdir: Path, **train) -> str:
    return tiny_recipe_text(workdir, steps=STEPS, **train)


@pytest.fixture(scope="module")
def prepared(tiny12):
    return tiny12.root


def _hone(*args, env=None, check=True) -> subprocess.CompletedProcess:
    return hone_process(*args, env=env, check=check, timeout=300)


def _workdir(prepared: Path, name: str) -> Path:
    dest = prepared / name
    if not dest.exists():
        shutil.copytree(prepared / "base", dest)
    return dest


def _assert_bitwise(a: Path, b: Path) -> None:
    assert_same_run(a, b, steps=STEPS, exact=True)


def _signal_after_step(args: list, workdir: Path, step: int, sig=signal.SIGTERM) -> subprocess.CompletedProcess:
    """Start `hone ARGS`, send ``sig`` to it once metrics.jsonl shows ``step``, wait for its exit."""
    proc = subprocess.Popen([sys.executable, "-m", "hone.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env(HONE_FAULT=SLOW))
    deadline = time.time() + 240
    while len(run_metrics(workdir)) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _assert_preempted(proc: subprocess.CompletedProcess, workdir: Path, world: int) -> int:
    """Status 75, one line saying so, the event, and a checkpoint at the step it stopped after."""
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("preempted: ") and "resume" in last, last
    [event] = [e for e in read_events(workdir) if e["kind"] == "preempted"]
    step = event["step"]
    assert 3 <= step < STEPS and event["world"] == world
    assert (workdir / "checkpoints" / f"step_{step:06d}").is_dir()
    assert len(run_metrics(workdir)) == step
    return step


@pytest.fixture(scope="module")
def one_process(tiny12):
    return tiny12.one()


@pytest.fixture(scope="module")
def two_ranks(tiny12):
    return tiny12.two()[0]


def test_sigterm_single_process_checkpoints_and_resumes_bitwise(prepared, one_process):
    wd = _workdir(prepared, "term1")
    proc = _signal_after_step(["train", prepared / "fsdp.toml", "--workdir", wd, "--fresh"], wd, 3)
    step = _assert_preempted(proc, wd, world=1)
    assert f"preempted: stopped after step {step} with checkpoint step_{step:06d}" in proc.stdout
    assert not (wd / "final").exists()
    resumed = _hone("train", prepared / "fsdp.toml", "--workdir", wd)
    assert f"resumed from {wd / 'checkpoints' / f'step_{step:06d}'} at step {step}" in resumed.stdout
    _assert_bitwise(one_process, wd)


def test_sigterm_to_two_rank_job_checkpoints_and_resumes_bitwise(prepared, two_ranks):
    """The signal reaches `hone train --nproc 2`, which passes it to torchrun and its workers."""
    wd = _workdir(prepared, "term2")
    proc = _signal_after_step(["train", prepared / "fsdp.toml", "--workdir", wd, "--fresh", "--nproc", 2], wd, 3)
    _assert_preempted(proc, wd, world=2)
    assert sum(line.startswith("preempted: ") for line in proc.stderr.splitlines()) == 1
    _hone("train", prepared / "fsdp.toml", "--workdir", wd, "--nproc", 2)
    _assert_bitwise(two_ranks, wd)


# Slurm on one machine: `srun` runs the step once per "node" and passes a signal on to the first
# node only (a notice that reaches the nodes at different times: the others must learn it from
# the step-end all-reduce); it says each node's status and returns the highest.
FAKE_SRUN = """#!/bin/bash
pids=()
for node in $(seq 1 "$SLURM_NNODES"); do "$@" & pids+=($!); done
trap 'signalled=1; kill -USR1 "${pids[0]}" 2>/dev/null' USR1 TERM
status=0
for p in "${pids[@]}"; do
  signalled=0; wait "$p"; s=$?
  while [ "$signalled" = 1 ]; do signalled=0; wait "$p"; s=$?; done
  echo "node status $s" >&2
  [ "$s" -gt "$status" ] && status=$s
done
exit "$status"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in
  show) echo 127.0.0.1 ;;
  requeue) echo "$2" >> "$SCONTROL_LOG" ;;
esac
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final_weights(workdir: Path) -> dict:
    """The model tensors of the run's step-STEPS DCP checkpoint (the workers' own output)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = workdir / "final.pt"
    dcp_to_torch_save(workdir / "checkpoints" / f"step_{STEPS:06d}", out)
    return torch.load(out, weights_only=True)["model"]


def _fake_slurm(tmp_path: Path, script_text: str) -> tuple[Path, dict]:
    """The batch script and the environment Slurm would give it (job 4242, 2 nodes, this host)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = f'#!/bin/sh\nexec {sys.executable} "$@"\n'  # the script's `python`: this interpreter
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("python", python)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(script_text)
    return script, clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="2",
                        SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(_free_port()),
                        SCONTROL_LOG=str(tmp_path / "requeued"), OMP_NUM_THREADS="1")


def test_two_nodes_of_two_ranks_from_the_slurm_script_preempt_requeue_and_match_one_node(prepared, tmp_path):
    """The generated Slurm script for 2 nodes x 2 processes, on localhost (c10d rendezvous): USR1 to
    the script mid-run -> both nodes checkpoint and exit 75, `scontrol requeue`; the requeued script
    resumes and ends bitwise on the weights a 1-node 4-process run ends on."""
    from hone.plan.commands import multinode_commands
    from hone.train.run import torchrun_argv

    ref = _workdir(prepared, "one_node_4")
    subprocess.run(torchrun_argv(ref, 4, None), env=clean_env(OMP_NUM_THREADS="1"), check=True, capture_output=True,
                   timeout=300)
    wd = _workdir(prepared, "two_nodes")
    script, env = _fake_slurm(tmp_path, multinode_commands(str(prepared / "fsdp.toml"), str(wd), 2, 2)["slurm"])
    env["HONE_FAULT"] = SLOW
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(run_metrics(wd)) < 3 and job.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` sends
    out, err = job.communicate(timeout=240)
    assert job.returncode == EXIT_PREEMPTED, err
    assert [ln for ln in err.splitlines() if ln.startswith("node status")] == ["node status 75"] * 2, err
    assert "Traceback" not in err
    assert "preempted: checkpoint written; requeueing job 4242" in out
    assert (tmp_path / "requeued").read_text() == "4242\n"
    [event] = [e for e in read_events(wd) if e["kind"] == "preempted"]
    assert event["world"] == 4 and 3 <= event["step"] < STEPS

    env["MASTER_PORT"] = str(_free_port())  # the requeued job: same script, no signal
    again = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    step = event["step"]
    assert f"resumed from {wd / 'checkpoints' / f'step_{step:06d}'}" in again.stdout
    # The run directory's step-1 checkpoint (the data stages' one-step run) is where both runs start.
    assert [m["world"] for m in run_metrics(wd)] == [1] + [4] * (STEPS - 1)
    want, got = _final_weights(ref), _final_weights(wd)
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].equal(want[k]), f"{k} differs"


def test_supervised_slurm_script_requeues_a_crashed_job_which_then_finishes(prepared, tmp_path):
    """`hone train --nnodes 2 --supervise`'s script: a worker SIGKILLed on one node fails the job,
    the script requeues it (restart 1 of 2), and the requeued job resumes and finishes."""
    from hone.plan.commands import multinode_commands

    wd = _workdir(prepared, "two_nodes_crash")
    script, env = _fake_slurm(
        tmp_path, multinode_commands(str(prepared / "fsdp.toml"), str(wd), 2, 1, requeue_failures=2)["slurm"])
    env["HONE_FAULT"] = "kill:step=6:rank=1"
    crashed = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert crashed.returncode not in (0, 2, EXIT_PREEMPTED), crashed.stderr
    assert f"failed with status {crashed.returncode}: requeueing job 4242 (restart 1 of 2)" in crashed.stdout
    assert (tmp_path / "requeued").read_text() == "4242\n"
    env |= {"SLURM_RESTART_COUNT": "1", "MASTER_PORT": str(_free_port())}
    again = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout and "step_000004" in again.stdout
    assert [m["step"] for m in run_metrics(wd)] == list(range(1, STEPS + 1))
    assert (wd / "checkpoints" / f"step_{STEPS:06d}").is_dir()
