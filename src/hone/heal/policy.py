"""The healing policy: classify a failure, price every way out of it, pick the cheapest.

Pure functions of measured figures (step time per world size, restart overhead, checkpoint
write time, steps since the last checkpoint, repair time), testable without a process:

* **classify**: a worker that died by a signal (SIGKILL, SIGSEGV, SIGBUS: the OOM killer, a
  lost node, a device error) is ``worker_lost`` and its device is treated as down until
  repaired; a worker that exited with status 1 (a Python exception, often a peer's death
  seen through a collective) is ``transient``; status 2 is a ``fatal`` configuration error
  a retry would repeat; a non-finite loss and a hang are their own kinds.
* **price**: each option's cost is the expected wall time to finish the run from now:
  ``restart`` in place, ``shrink`` to the largest valid smaller world (global batch kept,
  so the data stays the same), ``wait`` for the repair, later ``grow`` back after it.
* **Young/Daly**: the checkpoint interval that minimizes expected lost time,
  ``tau = sqrt(2 * C * MTBF)``.
"""

from __future__ import annotations

import math
import signal
import statistics
from dataclasses import asdict, dataclass, field

# Signals the torchrun agent itself sends to the survivors when tearing a failed job down:
# they say nothing about the worker that got them.
TEARDOWN_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
EXIT_FATAL = 2      # HoneError in a worker: bad config or data, the same on every retry
EXIT_NONFINITE = 3  # a worker saw a NaN/inf loss or gradient (see hone.train.hooks)


@dataclass(frozen=True)
class Failure:
    kind: str                  # worker_lost | transient | nonfinite | hang | fatal
    rank: int | None = None
    detail: str = ""


def classify(failures: list[dict], *, hung: bool = False, nonfinite: dict | None = None) -> Failure:
    """The root cause among torchrun's per-rank failures ``[{rank, exitcode, signal, time}]``."""
    if hung:
        return Failure("hang", None, "no step progress within the hang timeout")
    if nonfinite is not None:
        return Failure("nonfinite", None, f"non-finite loss at step {nonfinite.get('step')}")
    by_time = sorted(failures, key=lambda f: (f.get("time") or 0, f.get("rank") or 0))
    killed = [f for f in by_time if (f.get("exitcode") or 0) < 0 and -f["exitcode"] not in TEARDOWN_SIGNALS]
    if killed:
        f = killed[0]
        return Failure("worker_lost", f.get("rank"), f"rank {f.get('rank')} killed by {_signame(-f['exitcode'])}")
    for code, kind in ((EXIT_NONFINITE, "nonfinite"), (EXIT_FATAL, "fatal")):
        hit = [f for f in by_time if f.get("exitcode") == code]
        if hit:
            return Failure(kind, hit[0].get("rank"), f"rank {hit[0].get('rank')} exited with status {code}")
    if by_time:
        # A rank that exited by itself is the cause; ranks the agent tore down come last.
        f = min(by_time, key=lambda f: (f.get("exitcode") or 0) < 0)
        return Failure("transient", f.get("rank"), f"rank {f.get('rank')} exited with status {f.get('exitcode')}")
    return Failure("transient", None, "torchrun failed without a per-rank report")


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def step_time_at(measured: dict[int, float], world: int, modeled: dict[int, float] | None = None) -> float:
    """Step time at ``world`` processes: measured if it ran there, else the nearest measured
    size's time times the planner's modeled ratio between the two sizes
    (:class:`hone.heal.replan.Replanner`); without a model for both sizes, scaled as data
    parallelism with a fixed global batch (time ~ 1 / world)."""
    if world in measured:
        return measured[world]
    ref = min(measured, key=lambda w: abs(w - world))
    if modeled and world in modeled and ref in modeled and modeled[ref] > 0:
        return measured[ref] * modeled[world] / modeled[ref]
    return measured[ref] * ref / world


@dataclass
class Situation:
    """What the supervisor knows when a failure has stopped the job."""
    world: int                       # processes the failed attempt ran on
    target_world: int                # processes asked for (--nproc)
    step: int                        # last completed step (any rank)
    checkpoint_step: int             # step of the newest good checkpoint (0: none)
    total_steps: int
    step_s: dict[int, float]         # measured median step time by world size
    restart_s: float                 # measured start-to-first-step overhead
    worlds: list[int] = field(default_factory=list)  # valid world sizes, largest first (Replanner)
    modeled: dict[int, float] = field(default_factory=dict)  # the planner's step time by world size
    down: int = 0                    # devices down (lost workers not yet repaired)
    repair_left_s: float = 0.0       # until the first of them is back


