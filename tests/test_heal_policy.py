"""Self-healing training, the parts without processes: failure classification, the cost-priced
decisions, Young/Daly, hang and straggler rules, fault specs, the sample ledger audit, the
recipe fields, and a single-process NaN roll-back that is as reproducible as a clean run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_llama
from hone.errors import HoneError
from hone.heal import policy
from hone.heal.accounting import audit
from hone.heal.policy import Failure, Situation, classify, decide, decide_grow
from hone.heal.replan import Replanner
from hone.plan import reliability
from hone.recipe import TrainConfig, parse_recipe
from hone.train import faults
from hone.train.hooks import CheckpointSchedule, NonFiniteLoss, load_skips, skip_window

KILLED, TERM = -9, -15


def test_classify_takes_the_killed_rank_over_the_torn_down_ones():
    f = classify([{"rank": 0, "exitcode": TERM, "time": 5}, {"rank": 2, "exitcode": KILLED, "time": 5},
                  {"rank": 1, "exitcode": 1, "time": 4}])
    assert (f.kind, f.rank) == ("worker_lost", 2)
    assert "SIGKILL" in f.detail


@pytest.mark.parametrize("code, kind", [(1, "transient"), (2, "fatal"), (3, "nonfinite")])
def test_classify_by_exit_status(code, kind):
    f = classify([{"rank": 1, "exitcode": code, "time": 1}, {"rank": 0, "exitcode": TERM, "time": 1}])
    assert (f.kind, f.rank) == (kind, 1)


def test_classify_hang_and_unknown():
    assert classify([], hung=True).kind == "hang"
    assert classify([]).kind == "transient"  # torchrun died without a report: try again


def situation(batch_size: int = 12, tp: int = 1, **kw) -> Situation:
    """No model shape: the valid worlds from divisibility, step times scaled as data parallelism."""
    base = dict(world=4, target_world=4, step=10, checkpoint_step=8, total_steps=100, step_s={4: 1.0},
                restart_s=20.0, down=0, repair_left_s=0.0)
    merged = {**base, **kw}
    planner = Replanner(TrainConfig(batch_size=batch_size, tp=tp), "auto", None, merged["target_world"])
    return Situation(worlds=planner.valid_worlds(merged["target_world"]), **merged)


def test_transient_failure_restarts_in_place_at_the_expected_cost():
    d = decide(Failure("transient", 1), situation())
    assert [o.action for o in d.options] == ["restart"]
    assert d.chosen.world == 4
    assert d.chosen.cost_s == pytest.approx(20.0 + (100 - 8) * 1.0)
    assert d.lost_steps == 2


def test_lost_worker_shrinks_when_the_repair_is_long():
    d = decide(Failure("worker_lost", 2), situation(down=1, repair_left_s=3600))
    by = {o.action: o for o in d.options}
    assert set(by) == {"shrink", "wait"}
    # Same global batch on 3 ranks: each step takes 4/3 as long (no measurement at 3 yet).
    assert by["shrink"].world == 3 and by["shrink"].cost_s == pytest.approx(20 + 92 * 4 / 3)
    assert by["wait"].cost_s == pytest.approx(3600 + 20 + 92)
    assert d.chosen.action == "shrink"


def test_lost_worker_waits_when_the_repair_is_short():
    d = decide(Failure("worker_lost", 2), situation(down=1, repair_left_s=5))
    assert d.chosen.action == "wait" and d.chosen.world == 4


def test_shrink_keeps_a_valid_shape():
    # A global batch of 8 does not split over 3 ranks: the next valid world is 2.
    d = decide(Failure("worker_lost", 0), situation(batch_size=8, down=1, repair_left_s=3600))
    assert d.chosen.action == "shrink" and d.chosen.world == 2
    # tp=2: worlds must be multiples of 2 as well.
    assert Replanner(TrainConfig(batch_size=12, tp=2), "auto", None, 8).valid_worlds(8) == [8, 6, 4, 2]


def test_measured_step_time_beats_the_scaling_guess():
    d = decide(Failure("worker_lost", 0), situation(down=1, repair_left_s=3600, step_s={4: 1.0, 3: 1.1}))
    assert d.chosen.cost_s == pytest.approx(20 + 92 * 1.1)


def test_fatal_gives_up():
    assert decide(Failure("fatal", 0), situation()).chosen.action == "give_up"


def test_grow_back_only_when_it_pays():
    s = situation(world=3, step=20, checkpoint_step=20, step_s={4: 1.0, 3: 1.3})
    assert decide_grow(s, 0).chosen.action == "grow"  # 80 steps x 0.3 s saved > 20 s restart
    s.step = s.checkpoint_step = 95
    assert decide_grow(s, 0).chosen.action == "stay"  # 5 steps left: not worth a restart


def test_young_daly():
    assert reliability.young_daly_s(10.0, 3600.0) == pytest.approx(math.sqrt(2 * 10 * 3600))
    assert reliability.interval_steps(10.0, 3600.0, 2.0, 10_000) == round(math.sqrt(72000) / 2)
    assert reliability.interval_steps(10.0, 3600.0, 2.0, 50) == 50   # never beyond the run
    assert reliability.interval_steps(1e-6, 1.0, 100.0, 50) == 1     # at least one step


def test_job_mtbf_blends_configured_and_observed():
    assert reliability.job_mtbf_s(50_000, 16384) == pytest.approx(50_000 * 3600 / 16384)
    # One failure in 10 worker-hours, with the configured 10 h as one prior failure: 10 h per worker.
    assert reliability.job_mtbf_s(10, 2, observed_worker_s=10 * 3600, failures=1) == pytest.approx(10 * 3600 / 2)


def test_hang_timeout_and_stragglers():
    assert policy.hang_timeout_s([0.1, 0.2, 0.3], 10, 5) == 5
    assert policy.hang_timeout_s([1.0, 2.0, 3.0], 10, 5) == 20
    assert policy.hang_timeout_s([], 10, 5) == 5
    found = policy.stragglers({0: 0.10, 1: 0.32, 2: 0.11, 3: 0.09}, 1.5, 0.05)
    assert found == [{"rank": 1, "busy_s": 0.32, "median_s": 0.1, "ratio": 3.2}]
    assert policy.stragglers({0: 0.10, 1: 0.13}, 1.5, 0.05) == []     # within the factor
    assert policy.stragglers({0: 0.001, 1: 0.01}, 1.5, 0.05) == []    # 10x but 9 ms: jitter


def test_fault_specs():
    got = faults.parse("kill:step=7:rank=1; hang:step=3 ;nan:step=5:rank=0;slow:step=2:rank=1:ms=200;kill:ckpt=8")
    assert [(f["kind"], f.get("step"), f.get("ckpt"), f["rank"]) for f in got] == [
        ("kill", 7, None, 1), ("hang", 3, None, None), ("nan", 5, None, 0), ("slow", 2, None, 1),
        ("kill", None, 8, None)]
    for bad, msg in [("boom:step=1", "unknown fault 'boom'"), ("hang:ckpt=2", "only kill can fire at ckpt"),
                     ("slow:step=2", "slow needs ms=M"), ("nan:rank=1", "neither step=N nor ckpt=N"),
                     ("kill:step=x", "bad field 'step=x'")]:
        with pytest.raises(HoneError, match=msg):
            faults.parse(bad)


def test_faults_fire_once_per_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HONE_FAULT", "nan:step=3:rank=1;slow:step=2:rank=0:ms=50")
    assert not faults.poison_loss(3, 0, tmp_path)
    assert faults.poison_loss(3, 1, tmp_path)
    assert not faults.poison_loss(3, 1, tmp_path)  # the replayed step after the roll-back runs clean
    assert (tmp_path / "fired").is_dir()
    assert faults.slow_down(1, 0) == 0 and faults.slow_down(2, 0) == faults.slow_down(9, 0) == 0.05


def test_skip_window_never_reaches_before_the_checkpoint():
    assert skip_window(9, 6, 1) == [9]
    assert skip_window(9, 6, 3) == [7, 8, 9]
    assert skip_window(9, 8, 5) == [8, 9]


def test_recipe_fields_are_validated_in_one_line():
    base = {"data": {"inputs": ["x.jsonl"]}, "curate": {"domain": {"keywords": ["gene"]}}}
    r = parse_recipe({**base, "train": {"checkpoint_every": "auto", "worker_mtbf_hours": 100}}, "r.toml")
    assert r.train.checkpoint_every == "auto" and r.heal.repair_s == 600
    for train, heal, msg in [({"checkpoint_every": "often"}, {},
                              'r.toml: train.checkpoint_every: must be a whole number of steps >= 0 or '
                              '"auto"'),
                             ({"checkpoint_every": -2}, {}, "r.toml: train.checkpoint_every: must be a whole number"),
                             ({"worker_mtbf_hours": 0}, {},
                              "r.toml: train.worker_mtbf_hours: Input should be greater than 0"),
                             ({}, {"hang_factor": 0.5}, "r.toml: heal.hang_factor: Input should be greater than 1"),
                             ({}, {"repair": 3}, "r.toml: heal.repair: unknown field")]:
        with pytest.raises(HoneError) as e:
            parse_recipe({**base, "train": train, "heal": heal}, "r.toml")
        assert str(e.value).startswith(msg) and "\n" not in str(e.value)


def test_auto_checkpoint_interval_follows_young_daly(tmp_path, monkeypatch):
    monkeypatch.setenv("HONE_JOB_MTBF_S", "100")
    said = []
    cfg = TrainConfig(checkpoint_every="auto")
    s = CheckpointSchedule(cfg, total_steps=1000, start=0, world=2, n_params=0, broadcast=lambda v: v,
                           say=said.append, workdir=tmp_path)
    assert s.mtbf_s == 100
    due = [s.due(k, 1000, 0.1) for k in (1, 2, 3)]
    # Estimated C = 0.05 s: tau = sqrt(2 * 0.05 * 100) = 3.16 s = 32 steps of 0.1 s.
    assert due == [False, False, False] and s.every == 32
    s.saved(32, 2.0)  # a measured 2 s write: tau = 20 s = 200 steps
    assert s.every == 200 and "C = 2.000 s measured" in said[-1]
    assert not s.due(231, 1000, 0.1) and s.due(232, 1000, 0.1)
    events = [json.loads(l) for l in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["every_steps"] for e in events] == [32, 200] and events[1]["tau_s"] == 20.0
    fixed = CheckpointSchedule(TrainConfig(checkpoint_every=4), total_steps=10, start=0, world=1, n_params=0,
                               broadcast=lambda v: v, say=said.append, workdir=None)
    assert [k for k in range(1, 11) if fixed.due(k, 10, 0.1)] == [4, 8]


def _ledger(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_audit_resolves_roll_backs_and_finds_repeats(tmp_path):
    def batch(b, step, pos, status="trained"):
        return {"batch": b, "step": step, "status": status, "ids": [f"d:0:{pos}", f"g:0:{pos}"]}
    good = [{"resume": 0}, batch(0, 1, 0), batch(1, 2, 4), batch(2, 3, 8),  # step 3 is rolled back:
            {"resume": 2}, batch(2, None, 8, "skipped"), batch(3, 3, 12)]
    _ledger(tmp_path / "ok.jsonl", good)
    a = audit(tmp_path / "ok.jsonl", seq_len=4)
    assert a["problems"] == [] and (a["trained"], a["skipped"], a["skipped_samples"], a["rolled_back"]) == (3, 1, 2, 1)
    _ledger(tmp_path / "dup.jsonl", [{"resume": 0}, batch(0, 1, 0), batch(1, 2, 0)])
    assert any("consumed twice" in p for p in audit(tmp_path / "dup.jsonl", seq_len=4)["problems"])
    _ledger(tmp_path / "gap.jsonl", [{"resume": 0}, batch(0, 1, 0), batch(1, 2, 8)])
    assert any("gap before epoch 0 position 8" in p for p in audit(tmp_path / "gap.jsonl", seq_len=4)["problems"])
    # A new epoch after position 4 of a 12-token stream is right (a window of 5 at 8 would not fit)...
    wrap = [{"resume": 0}, batch(0, 1, 0), batch(1, 2, 4), {"batch": 2, "step": 3, "status": "trained",
                                                           "ids": ["d:1:0", "g:1:0"]}]
    _ledger(tmp_path / "wrap.jsonl", wrap)
    assert audit(tmp_path / "wrap.jsonl", seq_len=4, lengths={"d": 12, "g": 12})["problems"] == []
    # ... but in a 20-token stream the window at 8 was skipped over.
    bad = audit(tmp_path / "wrap.jsonl", seq_len=4, lengths={"d": 20, "g": 12})["problems"]
    assert bad == ["d: gap before epoch 1 position 0"]


def _run(token_dirs, workdir, *, resume=False, steps=10):
    from hone.tokens import load_tokens
    from hone.train.data import MixtureLoader, TokenStream
    from hone.train.loop import train

    cfg = TrainConfig(seq_len=16, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=3, log_every=100)
    streams = {n: TokenStream(load_tokens(d), cfg.seq_len) for n, d in token_dirs.items()}
    loader = MixtureLoader(streams, domain="biomedical", general="general", batch_size=4, ratio=0.5)
    torch.manual_seed(0)
    model = tiny_llama()
    train(model, loader, cfg, workdir, total_steps=steps, resume=resume, log=lambda m: None)
    return model


def test_nan_rolls_back_in_place_skips_the_batch_and_is_reproducible(token_dirs, tmp_path, monkeypatch):
    """A NaN at step 5: the running trainer reloads the step-3 checkpoint, skips the batch and
    trains on; bitwise the run that skipped that batch from the start."""
    wd = tmp_path / "nan"
    monkeypatch.setenv("HONE_FAULT", "nan:step=5")
    rolled = _run(token_dirs, wd, steps=7)  # the fault fires once: the replayed step 5 is clean
    assert load_skips(wd) == {4}
    metrics = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 8)) and all(math.isfinite(m["loss"]) for m in metrics)
    a = audit(wd / "samples.jsonl", seq_len=16)
    assert a["problems"] == [] and (a["trained"], a["skipped"], a["batches"], a["rolled_back"]) == (7, 1, 8, 1)
    events = [json.loads(l) for l in (wd / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events] == ["nonfinite", "decision", "recovered"]
    assert events[0]["skip_batches"] == [4] and events[0]["grad_norm"] == "nan"
    assert (events[1]["action"], events[1]["checkpoint_step"], events[1]["lost_steps"]) == ("rollback", 3, 1)
    assert events[2]["step"] == 4 and events[2]["restart_s"] == 0.0
    monkeypatch.delenv("HONE_FAULT")
    clean = tmp_path / "clean"
    (clean / "heal").mkdir(parents=True)
    (clean / "heal" / "skips.json").write_text((wd / "heal" / "skips.json").read_text())
    reference = _run(token_dirs, clean, steps=7)
    for (name, x), y in zip(reference.state_dict().items(), rolled.state_dict().values()):
        assert torch.equal(x, y), name


def test_nan_before_any_checkpoint_stops_then_resume_skips(token_dirs, tmp_path, monkeypatch):
    wd = tmp_path / "early"
    monkeypatch.setenv("HONE_FAULT", "nan:step=2")
    with pytest.raises(NonFiniteLoss,
                       match="non-finite loss at step 2 .*before any checkpoint: loader batches \\[1\\]"):
        _run(token_dirs, wd, steps=4)
    _run(token_dirs, wd, steps=4, resume=True)  # no checkpoint: from the start, without batch 1
    a = audit(wd / "samples.jsonl", seq_len=16)
    assert a["problems"] == [] and (a["trained"], a["skipped"], a["batches"]) == (4, 1, 5)


def test_supervisor_grows_back_after_the_repair_at_a_new_checkpoint(tmp_path):
    """Shrunk to 3 of 4 workers: once the lost device is repaired and a newer checkpoint is
    written, the supervisor prices staying vs restarting on 4 and grows when that pays."""
    import time

    from hone.heal.supervisor import Attempt, Supervisor

    base = {"data": {"inputs": ["x.jsonl"]}, "curate": {"domain": {"keywords": ["gene"]}},
            "train": {"seq_len": 8, "batch_size": 12, "max_tokens": 8 * 12 * 100}}
    recipe = parse_recipe(base, "r.toml")
    sup = Supervisor(recipe, tmp_path, nproc=4, max_steps=None, log=lambda m: None)
    sup.world, sup.restart_s = 3, [5.0]
    sup.step_s.update({4: [1.0], 3: [1.3]})
    sup.repair_at = [time.time() + 60]
    ckpt = tmp_path / "checkpoints" / "step_000020"
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_text("")
    (ckpt / "trainer_state.json").write_text("{}")
    a = Attempt(world=3, launched=time.time(), first_beat=time.time(), last_step=21, start_checkpoint=10)
    assert not sup._should_grow(a)  # the device is still being repaired
    sup.repair_at = [time.time() - 1]
    assert sup._should_grow(a)  # 79 steps x 0.3 s saved > 5 s restart + 1 step redone
    decision = json.loads((tmp_path / "events.jsonl").read_text().splitlines()[-1])
    assert (decision["failure"], decision["action"], decision["world"]) == ("repaired", "grow", 4)
    assert {o["action"] for o in decision["options"]} == {"stay", "grow"}
    assert not sup._should_grow(a)  # each checkpoint is priced once


def test_the_same_rank_failing_twice_is_escalated_to_a_lost_device(tmp_path):
    from hone.heal.supervisor import Attempt, Supervisor

    recipe = parse_recipe({"data": {"inputs": ["x.jsonl"]}, "curate": {"domain": {"keywords": ["gene"]}}}, "r.toml")
    sup = Supervisor(recipe, tmp_path, nproc=4, max_steps=None, log=lambda m: None)
    failed = [{"rank": 3, "exitcode": 1, "time": 1}, {"rank": 0, "exitcode": TERM, "time": 1}]
    first = sup._classify(Attempt(world=4, launched=0.0, failures=failed))
    assert (first.kind, first.rank) == ("transient", 3)  # retry in place first
    again = sup._classify(Attempt(world=4, launched=0.0, failures=failed))
    assert (again.kind, again.rank) == ("worker_lost", 3) and "second time" in again.detail
