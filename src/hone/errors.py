"""The one error type a user sees: a one-line message, no traceback (see cli.main)."""


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