@dataclass
class Option:
    action: str                      # restart | shrink | wait | grow | stay | give_up
    world: int
    cost_s: float                    # expected wall time to finish from now
    why: str = ""


@dataclass
class Decision:
    chosen: Option
    options: list[Option] = field(default_factory=list)
    lost_steps: int = 0

    def to_json(self) -> dict:
        return {"action": self.chosen.action, "world": self.chosen.world, "cost_s": round(self.chosen.cost_s, 3),
                "why": self.chosen.why, "lost_steps": self.lost_steps,
                "options": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(o).items()}
                            for o in self.options]}


def decide(failure: Failure, s: Situation) -> Decision:
    """Price restart / shrink / wait for ``failure`` and choose the cheapest."""
    redo = s.total_steps - s.checkpoint_step          # steps left from the checkpoint we resume
    lost = max(0, s.step - s.checkpoint_step)
    if failure.kind == "fatal":
        return Decision(Option("give_up", 0, math.inf, failure.detail), [], lost)
    available = s.target_world - s.down
    options = []
    if available >= s.world or failure.kind != "worker_lost":
        world = min(s.world, available) if failure.kind == "worker_lost" else s.world
        options.append(Option("restart", world, s.restart_s + redo * step_time_at(s.step_s, world, s.modeled),
                              "transient: same processes, from the newest checkpoint"))
    smaller = [w for w in s.worlds if w <= available and w < s.world]
    if smaller and not any(o.action == "restart" for o in options):
        w = smaller[0]
        options.append(Option("shrink", w, s.restart_s + redo * step_time_at(s.step_s, w, s.modeled),
                              f"continue on {w} processes (valid shape, same global batch) until repaired"))
    if s.down:
        options.append(Option("wait", s.target_world, s.repair_left_s + s.restart_s
                              + redo * step_time_at(s.step_s, s.target_world, s.modeled),
                              f"wait {s.repair_left_s:.0f} s for the repair, then run on {s.target_world}"))
    if not options:
        return Decision(Option("give_up", 0, math.inf, "no valid world size is left"), [], lost)
    return Decision(min(options, key=lambda o: o.cost_s), options, lost)


def decide_grow(s: Situation, steps_since_checkpoint: int) -> Decision:
    """Running shrunk and the device is back: restart on the full world now (losing the steps
    since the checkpoint and one restart) or stay shrunk to the end."""
    left = s.total_steps - s.step
    stay = Option("stay", s.world, left * step_time_at(s.step_s, s.world, s.modeled),
                  "keep the smaller world to the end")
    grow = Option("grow", s.target_world, s.restart_s + (left + steps_since_checkpoint)
                  * step_time_at(s.step_s, s.target_world, s.modeled),
                  f"restart on {s.target_world} from the newest checkpoint")
    return Decision(min((stay, grow), key=lambda o: o.cost_s), [stay, grow], steps_since_checkpoint)


def hang_timeout_s(step_times: list[float], factor: float, floor_s: float) -> float:
    """No progress for this long is a hang: ``factor`` x the median step time, at least ``floor_s``."""
    return max(floor_s, factor * statistics.median(step_times)) if step_times else floor_s


def stragglers(busy: dict[int, float], factor: float, min_excess_s: float) -> list[dict]:
    """Ranks whose own work per step (median, excluding time spent waiting for the others)
    is more than ``factor`` x the median of the other ranks and at least ``min_excess_s`` longer."""
    out = []
    for r, b in sorted(busy.items()):
        others = [v for k, v in busy.items() if k != r]
        if not others:
            continue
        # The others' median: with two ranks the median over all would include the straggler.
        median = statistics.median(others)
        if b > factor * median and b - median >= min_excess_s:
            out.append({"rank": r, "busy_s": round(b, 4), "median_s": round(median, 4),
                        "ratio": round(b / max(median, 1e-9), 2)})
    return out
