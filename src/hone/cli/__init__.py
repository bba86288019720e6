"""`hone`: one subcommand per stage, thin wrappers over the stage packages.

    hone demo                                  # the embedded biomedical default, CPU
    hone run recipes/tiny-cpu.toml             # any recipe, every stage
    hone eval runs/demo/final --data bio=heldout.jsonl --base runs/demo/base
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from hone.cli.cluster import cluster_app
from hone.cli.common import WORKDIR, load_recipe_and_workdir as _load, log as _log
from hone.cli.data import data_app
from hone.cli.eval import eval_cmd as _eval
from hone.cli.experts import branch as _branch, merge as _merge
from hone.cli.generate import generate as _generate
from hone.cli.mix import mix_app
from hone.cli.plan import plan_app
from hone.corpus.sources import fetch_debian_data
from hone.errors import HoneError
from hone.pipeline import check_demo_targets, check_recipe, prepare, run_recipe
from hone.plan.commands import multinode_commands
from hone.recipe import describe_fields, load_recipe, shipped_recipe
from hone.report import write_report
from hone.rundir import LAUNCH_DIR, ensure_dir, write_text
from hone.train.dry_run import dry_run as train_dry_run
from hone.train.faults import parse as parse_faults
from hone.train.preempt import Preempted, quick_exit
from hone.train.run import plan_from_recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="Turn a general LLM and a general corpus into a domain specialist.")
recipe_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Check recipe files and list their fields.")
app.add_typer(recipe_app, name="recipe")
app.add_typer(data_app, name="data")
app.add_typer(plan_app, name="plan")
app.add_typer(mix_app, name="mix")
app.add_typer(cluster_app, name="cluster")
# Domain experts (Branch-Train-Merge).
app.command("branch")(_branch)
app.command("merge")(_merge)
app.command("eval")(_eval)
app.command("generate")(_generate)


@app.command()
def demo(workdir: Path = typer.Option(Path("runs/demo"), "--workdir", help="Run directory."),
         fresh: bool = typer.Option(False, "--fresh", help="Start over instead of resuming."),
         max_steps: Optional[int] = typer.Option(None, "--max-steps",
                                                 help="Stop training after N steps (resume later).")):
    """Specialize SmolLM2-135M to biomedical text on this CPU: every stage, embedded default."""
    recipe = load_recipe(shipped_recipe("demo-biomed"))
    table = run_recipe(recipe, workdir, fresh=fresh, max_steps=max_steps, log=_log)
    if table:
        check_demo_targets(table, _log)


@app.command()
def run(recipe: Path = typer.Argument(..., help="Recipe TOML file."), workdir: Optional[Path] = WORKDIR,
        fresh: bool = typer.Option(False, "--fresh", help="Start over instead of resuming."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps",
                                                help="Stop training after N steps (resume later).")):
    """Run every stage of a recipe: pool, curate, tokenize, eval, train, eval, save, report.

    Each stage is skipped when done; training resumes from the newest checkpoint. --fresh removes
    the run directory and starts over."""
    r, wd = _load(recipe, workdir)
    run_recipe(r, wd, fresh=fresh, max_steps=max_steps, log=_log)


@app.command()
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


@app.command("fetch-data")
def fetch_data(dest: Optional[Path] = typer.Option(None, "--dest",
                                                   help="Where to unpack (default: $HONE_DATA_DIR or "
                                                        "~/.cache/hone/data).")):
    """Download the Debian-packaged demo corpora (Gene Ontology, Jane Austen) and unpack them."""
    _log(f"demo data in {fetch_debian_data(dest)}")


@app.command()
def tokenize(recipe: Path = typer.Argument(..., help="Recipe TOML file."), workdir: Optional[Path] = WORKDIR):
    """Tokenize the curated corpus with the base model's tokenizer into token shards."""
    r, wd = _load(recipe, workdir)
    prepare(r, wd, _log)


@app.command()
def report(rundir: Path = typer.Argument(..., help="Run directory.")):
    """Write RUNDIR/report.html (self-contained, plots embedded) from the run's artifacts."""
    _log(f"report: {write_report(rundir)}")


@recipe_app.command("check")
def recipe_check(recipe: Path = typer.Argument(..., help="Recipe TOML file."), workdir: Optional[Path] = WORKDIR):
    """Validate a recipe and every path it names; print what the run will do, or the error naming the bad field."""
    r, wd = _load(recipe, workdir)
    for line in check_recipe(r, wd):
        _log(f"  {line}")
    _log(f"{recipe}: ok")


@recipe_app.command("fields")
def recipe_fields():
    """List every recipe field with its default and one-line doc."""
    for line in describe_fields():
        _log(line)


def main() -> None:
    try:
        app()
    except Preempted as e:  # not a mistake: the cluster asked the job to stop; its status says "requeue me"
        print(f"preempted: {e}", file=sys.stderr)
        raise quick_exit(e.exit_code)
    except HoneError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
