"""A recipe's training: its step count, parallel plan and loader, and the run itself, in
this process or in ``nproc`` torchrun workers on this machine (:mod:`hone.train.worker`).

In this process the caller's ``model`` is trained. With workers the caller holds no weights
while they train (each worker loads only its shards); afterwards :func:`trained_model` builds
the model from the newest checkpoint, for evaluation and the HF export.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

from hone.errors import HoneError
from hone.model.load import base_meta_model, base_weights, pick_device
from hone.model.lora import apply_lora, init_lora, lora_modules, with_lora_init
from hone.model.weights import load_weights, materialize
from hone.plan.commands import LAUNCHER_MODULE, WORKER_MODULE
from hone.recipe import Recipe, TrainConfig, device_settings, domain_ratio, training_streams
from hone.rundir import CHECKPOINTS_DIR, SUMMARY_FILE, read_json, stream_tokens_dir, write_json
from hone.tokens import load_tokens
from hone.tokens.shards import read_index
from hone.train.checkpoint import STATE_FILE, latest_checkpoint, load_model_weights
from hone.train.data import MixtureLoader, TokenStream, schedule_phases
from hone.train.loop import train
from hone.train.mixture import load_mixture
from hone.train.parallelize import DistContext, ParallelPlan, parallelize
from hone.train.preempt import EXIT_PREEMPTED, Preempted, catching, forwarding
from hone.train.schedule import base_state
from hone.train.tracking import tracking_for

Log = Callable[[str], None]


def total_steps(t: TrainConfig) -> int:
    return max(1, t.max_tokens // (t.seq_len * t.batch_size))


def plan_from_recipe(t: TrainConfig, world_size: int) -> ParallelPlan:
    """The parallel plan for ``world_size`` processes from the recipe's train section."""
    if world_size % t.tp:
        raise HoneError(f"train.tp ({t.tp}) does not divide the number of processes ({world_size})")
    if world_size % (t.tp * t.pp):
        raise HoneError(f"train.pp ({t.pp}) x train.tp ({t.tp}) = {t.pp * t.tp} does not divide the number of "
                        f"processes ({world_size})")
    # mixed_precision / compile left to the device (None) count as the CPU's until
    # device_settings resolves them where the device is known.
    return ParallelPlan(dp=world_size // (t.tp * t.pp), tp=t.tp, pp=t.pp, pp_schedule=t.pp_schedule, vpp=t.vpp,
                        sequence_parallel=t.sequence_parallel, data_parallel=t.data_parallel,
                        activation_checkpointing=t.activation_checkpointing, compile=bool(t.compile),
                        mixed_precision=t.mixed_precision or "fp32")


def mixture_phases(recipe: Recipe) -> list[tuple[int, float]]:
    """The run's domain-ratio phases: train.mixture's schedule (fitted ratio and upsampling)
    or train.domain_ratio, with train.upsample_* overriding the upsampling phase."""
    t = recipe.train
    ratio, frac, up = domain_ratio(recipe), 0.0, None
    if t.mixture:
        s = load_mixture(Path(t.mixture))["schedule"]
        ratio = s["ratio"]
        if s.get("upsample"):
            frac, up = s["upsample"]["fraction"], s["upsample"]["ratio"]
    if t.upsample_fraction:
        frac, up = t.upsample_fraction, t.upsample_ratio if t.upsample_ratio is not None else min(1.0, 2 * ratio)
    return schedule_phases(ratio, total_steps(t), frac, up)


def stream_tokens(recipe: Recipe, workdir: Path, names: list[str], seq_len: int) -> dict[str, TokenStream]:
    """The token streams ``names`` of the run (see :func:`hone.rundir.stream_tokens_dir`)."""
    by_name = {s.name: s for s in training_streams(recipe)}
    streams = {}
    for name in names:
        path = stream_tokens_dir(workdir, name, from_pool=by_name[name].from_pool)
        if not (path / "index.json").exists():
            raise HoneError(f"the training mixture needs '{name}' tokens, but the corpus has no '{name}' documents "
                            f"(lower the domain ratio, or check the source's inputs and filters)")
        streams[name] = TokenStream(load_tokens(path), seq_len, eos_id=read_index(path).get("eos_id"))
    return streams


def build_loader(recipe: Recipe, workdir: Path, phases: list[tuple[int, float]] | None = None,
                 seq_len: int | None = None) -> MixtureLoader:
    """The mixture loader over the run's token streams: the domain role's share per step from
    ``phases`` (default: the recipe's schedule), each role's rows split by the streams' weights."""
    phases = phases if phases is not None else mixture_phases(recipe)
    streams = training_streams(recipe)
    domain = [s.name for s in streams if s.role == "domain"]
    general = [s.name for s in streams if s.role == "general"]
    needed = (domain if max(r for _, r in phases) > 0 else []) + (general if min(r for _, r in phases) < 1 else [])
    tokens = stream_tokens(recipe, workdir, needed, seq_len or recipe.train.seq_len)
    return MixtureLoader(tokens, domain=domain, general=general, batch_size=recipe.train.batch_size,
                         ratio=phases[0][1], schedule=phases if len(phases) > 1 else None,
                         weights={s.name: s.weight for s in streams})


