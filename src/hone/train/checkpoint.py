"""Resumable training checkpoints with torch distributed checkpoint (DCP).

A checkpoint is ``checkpoints/step_NNNNNN/``: DCP shards of model and optimizer state
(``.metadata`` + ``*.distcp``) and ``trainer_state.json`` (step, loader state, RNG). Every
rank writes into ``.step_NNNNNN.tmp`` and rank 0 renames it once all are done, so a kill at
any moment leaves the previous checkpoint or the new one, never half of one. DCP stores
each tensor with its global shape, so a checkpoint written by N processes loads into M.
"""

from __future__ import annotations

import base64
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from hone.errors import HoneError
from hone.model.lora import has_frozen
from hone.rundir import read_json, write_json
from hone.train.data import MixtureLoader
from hone.train.faults import maybe_fail
from hone.train.parallelize import DistContext

KEEP_CHECKPOINTS = 2
# One process without a process group is a supported DCP mode, not a mistake worth a warning.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
STATE_FILE = "trainer_state.json"


def _rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _set_rng_state(blob: str) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(blob)), dtype=torch.uint8))


def _options(path: Path | None = None, model=None) -> StateDictOptions:
    """Optimizer state keyed by each parameter's name ("flattened"): a checkpoint then loads into
    another pipeline split, whose ranks hold other parameters and other param_groups lists.
    A checkpoint written before keys its groups by index (``optim.param_groups.0.params``) and is
    read back in that form. A model with frozen parameters (LoRA) saves and loads only the ones
    that train: the frozen ones are the base's, read from the base again."""
    legacy = path is not None and any(
        k.startswith("optim.param_groups.") and k.endswith(".params")
        for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    frozen = model is not None and has_frozen(model)
    return StateDictOptions(flatten_optimizer_state_dict=not legacy, ignore_frozen_params=frozen, strict=not frozen)


def _trained_only(model, model_sd: dict) -> dict:
    """``model_sd`` without the frozen parameters: DCP's ``ignore_frozen_params`` misses a frozen
    tensor's second name (a tied LM head), which would put the whole embedding in every checkpoint."""
    if not has_frozen(model):
        return model_sd
    frozen = {n.removeprefix("module.") for n, p in model.named_parameters(remove_duplicate=False)
              if not p.requires_grad}
    return {k: v for k, v in model_sd.items() if k not in frozen}


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, loader: MixtureLoader, ctx: DistContext) -> Path:
    target = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".step_{step:06d}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model=model))
    dcp.save({"model": _trained_only(model, model_sd), "optim": optim_sd}, checkpoint_id=str(tmp))
    maybe_fail("ckpt", step, ctx.rank, Path(ckpt_root).parent / "heal")  # fires once per run
    if ctx.is_main:
        write_json(tmp / STATE_FILE, {"step": step, "world_size": ctx.world_size,
                                      "loader": loader.state_dict(), "rng": _rng_state()})
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        for old in sorted(ckpt_root.glob("step_*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return target


def _looks_complete(path: Path) -> str | None:
    """None if the checkpoint looks whole, else what is wrong with it."""
    if not (path / ".metadata").exists():
        return "no DCP .metadata"
    if not (path / STATE_FILE).exists():
        return f"no {STATE_FILE}"
    try:
        read_json(path / STATE_FILE)
    except Exception as e:  # noqa: BLE001 - any damage means: use an older one
        return f"unreadable {STATE_FILE} ({e})"
    return None


def checkpoint_step(path: Path | None) -> int:
    """The step of ``checkpoints/step_NNNNNN`` (0 for no checkpoint)."""
    return int(path.name.split("_")[1]) if path is not None else 0


def checkpoints_newest_first(ckpt_root: Path) -> list[Path]:
    return sorted(Path(ckpt_root).glob("step_*"), reverse=True)


def latest_checkpoint(ckpt_root: Path, log: Callable[[str], None] = print) -> Path | None:
    """Newest checkpoint that looks complete; damaged ones are reported and skipped."""
    for path in checkpoints_newest_first(ckpt_root):
        problem = _looks_complete(path)
        if problem is None:
            return path
        log(f"checkpoint {path.name} is incomplete or corrupt ({problem}); trying an older one")
    return None


def load_checkpoint(path: Path, model, optimizer, loader: MixtureLoader) -> int:
    """Load model, optimizer, loader and RNG state; return the step it was taken at."""
    # DCP loads only the keys of the state it is given, and get_state_dict creates a fresh
    # optimizer's state (by a zero-gradient step) only when no parameter holds a gradient: a
    # model resumed in the same process after training (a mixture sweep's next budget) still
    # holds its last gradients, and its Adam moments would silently start from zero.
    model.zero_grad(set_to_none=True)
    options = _options(path, model)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": _trained_only(model, model_sd), "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    trainer = read_json(path / STATE_FILE)
    loader.load_state_dict(trainer["loader"])
    _set_rng_state(trainer["rng"])
    return int(trainer["step"])


def resume_from_newest(ckpt_root: Path, model, optimizer, loader: MixtureLoader, log) -> int:
    """Try checkpoints newest first; a checkpoint that fails to load falls back to the previous."""
    for path in checkpoints_newest_first(ckpt_root):
        if (problem := _looks_complete(path)) is not None:
            log(f"checkpoint {path.name} is incomplete or corrupt ({problem}); trying an older one")
            continue
        try:
            step = load_checkpoint(path, model, optimizer, loader)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - damage shows only when read
            log(f"checkpoint {path.name} failed to load ({type(e).__name__}: {e}); trying an older one")
            continue
        log(f"resumed from {path} at step {step}")
        return step
    if checkpoints_newest_first(ckpt_root):
        # Some load may have half-written the model: starting over silently would be wrong.
        raise HoneError(f"{ckpt_root}: no usable checkpoint; move it away or train with --fresh")
    return 0


def load_model_weights(path: Path, model) -> dict:
    """Read only the model's weights from a checkpoint written on any world size (e.g. to
    evaluate and export, in one process, what torchrun workers trained); returns its state."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    options = _options(model=model)  # without an optimizer: only the model's flags matter
    state = {"model": _trained_only(model, get_model_state_dict(model, options=options))}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=options)
    return read_json(path / STATE_FILE)
