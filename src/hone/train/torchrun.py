"""torchrun as Hone starts it: ``python -m hone.train.torchrun [TORCHRUN ARGS] -m hone.train.worker ...``.

Its own module so that the launcher imports torchrun and nothing of the trainer: it runs
once per node for the whole job, and importing the worker (model, loop, checkpoints) only
to start other processes cost 1.3 s per launch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from hone.errors import fast_exit
from hone.rundir import write_json
from hone.train.preempt import EXIT_PREEMPTED, children, forwarding, quick_exit


def run_torchrun(args: list[str]) -> int:
    """torchrun's own entry point, with worker failures reported in one line per rank.

    torchrun answers SIGTERM by terminating its workers and dies of SIGUSR1; here both go on to
    the workers instead, which finish their step, checkpoint and exit with EXIT_PREEMPTED,
    which becomes this process's status (torchrun keeps SIGINT, SIGHUP and SIGQUIT).
    """
    me = os.getpid()
    try:
        with forwarding(lambda: children(me)):
            run(get_args_parser().parse_args(["--signals-to-handle", "SIGINT,SIGHUP,SIGQUIT", *args]))
    except ChildFailedError as e:
        if all(f.exitcode == EXIT_PREEMPTED for f in e.failures.values()):
            return EXIT_PREEMPTED  # rank 0 said so in one line; the caller or the Slurm script acts on it
        if report := os.environ.get("HONE_FAILURE_REPORT"):  # for the supervisor (hone.heal)
            write_json(Path(report), [{"rank": rank, "exitcode": f.exitcode, "pid": f.pid, "time": f.timestamp}
                                      for rank, f in sorted(e.failures.items())])
        for rank, failure in sorted(e.failures.items()):
            how = (f"killed by {failure.signal_name()}" if failure.exitcode < 0
                   else f"exited with status {failure.exitcode}")
            print(f"worker rank {rank} (pid {failure.pid}) {how}", file=sys.stderr)
        worst = next(iter(e.failures.values())).exitcode
        return worst if worst > 0 else 128 - worst
    return 0


def main(argv: list[str] | None = None) -> None:
    status = run_torchrun(sys.argv[1:] if argv is None else argv)
    raise quick_exit(status) if status == EXIT_PREEMPTED else fast_exit(status)


if __name__ == "__main__":
    main()
