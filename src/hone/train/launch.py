"""Multi-process training: the torchrun worker and the commands that start it.

``hone train RECIPE --nproc N`` runs the data stages once in the calling process, then
starts ``torchrun --standalone --nproc-per-node N -m hone.train.launch RECIPE --workdir DIR``
and waits. Every worker builds the same base model and loader, applies the recipe's
parallel plan (FSDP2 or DDP over dp, tensor parallel over tp) and trains; checkpoints are
DCP, so the calling process (or a later run on another world size) reads them back.

For several nodes nothing is started here: :func:`multinode_commands` returns the
torchrun line to run on every node and a Slurm script for the same recipe.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from hone.errors import HoneError

SUMMARY_FILE = "train_summary.json"


def plan_from_recipe(t, world_size: int):
    """The parallel plan for ``world_size`` processes from the recipe's train section."""
    from hone.train.parallelize import ParallelPlan

    if world_size % t.tp:
        raise HoneError(f"train.tp ({t.tp}) does not divide the number of processes ({world_size})")
    return ParallelPlan(dp=world_size // t.tp, tp=t.tp, data_parallel=t.data_parallel,
                        activation_checkpointing=t.activation_checkpointing, compile=t.compile,
                        mixed_precision=t.mixed_precision)


def total_steps(t) -> int:
    return max(1, t.max_tokens // (t.seq_len * t.batch_size))


def recipe_for(recipe_path: Path | None, workdir: Path | None):
    """The recipe from its TOML file, or the validated copy the run directory keeps."""
    from hone.recipe import Recipe, load_recipe
    from hone.rundir import read_json

    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
        return recipe, Path(workdir or recipe.run.workdir)
    stamp = Path(workdir) / "recipe.json"
    if not stamp.exists():
        raise HoneError(f"{stamp}: not found; give the recipe file or run the data stages first")
    return Recipe.model_validate(read_json(stamp)["recipe"]), Path(workdir)


def run_worker(recipe, workdir: Path, max_steps: int | None) -> dict:
    """One torchrun worker: join the job, build, parallelize, train."""
    import torch.distributed as dist

    from hone.pipeline import build_loader, stage_base_model
    from hone.rundir import write_json
    from hone.train.loop import train
    from hone.train.parallelize import init_distributed, parallelize

    t = recipe.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    # Processes on one host share its cores; oversubscribing threads slows every rank.
    torch.set_num_threads(t.threads or max(1, (os.cpu_count() or 1) // local_world))
    plan = plan_from_recipe(t, world)
    ctx = init_distributed(plan, t.device)
    quiet = (lambda m: None)
    log = print if ctx.is_main else quiet
    try:
        model, _ = stage_base_model(recipe, workdir, quiet)
        cfg = model.config
        plan.validate(world, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                      ffn=cfg.intermediate_size, batch_size=t.batch_size)
        model = parallelize(model, plan, ctx)
        loader = build_loader(recipe, workdir)
        torch.manual_seed(recipe.run.seed)
        summary = train(model, loader, t, workdir, total_steps=total_steps(t), resume=True,
                        max_steps=max_steps, ctx=ctx, log=lambda m: log(m) or sys.stdout.flush())
        if ctx.is_main:
            write_json(workdir / SUMMARY_FILE, {**summary, "world_size": world, "plan": plan.__dict__})
        return summary
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def torchrun_argv(workdir: Path, nproc: int, max_steps: int | None) -> list[str]:
    # torchrun, through run_torchrun below: a failed worker becomes one line, not a traceback.
    argv = [sys.executable, "-m", "hone.train.launch", "--torchrun", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "hone.train.launch", "--workdir", str(workdir)]
    if max_steps:
        argv += ["--max-steps", str(max_steps)]
    return argv


def launch_local(workdir: Path, nproc: int, max_steps: int | None, log=print) -> None:
    """Run ``nproc`` workers on this machine under torchrun on the run directory's recipe;
    raise HoneError if any fails."""
    argv = torchrun_argv(workdir, nproc, max_steps)
    log(f"launch: torchrun {shlex.join(argv[4:])}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(argv, env=env)
    if proc.returncode != 0:
        raise HoneError(f"torchrun with {nproc} processes exited with status {proc.returncode} "
                        f"(see the worker output above); `hone train RECIPE --workdir {workdir} --resume` "
                        f"continues from the newest checkpoint")


def multinode_commands(recipe: Path, workdir: Path, nnodes: int, nproc: int, job: str = "hone") -> dict:
    """The torchrun line for every node and a Slurm script that runs it."""
    run = (f"torchrun --nnodes {nnodes} --nproc-per-node {nproc} --rdzv-backend c10d "
           f"--rdzv-endpoint $MASTER_ADDR:29500 --rdzv-id $JOB_ID "
           f"-m hone.train.launch {shlex.quote(str(recipe))} --workdir {shlex.quote(str(workdir))}")
    slurm = f"""#!/bin/bash
#SBATCH --job-name={job}
#SBATCH --nodes={nnodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={nproc}
#SBATCH --exclusive
# Run the data stages once before submitting: hone tokenize {recipe} --workdir {workdir}
# The run directory must be on a file system every node sees (checkpoints are written by all ranks).
set -euo pipefail
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export JOB_ID=$SLURM_JOB_ID
srun {run}
"""
    return {"torchrun": run, "slurm": slurm}


def run_torchrun(args: list[str]) -> int:
    """torchrun's own entry point, with worker failures reported in one line per rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as e:
        if report := os.environ.get("HONE_FAILURE_REPORT"):  # for the supervisor (hone.heal)
            from hone.rundir import write_json

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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--torchrun"]:
        raise SystemExit(run_torchrun(argv[1:]))
    p = argparse.ArgumentParser(prog="python -m hone.train.launch", description=__doc__.split("\n")[0])
    p.add_argument("recipe", type=Path, nargs="?", default=None,
                   help="Recipe TOML (default: the run directory's validated recipe.json)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    args = p.parse_args(argv)
    try:
        if args.recipe is None and args.workdir is None:
            raise HoneError("give a recipe file or --workdir")
        recipe, workdir = recipe_for(args.recipe, args.workdir)
    except HoneError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    rank = os.environ.get("RANK", "0")
    from hone.heal.worker import NonFiniteLoss

    try:
        run_worker(recipe, workdir, args.max_steps)
    except NonFiniteLoss as e:  # every rank stops alike; a distinct status tells the supervisor why
        if rank == "0":
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(NonFiniteLoss.exit_code)
    except HoneError as e:
        if rank == "0":
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except Exception as e:  # noqa: BLE001 - e.g. a peer died mid-collective: one line here, details in a file
        import traceback

        log_dir = workdir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        detail = log_dir / f"rank{rank}.err"
        detail.write_text(traceback.format_exc())
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"worker rank {rank}: {type(e).__name__}: {first} (traceback in {detail})", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