def train_in_process(recipe: Recipe, workdir: Path, model, max_steps: int | None, log: Log,
                     on_step: Callable[[dict], None] | None = None) -> dict:
    """Train ``model`` here; one process applies only activation checkpointing and compile,
    both keep the parameter names, so evaluation and the HF export use the same object."""
    t = recipe.train  # the loop resolves the device defaults again, to say which it chose and why
    loader = build_loader(recipe, workdir)
    add_lora(recipe, model, log)
    plan = plan_from_recipe(device_settings(t, next(model.parameters()).device.type)[0], 1)
    parallelize(model, plan, DistContext(device=next(model.parameters()).device))
    torch.manual_seed(recipe.run.seed)
    try:
        with catching():  # a preemption signal stops training after a step and a checkpoint
            summary = train(model, loader, t, workdir, total_steps=total_steps(t), resume=True, max_steps=max_steps,
                            log=log, base=base_state(recipe), tracking=tracking_for(recipe), on_step=on_step)
        write_json(workdir / SUMMARY_FILE, {**summary, "world_size": 1, "plan": plan.__dict__})
        return summary
    finally:
        model.model.activation_checkpointing = False


def _newest(workdir: Path, log: Log) -> Path:
    newest = latest_checkpoint(workdir / CHECKPOINTS_DIR, log)
    if newest is None:
        raise HoneError(f"{workdir / CHECKPOINTS_DIR}: the workers left no checkpoint")
    return newest


def read_back(recipe: Recipe, workdir: Path, model, log: Log) -> dict:
    """The newest checkpoint's weights into ``model`` (None: only its step), after workers trained."""
    newest = _newest(workdir, log)
    if model is not None:
        add_lora(recipe, model, log)
    state = load_model_weights(newest, model) if model is not None else read_json(newest / STATE_FILE)
    return {"steps": int(state["step"]), "total_steps": total_steps(recipe.train)}


def trained_model(recipe: Recipe, workdir: Path, tokenizer, log: Log) -> torch.nn.Module:
    """The model the workers trained: built on the meta device, materialized on ``train.device``,
    the newest checkpoint's weights loaded into it."""
    model = base_meta_model(recipe, tokenizer)
    if recipe.train.lora is not None:  # checkpoints hold only the adapters (and embeddings): the rest is the base's
        apply_lora(model, recipe.train.lora)
    materialize(model, pick_device(recipe.train.device))
    if recipe.train.lora is not None:
        load_weights(model, with_lora_init(model, base_weights(recipe, workdir, tokenizer), recipe.run.seed))
    load_model_weights(_newest(workdir, log), model)
    return model


def add_lora(recipe: Recipe, model, log: Log) -> None:
    """Put the recipe's adapters (initialized) on a model holding the base's weights, once."""
    if recipe.train.lora is not None and not lora_modules(model):
        log(apply_lora(model, recipe.train.lora))
        init_lora(model, recipe.run.seed)


def train_recipe(recipe: Recipe, workdir: Path, model, max_steps: int | None, log: Log, nproc: int = 1,
                 on_step: Callable[[dict], None] | None = None) -> dict:
    """Train ``model`` in this process, or in ``nproc`` torchrun workers (``model`` None: the
    caller holds no weights meanwhile; else the newest weights are read back into it)."""
    if nproc == 1:
        return train_in_process(recipe, workdir, model, max_steps, log, on_step)
    plan_from_recipe(recipe.train, nproc)  # a bad tp fails here, before workers start
    launch_local(workdir, nproc, max_steps, log)
    return read_back(recipe, workdir, model, log)


def torchrun_argv(workdir: Path, nproc: int, max_steps: int | None) -> list[str]:
    # torchrun, through Hone's wrapper: a failed worker becomes one line, not a traceback.
    argv = [sys.executable, "-m", LAUNCHER_MODULE, "--standalone", f"--nproc-per-node={nproc}",
            "-m", WORKER_MODULE, "--workdir", str(workdir)]
    if max_steps:
        argv += ["--max-steps", str(max_steps)]
    return argv


def shown(argv: list[str]) -> str:
    """A :func:`torchrun_argv` as the torchrun line it amounts to, for the log."""
    return f"torchrun {shlex.join(argv[3:])}"


def launch_local(workdir: Path, nproc: int, max_steps: int | None, log: Log = print) -> None:
    """Run ``nproc`` workers on this machine under torchrun on the run directory's recipe;
    raise HoneError if any fails."""
    argv = torchrun_argv(workdir, nproc, max_steps)
    log(f"launch: {shown(argv)}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, env=env)
    with forwarding(lambda: [proc.pid]):  # a preemption signal goes on to torchrun and its workers
        proc.wait()
    if proc.returncode == EXIT_PREEMPTED:
        raise Preempted(f"the {nproc} workers stopped after a step and wrote a checkpoint; "
                        f"`hone train RECIPE --workdir {workdir}` resumes from it")
    if proc.returncode != 0:
        raise HoneError(f"torchrun with {nproc} processes exited with status {proc.returncode} "
                        f"(see the worker output above); `hone train RECIPE --workdir {workdir} --resume` "
                        f"continues from the newest checkpoint")
