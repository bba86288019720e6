"""Preemption: a cluster's SIGTERM (or the ``#SBATCH --signal`` one, SIGUSR1) means "stop soon".

Slurm sends the signal and kills the job a grace period later. Every process of a run
notes the signal instead of dying; the training loop asks :func:`stop_requested` at the end
of each step, which all-reduces the flag so that every rank stops after the same step even
when the signal reached the ranks at different steps (or only some of them); the job then
writes a checkpoint and exits with :data:`EXIT_PREEMPTED`, which the generated Slurm script
answers with ``scontrol requeue`` (training resumes from the newest checkpoint by default).

Processes between the signal and the workers (``hone train --nproc``, the torchrun wrapper
in :mod:`hone.train.worker`, the supervisor) pass it on with :func:`forwarding` and exit with
the same status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from hone.errors import PREEMPT_SIGNALS, Preempted, fast_exit

EXIT_PREEMPTED = Preempted.exit_code
SIGNALS = PREEMPT_SIGNALS

_seen: list[tuple[int, float]] = []  # (signal, time) noted in this process


def _note(signum, frame) -> None:
    _seen.append((signum, time.time()))


def alive(pid: int) -> bool:
    """False once ``pid`` has exited (a zombie not yet reaped by torchrun counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def _handling(handler, signals=SIGNALS):
    """``handler`` for ``signals`` inside the block (the main thread only: Python runs
    handlers there), the previous handlers afterwards; what was noted is forgotten after the
    block (the job it was meant for has stopped; a later run in this process must not stop)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, previous in old.items():
            signal.signal(s, previous)
        _seen.clear()


@contextlib.contextmanager
def catching():
    """Note SIGTERM / SIGUSR1 while training instead of dying.

    A torchrun worker notes SIGUSR1 only: torchrun stops the surviving workers with SIGTERM
    after one failed, and that must kill at once (a Python handler does not even run while
    the worker waits in a collective for its dead peer); the processes above the workers pass
    any notice on as SIGUSR1 (:func:`forwarding`)."""
    signals = (signal.SIGUSR1,) if os.environ.get("LOCAL_WORLD_SIZE") else SIGNALS
    with _handling(_note, signals):
        yield


def quick_exit(status: int = EXIT_PREEMPTED) -> SystemExit:
    """The exit to raise once the preemption checkpoint is written (:func:`hone.errors.fast_exit`,
    further notices ignored: nor they nor torchrun stopping the other workers once one has left
    may turn the status into a kill)."""
    return fast_exit(status, ignore=SIGNALS)


def received() -> tuple[str, float] | None:
    """The first preemption signal this process noted: (name, time), or None."""
    return (signal.Signals(_seen[0][0]).name, _seen[0][1]) if _seen else None


def stop_requested(distributed: bool, device: torch.device) -> bool:
    """True on every rank when any rank has noted a preemption signal (a one-element
    MAX all-reduce at step end; no collective in a single process)."""
    flag = torch.tensor([1 if _seen else 0], dtype=torch.int32, device=device)
    if distributed:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def children(pid: int) -> set[int]:
    """Direct children of ``pid`` (torchrun's workers), from /proc on Linux."""
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def forwarding(targets: Callable[[], Iterable[int]]):
    """Pass SIGTERM / SIGUSR1 on, as SIGUSR1, to the processes ``targets()`` names at the time
    of the signal, and keep running: they stop after their step, checkpoint and exit with
    EXIT_PREEMPTED."""
    def forward(signum, frame) -> None:
        _note(signum, frame)
        for pid in targets():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

    return _handling(forward)
