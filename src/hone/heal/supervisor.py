"""`hone train RECIPE --supervise`: run the workers under torchrun, notice failures in band,
choose the cheapest recovery and resume from the newest checkpoint, until the run is done.

    hone train recipes/tiny-cpu.toml --supervise --nproc 4 --fault "kill:step=30:rank=2"

What it watches, at no cost to the workers beyond one small file per rank and step:

* torchrun's exit status and, per failed rank, exit code or signal (``heal/failures.json``);
* ``heal/heartbeat/rankR.json``: no step within the hang timeout (``heal.hang_factor`` x the
  median step time, at least ``heal.hang_min_s``; ``heal.startup_s`` before the first step)
  is a hang; a rank whose own work per step is far above the others' is a straggler;
* status 3: a worker saw a NaN/inf loss, put the batch window in ``heal/skips.json`` and stopped;
* status 75: the job was preempted (SIGTERM / SIGUSR1, passed on to the workers): they wrote a
  checkpoint and the supervisor stops with the same status, to be run again (or requeued) later.

Then :mod:`hone.heal.policy` classifies the failure and prices restart in place, shrink to a
smaller valid world (same global batch, DCP resharded resume) and wait for the repair; the
choice and every option's cost go to ``events.jsonl``. A lost device is simulated as down
for ``heal.repair_s`` seconds; once it is back and a new checkpoint is written, the job grows
back to the full world when that pays off over the remaining steps.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hone.errors import HoneError, Preempted
from hone.heal.policy import Failure, Situation, classify, decide, decide_grow, hang_timeout_s, stragglers
from hone.heal.replan import Replanner
from hone.plan.reliability import job_mtbf_s
from hone.rundir import append_event, read_events
from hone.train.checkpoint import checkpoint_step, latest_checkpoint
from hone.train.hooks import ENV_JOB_MTBF, ENV_MICRO_BATCH, ENV_SUPERVISED, MODEL_FILE, heal_dir, read_model_info
from hone.train.preempt import alive, children, forwarding
from hone.train.run import shown, torchrun_argv, total_steps

POLL_S = 0.1
KILL_GRACE_S = 10.0


@dataclass
class Attempt:
    """What one torchrun launch did, as the supervisor saw it."""
    world: int
    launched: float
    outcome: str = ""                      # finished | failed | hang | grow
    first_beat: float | None = None        # time of the first completed step
    detected_at: float | None = None       # when a hang was declared
    stopping: bool = False                 # the workers said they are exiting (non-finite loss)
    first_death: float | None = None       # when the first worker process was seen gone
    last_progress: float = 0.0
    last_step: int = 0
    start_checkpoint: int = 0
    failures: list[dict] = field(default_factory=list)
    returncode: int | None = None


class Supervisor:
    def __init__(self, recipe, workdir: Path, nproc: int, max_steps: int | None, log: Callable[[str], None] = print):
        self.recipe, self.heal, self.t = recipe, recipe.heal, recipe.train
        self.workdir, self.log = Path(workdir), log
        self.max_steps = max_steps
        self.total = min(total_steps(self.t), max_steps) if max_steps else total_steps(self.t)
        self.target = self.world = nproc
        self.step_s: dict[int, list[float]] = defaultdict(list)   # measured step times by world size
        self.restart_s: list[float] = []                           # launch to first completed step
        self.repair_at: list[float] = []                           # when each lost device is back
        self.worker_s = 0.0                                        # worker-seconds run (observed MTBF)
        self.hw_failures = 0
        self.pending: dict | None = None                           # the failure awaiting its recovery
        self.reported: set[int] = set()
        self.transient: dict[tuple[int, int], int] = defaultdict(int)  # (world, rank) -> failures
        self.dir = heal_dir(self.workdir)
        self._replanner: Replanner | None = None

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / MODEL_FILE).unlink(missing_ok=True)  # the workers write it again at every launch
        self.replanner()  # a bad heal.hardware stops here, before any worker starts
        append_event(self.workdir, "supervise", world=self.world, total_steps=self.total,
                     fault=os.environ.get("HONE_FAULT") or None, heal=self.heal.model_dump())
        self.say(f"supervising {self.world} workers for {self.total} steps (events: {self.workdir / 'events.jsonl'})")
        recoveries, t_start = 0, time.time()
        while True:
            attempt = self._attempt()
            if attempt.outcome == "finished":
                append_event(self.workdir, "finished", world=self.world, steps=self.total, recoveries=recoveries,
                             wall_s=round(time.time() - t_start, 3),
                             launch_to_first_step_s=[round(x, 3) for x in self.restart_s])
                self.say(f"finished {self.total} steps on {self.world} workers after {recoveries} recoveries")
                return {"recoveries": recoveries, "world": self.world}
            if attempt.outcome == "grow":
                self.world = self.target
                continue
            if attempt.outcome == "preempted":  # not a failure: the workers checkpointed and left on request
                raise Preempted(f"the {self.world} workers stopped after step {attempt.last_step} with a checkpoint; "
                                f"`hone train RECIPE --workdir {self.workdir} --supervise` resumes from it")
            recoveries += 1
            failure = self._classify(attempt)
            if recoveries > self.heal.max_restarts:
                append_event(self.workdir, "give_up", reason=f"more than heal.max_restarts = {self.heal.max_restarts}")
                raise HoneError(f"gave up after {self.heal.max_restarts} recoveries (heal.max_restarts); "
                                f"see {self.workdir / 'events.jsonl'}")
            self._recover(failure, attempt)

    def _attempt(self) -> Attempt:
        for stale in (self.dir / "heartbeat").glob("rank*.json"):
            stale.unlink()
        report = self.dir / "failures.json"
        report.unlink(missing_ok=True)
        newest = latest_checkpoint(self.workdir / "checkpoints", lambda m: None)
        argv = torchrun_argv(self.workdir, self.world, self.max_steps)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1",
               ENV_SUPERVISED: "1", "HONE_FAILURE_REPORT": str(report), ENV_JOB_MTBF: str(self._mtbf_s())}
        env.pop(ENV_MICRO_BATCH, None)
        # The recipe's own world runs the recipe as written; a re-planned one may change the micro-batch.
        micro = self.replanner().micro_batch_override(self.world) if self.world != self.target else None
        if micro is not None:
            env[ENV_MICRO_BATCH] = str(micro)
        self.say(f"launch on {self.world} workers: {shown(argv)}"
                 + (f" (micro-batch {micro}, re-planned)" if micro is not None else ""))
        now = time.time()
        a = Attempt(self.world, now, last_progress=now, start_checkpoint=checkpoint_step(newest))
        proc = subprocess.Popen(argv, env=env, start_new_session=True)
        try:
            with forwarding(lambda: [proc.pid]):  # a preemption signal goes on to torchrun and its workers
                self._watch(proc, a)
        finally:
            if proc.poll() is None:
                self._stop(proc)
        self.worker_s += (time.time() - a.launched) * a.world
        a.returncode = proc.returncode
        if a.outcome == "" and proc.returncode == 0:
            a.outcome = "finished"
        elif a.outcome == "" and proc.returncode == Preempted.exit_code:
            a.outcome = "preempted"
        elif a.outcome == "":
            a.outcome = "failed"
            a.failures = json.loads(report.read_text()) if report.exists() else []
        return a

    def _watch(self, proc: subprocess.Popen, a: Attempt) -> None:
        history: dict[int, deque] = defaultdict(lambda: deque(maxlen=5))
        seen_step: dict[int, tuple] = {}
        pids: set[int] = set()
        while proc.poll() is None:
            now = time.time()
            beats = self._beats()
            for beat in beats:
                r = beat["rank"]
                pids.add(beat["pid"])
                if beat.get("state") == "stopping":  # a worker is leaving on purpose (NaN): not a hang
                    a.stopping = True
                    continue
                if (beat["step"], beat.get("state")) == seen_step.get(r):
                    continue
                # Any new step is progress, also a lower one after a roll-back in place.
                seen_step[r] = (beat["step"], beat.get("state"))
                a.last_progress = max(a.last_progress, beat["time"])
                if "step_s" in beat:
                    history[r].append(beat.get("busy_s", 0.0))
                    if r == 0:
                        self.step_s[a.world].append(beat["step_s"])
                    if a.first_beat is None:
                        self._first_step(a, beat)
            if beats:
                a.last_step = max(b["step"] for b in beats)
            self._check_stragglers(history, a)
            if a.first_death is None and any(not alive(pid) for pid in pids):
                a.first_death = now  # torchrun reports it only after tearing the others down
            timeout = self._timeout(a)
            if now - a.last_progress > timeout:
                a.outcome = "hang"
                self._hang(proc, a, now, timeout, pids)
                return
            if self._should_grow(a):
                a.outcome = "grow"
                self._stop(proc, pids)
                return
            time.sleep(POLL_S)

    # -- detection --------------------------------------------------------------------------------
    def _beats(self) -> list[dict]:
        beats = []
        for path in (self.dir / "heartbeat").glob("rank*.json"):
            try:
                beats.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue  # replaced while we read it: the next poll sees the new one
        return beats

    def _timeout(self, a: Attempt) -> float:
        if a.first_beat is None or a.last_step >= self.total or a.stopping:
            return self.heal.startup_s  # loading before the first step, final checkpoint and exit after the last
        recent = self.step_s.get(a.world, [])[-50:]
        return hang_timeout_s(recent, self.heal.hang_factor, self.heal.hang_min_s)

    def _first_step(self, a: Attempt, beat: dict) -> None:
        a.first_beat = beat["time"]
        self.restart_s.append(beat["time"] - a.launched)
        if self.pending is not None:
            p, self.pending = self.pending, None
            rec = beat["time"] - p["failed_at"]
            append_event(self.workdir, "recovered", failure=p["kind"], step=beat["step"], world=a.world,
                         recovery_s=round(rec, 3), detect_s=round(p["detected_at"] - p["failed_at"], 3),
                         restart_s=round(beat["time"] - a.launched, 3), lost_steps=p["lost_steps"])
            self.say(f"recovered from {p['kind']}: step {beat['step']} done {rec:.1f} s after the failure "
                     f"(on {a.world} workers)")

    def _check_stragglers(self, history: dict[int, deque], a: Attempt) -> None:
        if len(history) < 2 or any(len(h) < 3 for h in history.values()):
            return
        busy = {r: statistics.median(h) for r, h in history.items()}
        for s in stragglers(busy, self.heal.straggler_factor, self.heal.straggler_min_s):
            if s["rank"] in self.reported:
                continue
            self.reported.add(s["rank"])
            append_event(self.workdir, "straggler", world=a.world, step=a.last_step, **s)
            self.say(f"straggler: rank {s['rank']} works {s['busy_s']:.3f} s per step, {s['ratio']:.1f}x the "
                     f"other ranks' median {s['median_s']:.3f} s (the others wait for it)")

    def _hang(self, proc, a: Attempt, now: float, timeout: float, pids: set[int]) -> None:
        append_event(self.workdir, "failure", failure="hang", world=a.world, step=a.last_step,
                     detail=f"no step for {now - a.last_progress:.1f} s (timeout {timeout:.1f} s)",
                     failed_at=round(a.last_progress, 3))
        self.say(f"hang: no step for {now - a.last_progress:.1f} s (timeout {timeout:.1f} s); stopping the workers")
        self._stop(proc, pids)
        a.failures = []
        a.detected_at = now

    def _stop(self, proc: subprocess.Popen, pids: set[int] = frozenset()) -> None:
        """Kill the workers (hung ones ignore everything else), then torchrun."""
        for pid in set(pids) | children(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    # -- decisions --------------------------------------------------------------------------------
    def _classify(self, a: Attempt) -> Failure:
        if a.outcome == "hang":
            return classify([], hung=True)
        f = classify(a.failures)
        if f.kind == "transient" and f.rank is not None:
            # Tiered response: a retry in place first; the same rank failing again is a bad device.
            self.transient[(a.world, f.rank)] += 1
            if self.transient[(a.world, f.rank)] >= 2:
                return Failure("worker_lost", f.rank, f"{f.detail}, the second time: treated as a bad device")
        return f

    def _situation(self, a: Attempt) -> Situation:
        now = time.time()
        down = [t for t in self.repair_at if t > now]
        measured = {w: statistics.median(v[-50:]) for w, v in self.step_s.items() if v}
        worlds = self.replanner().valid_worlds(self.target)
        return Situation(world=a.world, target_world=self.target, step=a.last_step,
                         checkpoint_step=checkpoint_step(latest_checkpoint(self.workdir / "checkpoints",
                                                                           lambda m: None)),
                         total_steps=self.total, step_s=measured or {a.world: 1.0},
                         restart_s=statistics.median(self.restart_s) if self.restart_s else 10.0,
                         worlds=worlds, modeled=self.replanner().modeled(worlds), down=len(down),
                         repair_left_s=max(down) - now if down else 0.0)

    def _recover(self, failure: Failure, a: Attempt) -> None:
        now = time.time()
        detected_at = a.detected_at or now
        failed_at = a.last_progress if failure.kind == "hang" else (a.first_death or now)
        if failure.kind == "nonfinite":  # the worker noticed it first, and said when
            seen = [e for e in read_events(self.workdir) if e["kind"] == "nonfinite" and e["time"] >= a.launched]
            failed_at = seen[-1]["time"] if seen else now
        if failure.kind == "worker_lost":
            self.repair_at.append(now + self.heal.repair_s)  # simulated: the device is back after the repair
        if failure.kind in ("worker_lost", "transient", "hang"):
            self.hw_failures += 1
        if failure.kind != "hang":
            append_event(self.workdir, "failure", failure=failure.kind, rank=failure.rank, detail=failure.detail,
                         world=a.world, step=a.last_step, exit_status=a.returncode, ranks=a.failures)
        s = self._situation(a)
        decision = decide(failure, s)
        w = decision.chosen.world
        plan = self.replanner().plan(w) if w else None  # the workers build the same: plan_from_recipe
        append_event(self.workdir, "decision", failure=failure.kind, step=a.last_step,
                     checkpoint_step=s.checkpoint_step, step_s=_rounded(s.step_s, 4),
                     restart_s=round(s.restart_s, 3), plan=plan, modeled_step_s=_rounded(s.modeled, 6),
                     **decision.to_json())
        costs = ", ".join(f"{o.action} on {o.world}: {o.cost_s:.1f} s" for o in decision.options)
        self.say(f"{failure.kind} ({failure.detail}) at step {a.last_step}; newest checkpoint step "
                 f"{s.checkpoint_step}; expected time to finish: {costs} -> {decision.chosen.action}")
        if decision.chosen.action == "give_up":
            raise HoneError(f"training failed ({failure.detail}): a retry would fail the same way; "
                            f"see the worker's error above and {self.workdir / 'events.jsonl'}")
        if decision.chosen.action == "wait":
            wait = max(0.0, max(self.repair_at) - time.time())
            self.say(f"waiting {wait:.0f} s for the repair")
            time.sleep(wait)
        self.world = decision.chosen.world
        self.pending = {"kind": failure.kind, "failed_at": failed_at, "detected_at": detected_at,
                        "lost_steps": decision.lost_steps}

    def _should_grow(self, a: Attempt) -> bool:
        """Back to the full world once the repair is done and a new checkpoint bounds the loss."""
        if a.world >= self.target or any(t > time.time() for t in self.repair_at) or a.first_beat is None:
            return False
        ckpt = checkpoint_step(latest_checkpoint(self.workdir / "checkpoints", lambda m: None))
        if ckpt <= a.start_checkpoint or ckpt >= self.total:
            return False
        s = self._situation(a)
        decision = decide_grow(s, max(0, a.last_step - ckpt))
        a.start_checkpoint = ckpt  # price each new checkpoint once
        if decision.chosen.action != "grow":
            return False
        append_event(self.workdir, "decision", failure="repaired", step=a.last_step, checkpoint_step=ckpt,
                     step_s=_rounded(s.step_s, 4), restart_s=round(s.restart_s, 3),
                     plan=self.replanner().plan(self.target), modeled_step_s=_rounded(s.modeled, 6),
                     **decision.to_json())
        self.say(f"device repaired: growing from {a.world} to {self.target} workers at the step-{ckpt} checkpoint "
                 f"({', '.join(f'{o.action} {o.cost_s:.1f} s' for o in decision.options)})")
        return True

    def replanner(self) -> Replanner:
        """The planner's view of this job, built once the workers have said what model they run."""
        info = read_model_info(self.dir)
        if self._replanner is None or (info is not None and self._replanner.info is None):
            self._replanner = Replanner(self.t, self.heal.hardware, info, self.target)
        return self._replanner

    def _mtbf_s(self) -> float:
        return job_mtbf_s(self.t.worker_mtbf_hours, self.world, self.worker_s, self.hw_failures)

    def say(self, msg: str) -> None:
        self.log(f"heal: {msg}")


def _rounded(by_world: dict[int, float], digits: int) -> dict[str, float]:
    """Step times by world size as events.jsonl keeps them (JSON keys are strings)."""
    return {str(k): round(v, digits) for k, v in by_world.items()}


def supervise(recipe, workdir: Path, nproc: int, max_steps: int | None, log: Callable[[str], None] = print) -> dict:
    return Supervisor(recipe, workdir, nproc, max_steps, log).run()
