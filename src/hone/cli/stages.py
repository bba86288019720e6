"""`hone demo | run | train | tokenize | report`: the stages of a recipe, from the data to the report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from hone.cli.common import WORKDIR, load_recipe_and_workdir as _load, log as _log
from hone.errors import HoneError
from hone.pipeline import check_demo_targets, prepare, run_recipe
from hone.plan.commands import multinode_commands
from hone.recipe import load_recipe, shipped_recipe
from hone.report import write_report
from hone.rundir import LAUNCH_DIR, ensure_dir, write_text
from hone.train.dry_run import dry_run as train_dry_run
from hone.train.faults import parse as parse_faults
from hone.train.run import plan_from_recipe


def demo(workdir: Path = typer.Option(Path("runs/demo"), "--workdir", help="Run directory."),
         fresh: bool = typer.Option(False, "--fresh", help="Start over instead of resuming."),
         max_steps: Optional[int] = typer.Option(None, "--max-steps",
                                                 help="Stop training after N steps (resume later).")):
    """Specialize SmolLM2-135M to biomedical text on this CPU: every stage, embedded default."""
    recipe = load_recipe(shipped_recipe("demo-biomed"))
    table = run_recipe(recipe, workdir, fresh=fresh, max_steps=max_steps, log=_log)
    if table:
        check_demo_targets(table, _log)


def run(recipe: Path = typer.Argument(..., help="Recipe TOML file."), workdir: Optional[Path] = WORKDIR,
        fresh: bool = typer.Option(False, "--fresh", help="Start over instead of resuming."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps",
                                                help="Stop training after N steps (resume later).")):
    """Run every stage of a recipe: pool, curate, tokenize, eval, train, eval, save, report.

    Each stage is skipped when done; training resumes from the newest checkpoint. --fresh removes
    the run directory and starts over."""
    r, wd = _load(recipe, workdir)
    run_recipe(r, wd, fresh=fresh, max_steps=max_steps, log=_log)


def train(recipe: Path = typer.Argument(..., help="Recipe TOML file."), workdir: Optional[Path] = WORKDIR,
          max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N steps."),
          fresh: bool = typer.Option(False, "--fresh",
                                     help="Discard the earlier training (checkpoints, final/, eval) and start over; "
                                          "the data stages are kept."),
          resume: bool = typer.Option(False, "--resume", help="Accepted for compatibility: resuming is the default."),
          nproc: int = typer.Option(1, "--nproc", min=1,
                                    help="Processes on this machine (torchrun; GPUs or CPU/gloo)."),
          nnodes: int = typer.Option(1, "--nnodes", min=1,
                                     help="Nodes: > 1 prints the torchrun line and writes a Slurm script (it "
                                          "requeues itself when preempted; with --supervise also when it fails)."),
          supervise: bool = typer.Option(False, "--supervise",
                                         help="Self-healing: detect crashes, hangs, NaN losses and stragglers, recover "
                                              "by the cheapest plan (events.jsonl)."),
          fault: Optional[str] = typer.Option(None, "--fault",
                                              help="Inject faults (as HONE_FAULT): kill|hang|nan:step=N[:rank=R], "
                                                   "kill:ckpt=N, slow:step=N:rank=R:ms=M; ';' between several."),
          dry_run: bool = typer.Option(False, "--dry-run",
                                       help="Build the sharded model on the meta device for --nproc x --nnodes "
                                            "processes (none started, no weights or data read) and print each rank's "
                                            "parameter, gradient and optimizer bytes beside the planner's.")):
    """Train as the recipe says (runs the data stages first if their artifacts are missing).

    Training continues from the newest good checkpoint (on any number of processes) and a finished
    run is left as it is; --fresh starts training over (the data stages are kept). A recipe whose
    training fields changed refuses while checkpoints or a finished model are there.
    """
    if fresh and resume:
        raise HoneError("--fresh starts training over and --resume continues it: give one of them")
    r, wd = _load(recipe, workdir)

    plan_from_recipe(r.train, nproc * nnodes)  # a bad tp fails now, before any data stage runs
    if dry_run:
        train_dry_run(r, nproc * nnodes, _log)
        return
    if fault is not None:
        parse_faults(fault)  # a bad spec is a one-line error now, not in every worker
        os.environ["HONE_FAULT"] = fault
    if nnodes > 1:
        restarts = r.heal.max_restarts if supervise else 0
        cmds = multinode_commands(str(recipe), str(wd), nnodes, nproc, requeue_failures=restarts)
        script = ensure_dir(wd / LAUNCH_DIR) / "slurm.sbatch"
        write_text(script, cmds["slurm"])
        _log(f"prepare the data once: hone tokenize {recipe} --workdir {wd}")
        _log(f"then on every node: {cmds['torchrun']}")
        _log(f"or submit: sbatch {script}")
        if supervise:
            _log(f"--supervise on {nnodes} nodes: the Slurm script requeues a failed job (up to heal.max_restarts = "
                 f"{restarts} times, not for a recipe or data error) and it resumes from the newest checkpoint; "
                 f"hang and straggler detection and shrinking to fewer processes need one machine "
                 f"(--nproc without --nnodes)")
        return
    run_recipe(r, wd, max_steps=max_steps, log=_log, nproc=nproc, fresh_training=fresh, supervise=supervise)


def tokenize(recipe: Path = typer.Argument(..., help="Recipe TOML file."), workdir: Optional[Path] = WORKDIR):
    """Tokenize the curated corpus with the base model's tokenizer into token shards."""
    r, wd = _load(recipe, workdir)
    prepare(r, wd, _log)


def report(rundir: Path = typer.Argument(..., help="Run directory.")):
    """Write RUNDIR/report.html (self-contained, plots embedded) from the run's artifacts."""
    _log(f"report: {write_report(rundir)}")
