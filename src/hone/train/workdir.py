"""The run directory's recipe stamp (``recipe.json``) and what training leaves in it.

Two hashes decide what a rerun redoes: the data hash (every section but ``[train]`` and the
sections only other commands read) rebuilds the data stages; the train hash (the ``[train]``
fields that change the result) starts training over. Neither deletes checkpoints or a finished
model without ``--fresh``: a changed recipe refuses, naming the fields, while they are there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

from hone.errors import HoneError
from hone.recipe import Recipe
from hone.rundir import (
    CHECKPOINTS_DIR,
    EVAL_FILE,
    EXPERTS_DIR,
    FINAL_DIR,
    MIX_DIR,
    RECIPE_STAMP,
    TRAINING_ARTIFACTS,
    ensure_dir,
    read_json,
    write_json,
)
from hone.train.checkpoint import STATE_FILE, latest_checkpoint
from hone.train.mixture import load_mixture

Log = Callable[[str], None]

# Train fields that change how the work is laid out, not what is computed: changing them
# resumes (on another world size, with or without compile, ...) instead of starting over.
LAYOUT_FIELDS = {"data_parallel", "tp", "pp", "pp_schedule", "vpp", "sequence_parallel", "activation_checkpointing",
                 "compile", "device", "threads",
                 "log_every", "checkpoint_every", "micro_batch", "worker_mtbf_hours", "layout",
                 "overlap_steps", "fused_projections"}  # issue 17: speed only, the same results


# Sections that are not data: a change to them never redoes the data stages (see recipe_hash).
NON_DATA_SECTIONS = {"train", "mix", "experts", "heal", "log", "cluster", "budget"}


def recipe_hash(recipe: Recipe) -> str:
    """Hash of everything but the train section (and [mix] / [experts], read only by `hone mix` /
    `hone branch`, so adding an expert keeps the run; [heal] and [log], which change no result;
    [cluster] and [budget], read by the decision stage): a change redoes the data stages."""
    data = json.loads(recipe.model_dump_json(exclude=NON_DATA_SECTIONS))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def train_hash(recipe: Recipe) -> str:
    """Hash of the train fields that change the result: a change starts training over."""
    data = json.loads(recipe.train.model_dump_json(exclude=LAYOUT_FIELDS))
    # Mixture fields at their defaults keep the hash runs had before they existed; a
    # mixture file counts by the schedule it holds, not by its path.
    for key, default in (("mixture", None), ("upsample_fraction", 0.0), ("upsample_ratio", None),
                         ("nan_skip_batches", 1), ("schedule", "cosine"), ("decay_fraction", 0.2),
                         ("warmup_from", 0.0), ("reset_optimizer", True), ("lora", None), ("float8", False)):
        if data.get(key) == default:
            data.pop(key, None)
    if recipe.train.mixture:
        data["mixture"] = load_mixture(Path(recipe.train.mixture))["schedule"]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# What a user would lose: training results a recipe change must not delete without --fresh.
RESULTS = (CHECKPOINTS_DIR, FINAL_DIR, EVAL_FILE, EXPERTS_DIR, MIX_DIR)


def prepare_workdir(recipe: Recipe, workdir: Path, fresh: bool, log: Log, *, fresh_training: bool = False) -> None:
    """Create the run directory and stamp it with ``recipe``.

    ``fresh`` removes the whole run directory; ``fresh_training`` removes what training wrote
    (and the data stages too when the recipe's data changed). Without either, a recipe whose
    data or training fields changed since the stamp refuses while training results are there,
    naming the changed fields; without results, the stale data or training is redone."""
    stamp = workdir / RECIPE_STAMP
    old = read_json(stamp) if stamp.is_file() else None
    data_changed = old is not None and old.get("hash") != recipe_hash(recipe)
    train_changed = old is not None and old.get("train_hash") != train_hash(recipe)
    if not (fresh or fresh_training) and (data_changed or train_changed):
        held = training_results(workdir)
        if held:
            changes = changed_fields(old, recipe, data_changed)
            raise HoneError(f"{workdir} holds {held} from another recipe ({changes}); "
                            f"run again with --fresh to discard that training, or use a new --workdir")
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
        log(f"--fresh: removed {workdir}; the run starts over")
    elif data_changed and workdir.exists():
        shutil.rmtree(workdir)
        log(f"recipe's data changed since the last run in {workdir} "
            f"({changed_fields(old, recipe, True)}): removed it to rebuild the data stages")
    elif fresh_training:
        forget_training(workdir, log, "--fresh")
    elif train_changed:
        forget_training(workdir, log, f"recipe's [train] changed ({changed_fields(old, recipe, False)})")
    ensure_dir(workdir)
    write_json(stamp, {"hash": recipe_hash(recipe), "train_hash": train_hash(recipe),
                       "recipe": json.loads(recipe.model_dump_json())})


def training_results(workdir: Path) -> str:
    """What training left in ``workdir`` that is worth keeping, in words ("" when nothing)."""
    found = []
    newest = latest_checkpoint(workdir / CHECKPOINTS_DIR, log=lambda m: None)
    if newest is not None:
        found.append(f"checkpoints (step {read_json(newest / STATE_FILE)['step']})")
    found += [f"{name}/" if (workdir / name).is_dir() else name
              for name in RESULTS[1:] if (workdir / name).exists()]
    return ", ".join(found)


def _flat(value, prefix: str) -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: value}


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def changed_fields(old: dict, recipe: Recipe, data: bool) -> str:
    """The fields that changed since the stamp ``old``: ``train.lr 0.003 -> 0.001, ...``; the data
    sections with ``data``, else the train fields that change the result."""
    new = json.loads(recipe.model_dump_json())
    if data:
        keep = lambda key: key.split(".")[0] not in NON_DATA_SECTIONS  # noqa: E731
    else:
        keep = lambda key: key.startswith("train.") and key.split(".")[1] not in LAYOUT_FIELDS  # noqa: E731
    if "recipe" not in old:
        return "the data sections" if data else "the [train] section"
    a, b = _flat(old["recipe"], ""), _flat(new, "")
    changes = [f"{key} {_short(a.get(key))} -> {_short(b.get(key))}"
               for key in sorted(set(a) | set(b)) if keep(key) and a.get(key) != b.get(key)]
    if not changes and not data and recipe.train.mixture:
        changes = [f"train.mixture: the schedule in {recipe.train.mixture}"]
    return ", ".join(changes) or ("the data sections" if data else "the [train] section")


def forget_training(workdir: Path, log: Log, why: str = "training starts over") -> None:
    """Remove what training wrote (``TRAINING_ARTIFACTS``); the data stages are kept. Says ``why``."""
    removed = []
    for name in TRAINING_ARTIFACTS:
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        log(f"{why}: removed {', '.join(removed)} (the data stages are kept)")
    else:
        log(f"{why}: no earlier training to remove")
