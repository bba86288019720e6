"""The run directory's recipe stamp (``recipe.json``) and what training leaves in it.

Two hashes decide what a rerun redoes: the data hash (every section but ``[train]`` and the
sections only other commands read) rebuilds the data stages; the train hash (the ``[train]``
fields that change the result) starts training over.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

from hone.recipe import Recipe
from hone.rundir import RECIPE_STAMP, TRAINING_ARTIFACTS, ensure_dir, read_json, write_json
from hone.train.mixture import load_mixture

Log = Callable[[str], None]

# Train fields that change how the work is laid out, not what is computed: changing them
# resumes (on another world size, with or without compile, ...) instead of starting over.
LAYOUT_FIELDS = {"data_parallel", "tp", "activation_checkpointing", "compile", "device", "threads",
                 "log_every", "checkpoint_every", "micro_batch", "worker_mtbf_hours"}


def recipe_hash(recipe: Recipe) -> str:
    """Hash of everything but the train section (and [mix] / [experts], read only by `hone mix` /
    `hone branch`, so adding an expert keeps the run): a change redoes the data stages."""
    data = json.loads(recipe.model_dump_json(exclude={"train", "mix", "experts", "heal"}))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def train_hash(recipe: Recipe) -> str:
    """Hash of the train fields that change the result: a change starts training over."""
    data = json.loads(recipe.train.model_dump_json(exclude=LAYOUT_FIELDS))
    # Mixture fields at their defaults keep the hash runs had before they existed; a
    # mixture file counts by the schedule it holds, not by its path.
    for key, default in (("mixture", None), ("upsample_fraction", 0.0), ("upsample_ratio", None),
                         ("nan_skip_batches", 1)):
        if data.get(key) == default:
            data.pop(key, None)
    if recipe.train.mixture:
        data["mixture"] = load_mixture(Path(recipe.train.mixture))["schedule"]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def prepare_workdir(recipe: Recipe, workdir: Path, fresh: bool, log: Log) -> None:
    """Create the run directory; start over when asked or when the recipe changed."""
    stamp = workdir / RECIPE_STAMP
    train_changed = False
    if workdir.exists() and stamp.exists() and not fresh:
        old = read_json(stamp)
        if old.get("hash") != recipe_hash(recipe):
            log(f"recipe changed since the last run in {workdir}: starting over")
            fresh = True
        elif old.get("train_hash") != train_hash(recipe):
            log(f"recipe's [train] changed since the last run in {workdir}: training starts over")
            train_changed = True
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    ensure_dir(workdir)
    if train_changed:
        forget_training(workdir, log)
    write_json(stamp, {"hash": recipe_hash(recipe), "train_hash": train_hash(recipe),
                       "recipe": json.loads(recipe.model_dump_json())})


def forget_training(workdir: Path, log: Log) -> None:
    """Remove what training wrote (``TRAINING_ARTIFACTS``); the data stages are kept."""
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
        log(f"training from scratch (no --resume): removed {', '.join(removed)}")
