"""What a training worker does for the supervisor, in band and at (almost) no cost:

* a **heartbeat** per rank, ``heal/heartbeat/rankR.json`` rewritten after every step (step,
  step time, the rank's own work time and its wait at the end-of-step loss gather), only
  when the supervisor asks for it (``HONE_SUPERVISED``);
* the **sample ledger** ``samples.jsonl``: which windows (``stream:epoch:position``) each
  loader batch held and whether it was trained or skipped, plus a ``resume`` line at every
  (re)start, so accounting can prove each sample was consumed once (``hone.heal.accounting``);
* the **skip list** ``heal/skips.json``: loader batches never to train on (the window of a
  non-finite loss), read at every start so resumed runs stay reproducible;
* the **checkpoint schedule**, fixed or Young/Daly (``train.checkpoint_every = "auto"``);
* ``heal/model.json`` (rank 0): the model's shape and device, which the supervisor's
  re-planning (:mod:`hone.heal.replan`) hands to the planner.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable

from hone.errors import HoneError
from hone.plan.reliability import interval_steps, job_mtbf_s, young_daly_s
from hone.plan.shapes import ModelShape
from hone.rundir import HEAL_DIR, SAMPLES_FILE, append_event, append_jsonl, read_json, write_json

ENV_SUPERVISED = "HONE_SUPERVISED"   # "1": write heartbeats
ENV_JOB_MTBF = "HONE_JOB_MTBF_S"     # the supervisor's blended MTBF estimate for this job
ENV_MICRO_BATCH = "HONE_MICRO_BATCH"  # the supervisor's re-plan changed the micro-batch for this world size
MODEL_FILE = "model.json"            # under heal/: the model's shape and device, for the supervisor's re-plan


class NonFiniteLoss(HoneError):
    """A NaN/inf loss or gradient norm; the offending batches are already in the skip list."""

    exit_code = 3  # hone.heal.policy.EXIT_NONFINITE


def heal_dir(workdir: Path) -> Path:
    return Path(workdir) / HEAL_DIR


def load_skips(workdir: Path) -> set[int]:
    path = heal_dir(workdir) / "skips.json"
    return set(read_json(path)["batches"]) if path.exists() else set()


def record_skips(workdir: Path, batches: list[int], why: dict) -> None:
    """Add loader batches to the persistent skip list (rank 0; write-then-rename)."""
    path = heal_dir(workdir) / "skips.json"
    state = read_json(path) if path.exists() else {"batches": [], "why": []}
    state["batches"] = sorted(set(state["batches"]) | set(batches))
    state["why"].append({**why, "batches": batches})
    write_json(path, state)


def skip_window(bad_batch: int, first_batch: int, size: int) -> list[int]:
    """The batches to skip for a non-finite loss at ``bad_batch``: it and the ``size - 1``
    before it, but none the resumed checkpoint already trained on (before ``first_batch``)."""
    return list(range(max(first_batch, bad_batch - size + 1), bad_batch + 1))


def check_finite(loss: float, grad_norm: float) -> bool:
    return math.isfinite(loss) and math.isfinite(grad_norm)


def micro_batch(cfg, rows: int) -> int:
    """Sequences per forward pass: the supervisor's re-planned micro-batch, else the recipe's,
    else the rank's whole share of the global batch."""
    override = os.environ.get(ENV_MICRO_BATCH)
    return int(override) if override else (cfg.micro_batch or rows)


def write_model_info(heal_dir: Path, shape: ModelShape, device) -> None:
    """Rank 0 of a supervised run: the planner's shape of the model (its fields, read back by
    :func:`hone.plan.shapes.shape_from_dict`) and the device it runs on."""
    import torch

    info = {**dataclasses.asdict(shape), "device": device.type}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    write_json(heal_dir / MODEL_FILE, info)


def read_model_info(heal_dir: Path) -> dict | None:
    path = heal_dir / MODEL_FILE
    return read_json(path) if path.exists() else None


