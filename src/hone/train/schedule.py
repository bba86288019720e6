"""Learning-rate schedules for continual pretraining, and the base's training state.

Every schedule warms up linearly over ``train.warmup_steps`` from ``start_lr`` to ``train.lr``
(re-warming: Ibrahim et al. 2024, arXiv 2403.08763, start from the base's final learning rate
rather than 0), then:

- ``cosine``: decays to ``lr x min_lr_ratio`` along half a cosine over the remaining steps
  (Hone's schedule before the others existed; bit-identical to it with ``start_lr`` 0);
- ``wsd`` (warm-up, stable, decay; Hu et al. 2024, MiniCPM): holds ``lr``, then decays over the
  last ``decay_fraction`` of all steps to ``lr x min_lr_ratio`` with the 1-sqrt shape
  ``lr_t = floor + (lr - floor) x (1 - sqrt(p))``, p going from 1/D to 1 over the D decay steps,
  so that the last step trains at the floor (Hägele et al. 2024, arXiv 2405.18392, found 1-sqrt
  ahead of linear decay);
- ``constant``: holds ``lr``.

The base's state: a base loaded from a Hone run's ``final/`` (``model.path = RUN/final``) still
has that run's ``checkpoints/``: its newest checkpoint holds AdamW's moments (loaded when
``train.reset_optimizer = false``) and ``RUN/metrics.jsonl`` the learning rate of its last step
(``train.warmup_from = "base"``). A Hugging Face Trainer checkpoint's ``trainer_state.json``
gives its last learning rate; its ``optimizer.pt`` is not read (its parameter order is the
Trainer's, not Hone's).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from hone.errors import HoneError
from hone.recipe import Recipe, TrainConfig
from hone.rundir import CHECKPOINTS_DIR, FINAL_DIR, METRICS_FILE, read_json
from hone.train.checkpoint import STATE_FILE, latest_checkpoint

__all__ = ["lr_at", "BaseState", "base_state", "state_of", "warmup_start", "use_base_optimizer"]


def lr_at(step: int, total: int, cfg: TrainConfig, start_lr: float = 0.0) -> float:
    """The learning rate of 0-based ``step`` of ``total`` under ``cfg.schedule``."""
    if step < cfg.warmup_steps:
        return start_lr + (cfg.lr - start_lr) * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total))
        decay_start = max(cfg.warmup_steps, total - decay_steps)
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step + 1 - decay_start) / max(1, total - decay_start))
        return floor + (cfg.lr - floor) * (1 - math.sqrt(progress))
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class BaseState:
    """What the base's own training left: its final learning rate and a checkpoint holding its
    optimizer state (either may be None), and where they came from, in words."""

    lr: float | None
    optimizer_dir: Path | None
    origin: str


def _hone_run_state(model_dir: Path) -> BaseState | None:
    """A Hone run's export ``RUN/final``: ``RUN/checkpoints``' newest checkpoint, and the learning
    rate ``RUN/metrics.jsonl`` logged at its step."""
    run = model_dir.parent
    if model_dir.name != FINAL_DIR:
        return None
    newest = latest_checkpoint(run / CHECKPOINTS_DIR, log=lambda m: None)
    if newest is None:
        return None
    step = int(read_json(newest / STATE_FILE)["step"])
    lr = None
    if (run / METRICS_FILE).is_file():
        for line in (run / METRICS_FILE).read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("step") == step:
                lr = float(row["lr"])
    return BaseState(lr, newest, f"the Hone run {run} (checkpoint {newest.name})")


def _hf_trainer_state(model_dir: Path) -> BaseState | None:
    """A Hugging Face Trainer checkpoint: the last learning rate in its log history."""
    path = model_dir / "trainer_state.json"
    if not path.is_file():
        return None
    try:
        history = read_json(path).get("log_history", [])
    except ValueError as e:
        raise HoneError(f"{path}: not readable as JSON ({e})") from None
    lrs = [float(row["learning_rate"]) for row in history if isinstance(row, dict) and "learning_rate" in row]
    return BaseState(lrs[-1] if lrs else None, None, f"the Trainer state {path}")


def base_state(recipe: Recipe) -> BaseState | None:
    """The recipe's base model's training state, when its directory has one (None otherwise)."""
    if recipe.model.source != "hf" or not recipe.model.path:
        return None
    return state_of(Path(recipe.model.path))


def state_of(model_dir: Path) -> BaseState | None:
    """The training state beside or inside an HF model directory: a Hone run's, a Trainer's, or None."""
    model_dir = Path(model_dir).resolve()
    return _hone_run_state(model_dir) or _hf_trainer_state(model_dir)


def warmup_start(cfg: TrainConfig, base: BaseState | None) -> tuple[float, str]:
    """The learning rate the warm-up starts from, and a phrase saying where it came from."""
    if cfg.warmup_from != "base":
        return float(cfg.warmup_from), f"warm-up from {float(cfg.warmup_from):g}"
    if base is not None and base.lr is not None:
        return base.lr, f"re-warm-up from the base's final learning rate {base.lr:g} ({base.origin})"
    return 0.0, "warm-up from 0 (train.warmup_from = \"base\", but the base has no training state with a learning rate)"


def use_base_optimizer(cfg: TrainConfig, base: BaseState | None, model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer) -> str:
    """Load the base's AdamW state into ``optimizer`` unless ``train.reset_optimizer`` (every rank
    calls this: DCP reads collectively); returns what was done, in words."""
    if cfg.reset_optimizer:
        kept = " (the base's optimizer state is not used)" if base is not None and base.optimizer_dir else ""
        return "optimizer: fresh AdamW" + kept
    if base is None or base.optimizer_dir is None:
        where = f" ({base.origin} holds none Hone reads)" if base is not None else ""
        return f"optimizer: fresh AdamW: train.reset_optimizer = false, but the base has no optimizer state{where}"
    # Keyed by parameter name, as Hone's checkpoints store it (hone.train.checkpoint._options).
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model.zero_grad(set_to_none=True)
    # The moments come from the base; the hyperparameters (betas, weight decay) stay this recipe's.
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    state = {"optim": get_optimizer_state_dict(model, optimizer, options=options)}
    try:
        dcp.load(state, checkpoint_id=str(base.optimizer_dir))
        set_optimizer_state_dict(model, optimizer, state["optim"], options=options)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a mismatch is the user's base, in one line
        raise HoneError(f"train.reset_optimizer = false: the optimizer state in {base.optimizer_dir} does not fit "
                        f"this model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for group, kept in zip(optimizer.param_groups, hyper):
        group.update(kept)
    return f"optimizer: AdamW state of {base.origin} (train.reset_optimizer = false)"
