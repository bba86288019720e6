"""The one error type a user sees: a one-line message, no traceback (see cli.main); and how a
process of Hone's ends once its work is done."""

import gc
import signal
import threading


class HoneError(Exception):
    """A mistake that stops the job: bad recipe field, missing file, missing data package.

    The message is one line and names the file, field or line at fault; the CLI prints it
    as ``error: <message>`` and exits with status 2.
    """

    exit_code = 2


class Preempted(HoneError):
    """Not a mistake: the cluster asked the job to stop (SIGTERM / SIGUSR1, see hone.train.preempt);
    it stopped after a step with a checkpoint and running it again resumes. The CLI, the torchrun
    wrapper and the workers exit with ``exit_code``, on which the generated Slurm script requeues."""

    exit_code = 75  # sysexits' EX_TEMPFAIL, "try again later": no Python, torchrun or shell failure uses it


PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what a cluster sends before it kills a job


def fast_exit(status: int = 0, *, ignore: tuple[signal.Signals, ...] = ()) -> SystemExit:
    """The exit to raise when a process's work is done and its files are closed.

    The interpreter's final garbage collection walks every object torch and transformers
    created: 1.3 s for a process that imported the training worker, 1.8 s for the CLI (idle
    2-core machine; 8 s for a training process on a loaded one, inside a preemption's grace
    period). Freezing what is alive skips that walk; the standard streams are still flushed at
    exit. Signals in ``ignore`` are ignored from now on: a further preemption notice must not
    turn the status into a kill.
    """
    if threading.current_thread() is threading.main_thread():
        for s in ignore:
            signal.signal(s, signal.SIG_IGN)
    gc.freeze()
    return SystemExit(status)