class Heartbeat:
    def __init__(self, workdir: Path, rank: int):
        self.enabled = os.environ.get(ENV_SUPERVISED) == "1"
        self.path = heal_dir(workdir) / "heartbeat" / f"rank{rank}.json"
        self.rank = rank
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def beat(self, step: int, **figures) -> None:
        if not self.enabled:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rank": self.rank, "pid": os.getpid(), "step": step, "time": time.time(),
                                   **{k: round(v, 5) if isinstance(v, float) else v for k, v in figures.items()}}))
        os.replace(tmp, self.path)  # the supervisor never reads half a heartbeat


class SampleLedger:
    """``samples.jsonl``, written by rank 0 only (every rank sees the same global batch)."""

    def __init__(self, workdir: Path, enabled: bool):
        self.path = Path(workdir) / SAMPLES_FILE
        self.enabled = enabled

    def start(self, batch: int, step: int, *, fresh: bool) -> None:
        if not self.enabled:
            return
        if fresh and self.path.exists():
            self.path.unlink()
        # Everything logged from this batch on before now was rolled back with the weights.
        append_jsonl(self.path, {"resume": batch, "step": step, "time": round(time.time(), 3)})

    def record(self, batch: int, step: int | None, ids: list[str], status: str) -> None:
        if self.enabled:
            append_jsonl(self.path, {"batch": batch, "step": step, "status": status, "ids": ids})


class CheckpointSchedule:
    """When to checkpoint: every ``train.checkpoint_every`` steps, or with ``"auto"`` every
    Young/Daly interval ``sqrt(2 C MTBF)`` in steps, from the measured checkpoint write time
    C (estimated from the state size until the first is written) and the job's MTBF.

    Rank 0 computes the interval and broadcasts it: each rank measures its own times, and
    ranks that disagreed on whether to checkpoint would deadlock in the checkpoint's collectives.
    """

    PROBE_STEPS = 3  # step times measured before the first auto decision

    def __init__(self, cfg, *, total_steps: int, start: int, world: int, n_params: int, broadcast: Callable,
                 say: Callable[[str], None], workdir: Path | None):
        self.auto = cfg.checkpoint_every == "auto"
        self.fixed = 0 if self.auto else int(cfg.checkpoint_every)
        env = os.environ.get(ENV_JOB_MTBF)
        self.mtbf_s = float(env) if env else job_mtbf_s(cfg.worker_mtbf_hours, world)
        # Weights + two Adam moments in fp32 at ~1 GB/s: a guess that only orders the first checkpoint.
        self.estimate_s = 0.05 + 12 * n_params / 1e9
        self.total, self.last, self.every = total_steps, start, None
        self.broadcast, self.say, self.workdir = broadcast, say, workdir
        self.write_s: list[float] = []
        self.step_s: list[float] = []

    def due(self, done: int, stop: int, step_s: float) -> bool:
        if done >= stop:
            return False  # the end-of-run checkpoint is written anyway
        if not self.auto:
            return bool(self.fixed) and done % self.fixed == 0
        self.step_s.append(step_s)
        if self.every is None and len(self.step_s) >= min(self.PROBE_STEPS, stop - self.last):
            self._decide()
        return self.every is not None and done - self.last >= self.every

    def saved(self, done: int, seconds: float) -> None:
        self.last = done
        if self.auto:
            self.write_s.append(seconds)
            self._decide()

    def _decide(self) -> None:
        measured = bool(self.write_s)
        c = statistics.median(self.write_s) if measured else self.estimate_s
        step_s = statistics.median(self.step_s[-20:])
        every = self.broadcast(interval_steps(c, self.mtbf_s, step_s, self.total))
        if every != self.every:
            tau = young_daly_s(c, self.mtbf_s)
            self.say(f"checkpoint interval (Young/Daly, tau = sqrt(2 C MTBF) = {tau:.1f} s): every {every} steps "
                     f"(C = {c:.3f} s {'measured' if measured else 'estimated'}, job MTBF {self.mtbf_s / 3600:.3g} h, "
                     f"step {step_s:.3f} s)")
            if self.workdir is not None:
                append_event(self.workdir, "checkpoint_interval", every_steps=every, tau_s=round(tau, 3),
                             checkpoint_s=round(c, 4), checkpoint_measured=measured,
                             job_mtbf_h=round(self.mtbf_s / 3600, 4), step_s=round(step_s, 4))
        self.every = every
