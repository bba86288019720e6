"""The torchrun worker: ``python -m hone.train.worker [RECIPE] --workdir DIR``.

``hone train RECIPE --nproc N`` runs the data stages once in the calling process, then
starts ``torchrun --standalone --nproc-per-node N -m hone.train.worker --workdir DIR``
(through :mod:`hone.train.torchrun`)
(:func:`hone.train.run.launch_local`) and waits. Every worker builds the base model on the
meta device, applies the recipe's parallel plan (FSDP2 or DDP over dp, tensor parallel over
tp), materializes its own shards and reads only those from the base's weights
(:mod:`hone.model.weights`), builds the loader and trains; checkpoints are DCP, so the
calling process (or a later run on another world size) reads them back. For several nodes,
:func:`hone.plan.commands.multinode_commands` writes the torchrun line to run on every node
and a Slurm script.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from hone.errors import HoneError, fast_exit
from hone.model.load import base_meta_model, base_tokenizer, base_weights, pick_device
from hone.model.lora import apply_lora, with_lora_init
from hone.model.weights import load_weights
from hone.recipe import Recipe, TrainConfig, device_settings, load_recipe
from hone.rundir import CHECKPOINTS_DIR, LOGS_DIR, RECIPE_STAMP, SUMMARY_FILE, read_json, write_json
from hone.train.checkpoint import checkpoints_newest_first
from hone.train.hooks import NonFiniteLoss
from hone.train.loop import train
from hone.train.parallelize import init_distributed, parallelize
from hone.train.preempt import Preempted, catching, quick_exit
from hone.train.run import build_loader, plan_from_recipe, total_steps
from hone.train.schedule import base_state
from hone.train.tracking import tracking_for


def recipe_for(recipe_path: Path | None, workdir: Path | None) -> tuple[Recipe, Path]:
    """The recipe from its TOML file, or the validated copy the run directory keeps."""
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
        return recipe, Path(workdir or recipe.run.workdir)
    stamp = Path(workdir) / RECIPE_STAMP
    if not stamp.exists():
        raise HoneError(f"{stamp}: not found; give the recipe file or run the data stages first")
    return Recipe.model_validate(read_json(stamp)["recipe"]), Path(workdir)


def run_worker(recipe: Recipe, workdir: Path, max_steps: int | None) -> dict:
    """One torchrun worker: join the job, build, parallelize, train."""
    t = recipe.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    # Processes on one host share its cores; oversubscribing threads slows every rank.
    torch.set_num_threads(t.threads or max(1, (os.cpu_count() or 1) // local_world))
    plan = plan_from_recipe(device_settings(t, pick_device(t.device).type)[0], world)
    ctx = init_distributed(plan, t.device)
    def quiet(msg: str) -> None:
        pass

    log = print if ctx.is_main else quiet
    try:
        model = build_sharded(recipe, workdir, plan, ctx)
        loader = build_loader(recipe, workdir)
        torch.manual_seed(recipe.run.seed)
        summary = train(model, loader, t, workdir, total_steps=total_steps(t), resume=True,
                        max_steps=max_steps, ctx=ctx, log=lambda m: log(m) or sys.stdout.flush(),
                        base=base_state(recipe), tracking=tracking_for(recipe))
        if ctx.is_main:
            write_json(workdir / SUMMARY_FILE, {**summary, "world_size": world, "plan": plan.__dict__})
        return summary
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def build_sharded(recipe: Recipe, workdir: Path, plan, ctx) -> torch.nn.Module:
    """The base model built on the meta device, parallelized, materialized on this rank's device
    with only its shards, which are read from the base's weights by name; when a checkpoint is
    there, training resumes from it and the base weights are not read at all."""
    model = base_meta_model(recipe, base_tokenizer(recipe, workdir) if recipe.model.source == "random" else None)
    validate_plan(plan, model, recipe.train, ctx.world_size)
    lora = recipe.train.lora
    if lora is not None:  # adapters on the meta device, before FSDP2 shards them with the rest
        line = apply_lora(model, lora)
        if ctx.is_main:
            print(line)
    # A checkpoint's weights replace the base's; under LoRA it holds only what trains.
    resuming = bool(checkpoints_newest_first(workdir / CHECKPOINTS_DIR)) and lora is None
    whole = set(model.state_dict())  # a pipeline stage keeps some of these names

    def load(materialized: torch.nn.Module) -> None:
        if not resuming:
            load_weights(materialized, with_lora_init(materialized, base_weights(recipe, workdir), recipe.run.seed),
                         whole)

    return parallelize(model, plan, ctx, load=load)


def validate_plan(plan, model, t: TrainConfig, world: int) -> None:
    # A transformers config (the transformers backend) keeps the decoder's keys in its text config.
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    plan.validate(world, heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                  ffn=getattr(cfg, "intermediate_size", None) or heads, batch_size=t.batch_size,
                  layers=getattr(cfg, "num_hidden_layers", None), micro_batch=t.micro_batch)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m hone.train.worker", description=__doc__.split("\n")[0])
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
    try:
        with catching():  # from now on a preemption signal stops the job after a step and a checkpoint
            run_worker(recipe, workdir, args.max_steps)
        raise fast_exit(0)
    except Preempted:  # rank 0 has said it in one line
        raise quick_exit()
    except NonFiniteLoss as e:  # every rank stops alike; a distinct status tells the supervisor why
        if rank == "0":
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(NonFiniteLoss.exit_code)
    except HoneError as e:
        if rank == "0":
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except Exception as e:  # noqa: BLE001 - e.g. a peer died mid-collective: one line here, details in a file
        log_dir = workdir / LOGS_DIR
        log_dir.mkdir(parents=True, exist_ok=True)
        detail = log_dir / f"rank{rank}.err"
        detail.write_text(traceback.format_exc())
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"worker rank {rank}: {type(e).__name__}: {first} (traceback in {detail})", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
