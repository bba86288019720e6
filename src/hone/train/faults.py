"""Fault injection for tests and chaos drills, driven by ``HONE_FAULT``.

``HONE_FAULT="kill:step=7"`` SIGKILLs the process after optimizer step 7;
``"kill:ckpt=8"`` SIGKILLs it in the middle of writing the step-8 checkpoint (shards
written, not yet renamed); ``"kill:step=7:rank=1"`` only on rank 1. Several faults are
separated by ``;``. Nothing happens when the variable is unset.
"""

from __future__ import annotations

import os
import signal

from hone.errors import HoneError

_KINDS = {"kill"}
_WHERE = {"step", "ckpt"}


def parse(spec: str) -> list[dict]:
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, *fields = part.split(":")
        if kind not in _KINDS:
            raise HoneError(f"HONE_FAULT: unknown fault {kind!r} in {part!r} (want one of {sorted(_KINDS)})")
        fault = {"kind": kind, "rank": None}
        for f in fields:
            key, _, value = f.partition("=")
            if key not in _WHERE | {"rank"} or not value.isdigit():
                raise HoneError(f"HONE_FAULT: bad field {f!r} in {part!r} (want step=N, ckpt=N or rank=R)")
            fault[key] = int(value)
        if not _WHERE & fault.keys():
            raise HoneError(f"HONE_FAULT: {part!r} says neither step=N nor ckpt=N")
        faults.append(fault)
    return faults


def maybe_fail(where: str, step: int, rank: int) -> None:
    """Called by the trainer at ``where`` in {"step", "ckpt"}; kills this process if asked."""
    spec = os.environ.get("HONE_FAULT")
    if not spec:
        return
    for fault in parse(spec):
        if fault.get(where) == step and fault["rank"] in (None, rank):
            os.kill(os.getpid(), signal.SIGKILL)
