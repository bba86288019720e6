"""Fault injection for tests and chaos drills, driven by ``HONE_FAULT`` (or `hone train --fault`).

``HONE_FAULT="kill:step=7"`` SIGKILLs the process after optimizer step 7;
``"kill:ckpt=8"`` SIGKILLs it in the middle of writing the step-8 checkpoint (shards
written, not yet renamed); ``"kill:step=7:rank=1"`` only on rank 1.
``"hang:step=7:rank=1"`` makes rank 1 sleep forever after step 7 (its peers then block in
the next collective); ``"nan:step=7"`` poisons step 7's loss with NaN before the backward
pass, so the gradients are NaN on every rank after the reduction.
``"slow:step=3:rank=1:ms=200"`` makes rank 1 a straggler: 200 ms more per step from step 3 on.
Several faults are separated by ``;``. Nothing happens when the variable is unset.

With a run directory's ``heal/`` folder given (the trainer always gives it) kill, hang and
nan fire once: a marker ``heal/fired/<fault>.rank<R>`` is written before the fault acts, so
the step that failed runs normally after the restart or roll-back.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from hone.errors import HoneError

_KINDS = {"kill", "hang", "nan", "slow"}
_WHERE = {"step", "ckpt"}
_FIELDS = _WHERE | {"rank", "ms"}


def parse(spec: str) -> list[dict]:
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, *fields = part.split(":")
        if kind not in _KINDS:
            raise HoneError(f"HONE_FAULT: unknown fault {kind!r} in {part!r} (want one of {sorted(_KINDS)})")
        fault = {"kind": kind, "rank": None, "id": re.sub(r"[^A-Za-z0-9]+", "_", part)}
        for f in fields:
            key, _, value = f.partition("=")
            if key not in _FIELDS or not value.isdigit():
                raise HoneError(f"HONE_FAULT: bad field {f!r} in {part!r} (want step=N, ckpt=N, rank=R or ms=M)")
            fault[key] = int(value)
        if not _WHERE & fault.keys():
            raise HoneError(f"HONE_FAULT: {part!r} says neither step=N nor ckpt=N")
        if kind != "kill" and "ckpt" in fault:
            raise HoneError(f"HONE_FAULT: {part!r}: only kill can fire at ckpt=N (use step=N)")
        if kind == "slow" and not fault.get("ms"):
            raise HoneError(f"HONE_FAULT: {part!r}: slow needs ms=M (milliseconds added per step)")
        faults.append(fault)
    return faults


def _matching(kind: str, where: str, step: int, rank: int) -> list[dict]:
    spec = os.environ.get("HONE_FAULT")
    if not spec:
        return []
    return [f for f in parse(spec) if f["kind"] == kind and f.get(where) == step and f["rank"] in (None, rank)]


def _claim(fault: dict, rank: int, heal_dir: Path | None) -> bool:
    """True if the fault should act now; records it so that it never acts again in this run."""
    if heal_dir is None:
        return True
    marker = Path(heal_dir) / "fired" / f"{fault['id']}.rank{rank}"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{time.time()}\n")
    return True


def maybe_fail(where: str, step: int, rank: int, heal_dir: Path | None = None) -> None:
    """Called by the trainer at ``where`` in {"step", "ckpt"}: kills or hangs this process if asked."""
    for fault in _matching("kill", where, step, rank):
        if _claim(fault, rank, heal_dir):
            os.kill(os.getpid(), signal.SIGKILL)
    for fault in _matching("hang", where, step, rank) if where == "step" else ():
        if _claim(fault, rank, heal_dir):
            while True:  # a hung collective or a stuck device: only a kill from outside ends it
                time.sleep(3600)


def poison_loss(step: int, rank: int, heal_dir: Path | None = None) -> bool:
    """True if this rank's loss at optimizer step ``step`` (1-based) should be made NaN."""
    return any(_claim(f, rank, heal_dir) for f in _matching("nan", "step", step, rank))


def slow_down(step: int, rank: int) -> float:
    """Seconds this rank should stall at ``step`` (a simulated straggler; every step from step=N on)."""
    spec = os.environ.get("HONE_FAULT")
    if not spec:
        return 0.0
    return sum(f["ms"] / 1000 for f in parse(spec)
               if f["kind"] == "slow" and step >= f["step"] and f["rank"] in (None, rank))
