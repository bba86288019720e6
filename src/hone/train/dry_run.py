"""`hone train RECIPE --dry-run`: the sharded model of a recipe's layout, on the meta device,
without starting a process or reading a weight, and what each rank would hold.

One process joins a fake process group of the job's world size (torch's ``FakeStore`` and
``fake`` backend: collectives do nothing), builds the base model on the meta device and
applies the recipe's parallel plan exactly as a worker does (:func:`hone.train.parallelize.parallelize`).
Each parameter's placements then give every rank's local shape; parameters, gradients (same
shapes, fp32) and AdamW's two moments are summed per rank, next to the planner's static
memory for the same layout (:func:`hone.plan.memory.static_bytes` with
:meth:`hone.plan.config.Constants.hone_trainer`).

    hone train recipes/tiny-cpu.toml --dry-run --nproc 8 --nnodes 2
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import replace
from itertools import product
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from hone.errors import HoneError
from hone.model.hf_backend import HFCausalLM
from hone.model.llama import Llama
from hone.model.load import base_meta_model
from hone.model.shape import shape_of
from hone.plan.config import Config, Constants
from hone.plan.layout import fixed_fields
from hone.plan.memory import GIB, static_bytes
from hone.plan.shapes import ModelShape
from hone.recipe import Recipe
from hone.train.parallelize import init_distributed, parallelize
from hone.train.run import plan_from_recipe

Log = Callable[[str], None]
# AdamW keeps two moments per parameter, in the parameter's dtype (fp32).
OPTIMIZER_STATES = 2


@contextmanager
def fake_job(world_size: int) -> Iterator[None]:
    """This process as rank 0 of a ``world_size`` job whose collectives do nothing."""
    # torch's test helpers: imported only for a dry run, not whenever the CLI starts
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise HoneError("--dry-run needs a process without a process group (it makes a fake one)")
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    os.environ.update(WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rank_coordinates(mesh) -> list[dict[str, int]]:
    """Every rank's coordinate on the job's mesh, by dimension name, in rank order."""
    names, shape = mesh.mesh_dim_names, tuple(mesh.shape)
    by_rank = {}
    for coord in product(*(range(n) for n in shape)):
        by_rank[int(mesh.mesh[coord])] = dict(zip(names, coord))
    return [by_rank[r] for r in sorted(by_rank)]


def local_numel(p: torch.Tensor, coord: dict[str, int]) -> int:
    """Elements of ``p`` a rank at ``coord`` holds: all of a plain tensor, its shard of a DTensor."""
    if not isinstance(p, DTensor):
        return p.numel()
    mesh = p.device_mesh
    if mesh.mesh_dim_names is None:
        raise HoneError("--dry-run: a DTensor on a mesh without dimension names")
    mine = [coord[name] for name in mesh.mesh_dim_names]
    shape, _ = _compute_local_shape_and_global_offset(p.shape, tuple(mesh.shape), mine, p.placements,
                                                      skip_offset=True)
    n = 1
    for d in shape:
        n *= d
    return n


def per_rank_bytes(model: torch.nn.Module, mesh) -> list[dict[str, int]]:
    """Parameter, gradient and optimizer bytes each rank holds (a tied weight counted once)."""
    coords = rank_coordinates(mesh) if mesh is not None else [{}]
    params = list(model.parameters())
    out = []
    for coord in coords:
        n = sum(local_numel(p, coord) * p.element_size() for p in params if p.requires_grad)
        out.append({"params": n, "grads": n, "optimizer": OPTIMIZER_STATES * n})
    return out


def planner_shape(model: torch.nn.Module) -> ModelShape | None:
    if isinstance(model, Llama):
        return shape_of(model.config, "recipe model")
    if isinstance(model, HFCausalLM):
        return model.planner_shape("recipe model")
    return None


def dry_run(recipe: Recipe, world_size: int, log: Log) -> dict:
    """Build the recipe's sharded model on the meta device for ``world_size`` processes and report
    each rank's bytes beside the planner's; returns the figures (also for tests and benchmarks)."""
    t = recipe.train
    # Compile and recompute change no parameter; compiling meta layers would only cost time.
    plan = replace(plan_from_recipe(t, world_size), compile=False)
    model = base_meta_model(recipe)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    plan.validate(world_size, heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                  ffn=getattr(cfg, "intermediate_size", None) or heads, batch_size=t.batch_size)
    if world_size == 1:
        ranks = per_rank_bytes(model, None)
    else:
        with fake_job(world_size):
            ctx = init_distributed(plan, "cpu")
            model = parallelize(model, plan, ctx)
            ranks = per_rank_bytes(model, ctx.mesh)
    shape = planner_shape(model)
    planner = None
    if shape is not None:
        c = Config(micro_batch=max(1, t.micro_batch or t.batch_size // plan.dp), **fixed_fields(plan))
        w, g, o = static_bytes(shape, c, Constants.hone_trainer())
        planner = {"params": w, "grads": g, "optimizer": o}
    result = {"world_size": world_size, "plan": plan.__dict__, "ranks": ranks, "planner": planner}
    log_dry_run(result, log)
    return result


def log_dry_run(result: dict, log: Log) -> None:
    plan = result["plan"]
    big = max(sum(b.values()) for b in result["ranks"]) >= GIB
    unit, scale = ("GiB", GIB) if big else ("MiB", float(1 << 20))
    log(f"dry run: {result['world_size']} processes, dp={plan['dp']} x tp={plan['tp']} "
        f"({plan['data_parallel']}), model on the meta device; {unit} per rank:")
    gib = lambda x: f"{x / scale:9.3f}"  # noqa: E731
    log(f"  {'ranks':<14}{'params':>9} {'grads':>9} {'optim':>9} {'total':>9}")
    groups: list[tuple[list[int], dict]] = []
    for r, b in enumerate(result["ranks"]):
        if groups and groups[-1][1] == b:
            groups[-1][0].append(r)
        else:
            groups.append(([r], b))
    for ranks, b in groups:
        label = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        log(f"  {label:<14}{gib(b['params'])} {gib(b['grads'])} {gib(b['optimizer'])} {gib(sum(b.values()))}")
    p = result["planner"]
    if p is None:
        log("  planner: no planner shape for this model")
        return
    worst = max(sum(b.values()) for b in result["ranks"])
    diff = (sum(p.values()) - worst) / worst * 100
    log(f"  {'planner':<14}{gib(p['params'])} {gib(p['grads'])} {gib(p['optimizer'])} {gib(sum(p.values()))}"
        f"  ({diff:+.2f}% against the largest rank)")
