"""`hone train --supervise` end to end on the CPU (gloo): a worker killed with SIGKILL, a
hang and a NaN loss are each detected and recovered from; the run finishes, the loss curve
is continuous, and the sample ledger shows every window consumed exactly once."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from hone.heal.accounting import audit, effective, read_ledger
from hone.recipe import load_recipe
from test_train_distributed import _hone, _recipe_text
from tiny_runs import run_metrics as _metrics

STEPS = 8
HEAL = "\n[heal]\nrepair_s = 3600\nhang_min_s = 4\nhang_factor = 5\nstraggler_min_s = 0.15\n"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Data stages done once; a global batch of 12 splits over 4, 3 and 2 workers alike."""
    from hone.pipeline import run_recipe

    root = tmp_path_factory.mktemp("heal")
    recipe = root / "heal.toml"
    recipe.write_text(_recipe_text(root / "base", batch_size=12, max_tokens=STEPS * 12 * 64, checkpoint_every=2) + HEAL)
    run_recipe(load_recipe(recipe), root / "base", max_steps=1, log=lambda m: None)
    return root


def _copy(prepared: Path, name: str) -> Path:
    shutil.copytree(prepared / "base", prepared / name)
    return prepared / name


def _events(wd: Path) -> list[dict]:
    return [json.loads(line) for line in (wd / "events.jsonl").read_text().splitlines()]


def _train(prepared: Path, wd: Path, overrides: dict | None = None, **kw) -> None:
    """`hone train RECIPE --workdir WD [--supervise --nproc N]`, in this process (the workers are
    torchrun's processes either way; this saves the CLI's start-up on a busy CI machine)."""
    from hone.pipeline import run_recipe

    run_recipe(load_recipe(prepared / "heal.toml", overrides), wd, fresh_training=True, log=lambda m: None, **kw)


@pytest.fixture(scope="module")
def reference(prepared):
    """One process, no failure."""
    wd = _copy(prepared, "reference")
    _train(prepared, wd)
    return wd


def test_kill9_of_one_of_four_workers_finishes_on_three(prepared, reference, monkeypatch, capfd):
    wd = _copy(prepared, "killed")
    # Rank 1 is also a straggler: 0.3 s more per step.
    monkeypatch.setenv("HONE_FAULT", "kill:step=6:rank=2;slow:step=1:rank=1:ms=300")
    # micro_batch 3 divides the 3 rows per rank on 4 workers but not the 4 rows on 3: the re-plan changes it.
    _train(prepared, wd, overrides={"train.micro_batch": 3}, supervise=True, nproc=4)
    assert "Traceback" not in capfd.readouterr().err
    events = _events(wd)
    slow = [e for e in events if e["kind"] == "straggler"]
    assert [e["rank"] for e in slow] == [1] and slow[0]["ratio"] > 1.5 and slow[0]["busy_s"] > 0.3
    events = [e for e in events if e["kind"] != "straggler"]
    kinds = [e["kind"] for e in events]
    assert kinds == ["supervise", "failure", "decision", "recovered", "finished"], kinds
    failure, decision, recovered, finished = events[1:]
    assert (failure["failure"], failure["rank"]) == ("worker_lost", 2) and "SIGKILL" in failure["detail"]
    # The repair takes an hour: finishing on 3 is cheaper than waiting for the fourth.
    assert decision["action"] == "shrink" and decision["world"] == 3
    costs = {o["action"]: o["cost_s"] for o in decision["options"]}
    assert set(costs) == {"shrink", "wait"} and costs["shrink"] < costs["wait"]
    assert decision["checkpoint_step"] == 4 and decision["lost_steps"] == 1
    # The new plan comes from hone.plan with the workers' model shape, and prices the shrink.
    plan = decision["plan"]
    assert plan["source"] == "hone.plan on 4xcpu (auto)"
    assert (plan["world"], plan["dp"], plan["rows_per_rank"], plan["micro_batch"], plan["fits"]) == (3, 3, 4, 4, True)
    modeled, measured = decision["modeled_step_s"], decision["step_s"]
    redo = STEPS - decision["checkpoint_step"]
    assert costs["shrink"] == pytest.approx(decision["restart_s"] + redo * measured["4"] * modeled["3"] / modeled["4"],
                                            abs=0.01)
    assert recovered["step"] == 5 and recovered["recovery_s"] > 0
    assert finished["world"] == 3 and finished["recoveries"] == 1
    # Continuous loss curve: every step once, the same losses as one uninterrupted process.
    got, ref = _metrics(wd), _metrics(reference)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert [m["world"] for m in got] == [4] * 4 + [3] * 4
    assert [m["batch"] for m in got] == [m["batch"] for m in ref]
    for a, b in zip(got, ref):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["step"], a["loss"], b["loss"])
    # Exact sample accounting across the restart: the same windows as the reference, once each.
    a = audit(wd / "samples.jsonl", seq_len=64)
    assert a["problems"] == [] and (a["trained"], a["skipped"], a["restarts"]) == (STEPS, 0, 1)
    assert [b["ids"] for b in effective(read_ledger(wd / "samples.jsonl"))] == \
        [b["ids"] for b in effective(read_ledger(reference / "samples.jsonl"))]
    assert (wd / "final" / "model.safetensors").exists()
    report = (wd / "report.html").read_text()
    assert "Failures and recoveries" in report and "rank 2 killed by SIGKILL" in report
    assert "shrink on 3" in report and "every sample consumed exactly once" in report
    assert "dp 3 x tp 1, micro-batch 4" in report and "hone.plan on 4xcpu (auto)" in report
    assert "Straggler at step" in report


def test_nan_then_hang_are_detected_and_handled(prepared, monkeypatch, capfd):
    wd = _copy(prepared, "nan_hang")
    monkeypatch.setenv("HONE_FAULT", "nan:step=3:rank=1;hang:step=6:rank=0")
    _train(prepared, wd, supervise=True, nproc=2)
    assert "Traceback" not in capfd.readouterr().err
    events = _events(wd)
    kinds = [e["kind"] for e in events]
    assert kinds == ["supervise", "nonfinite", "decision", "recovered",
                     "failure", "decision", "recovered", "finished"], kinds
    nonfinite, nan_decision, nan_recovered = events[1:4]
    assert nonfinite["step"] == 3 and nonfinite["skip_batches"] == [2] and nonfinite["grad_norm"] == "nan"
    # Rolled back in the running workers: no restart.
    assert nan_decision["action"] == "rollback" and nan_decision["checkpoint_step"] == 2
    assert nan_recovered["step"] == 3 and nan_recovered["restart_s"] == 0
    hang, hang_decision, hang_recovered = events[4:7]
    assert hang["failure"] == "hang" and hang["step"] == 5 and "no step for" in hang["detail"]
    assert hang_decision["action"] == "restart" and hang_decision["world"] == 2
    assert hang_decision["checkpoint_step"] == 4 and hang_recovered["step"] == 5
    # Rolled back and replayed: each step once, all finite.
    metrics = _metrics(wd)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    # The NaN's batch is consumed but marked skipped, never trained on, and never lost.
    a = audit(wd / "samples.jsonl", seq_len=64)
    assert a["problems"] == [] and (a["trained"], a["skipped"], a["batches"]) == (STEPS, 1, STEPS + 1)
    skipped = [b for b in effective(read_ledger(wd / "samples.jsonl")) if b["status"] == "skipped"]
    assert [b["batch"] for b in skipped] == [2] and len(skipped[0]["ids"]) == 12
    assert json.loads((wd / "heal" / "skips.json").read_text())["batches"] == [2]


def test_sigterm_to_the_supervisor_stops_the_workers_with_a_checkpoint(prepared, monkeypatch, capfd):
    """Preemption is not a failure to recover from: the workers checkpoint and the supervisor exits
    "preempted" (status 75 from the CLI) instead of restarting them."""
    from hone.errors import Preempted

    wd = _copy(prepared, "preempted")
    monkeypatch.setenv("HONE_FAULT", "slow:step=1:ms=300")

    def steps_done() -> int:
        try:
            return len(_metrics(wd))
        except (OSError, ValueError):  # not written yet, or a line half written
            return 0

    def preempt_after_step_3():
        deadline = time.time() + 240
        while time.time() < deadline and steps_done() < 3:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor passes it on to torchrun and the workers

    threading.Thread(target=preempt_after_step_3, daemon=True).start()
    with pytest.raises(Preempted, match="stopped after step"):
        _train(prepared, wd, supervise=True, nproc=2)
    assert "Traceback" not in capfd.readouterr().err
    events = _events(wd)
    assert [e["kind"] for e in events] == ["supervise", "preempted"], events
    step = events[1]["step"]
    assert 3 <= step < STEPS and events[1]["world"] == 2
    assert (wd / "checkpoints" / f"step_{step:06d}").is_dir()


def test_bad_fault_spec_is_a_one_line_error_and_multinode_supervise_says_what_it_does(prepared):
    proc = _hone("train", prepared / "heal.toml", "--workdir", prepared / "bad", "--supervise", "--fault",
                 "explode:step=1", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: HONE_FAULT: unknown fault 'explode' in 'explode:step=1' "
                                   "(want one of ['hang', 'kill', 'nan', 'slow'])")
    from typer.testing import CliRunner

    from hone.cli import app

    result = CliRunner().invoke(app, ["train", str(prepared / "heal.toml"), "--workdir", str(prepared / "bad"),
                                      "--supervise", "--nnodes", "2"])
    assert result.exit_code == 0, result.output
    said = [ln for ln in result.output.splitlines() if ln.startswith("--supervise on 2 nodes")]
    assert len(said) == 1 and "hang and straggler detection and shrinking" in said[0]
    script = (prepared / "bad" / "launch" / "slurm.sbatch").read_text()
    assert ('elif [ "$status" -ne 0 ] && [ "$status" -ne 2 ] && [ "${SLURM_RESTART_COUNT:-0}" -lt 10 ]; then'
            in script)
