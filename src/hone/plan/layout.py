"""Where the trainer's parallel plan and the planner's configuration meet.

:class:`ParallelPlan` is what `hone train` applies (``hone.train.parallelize``): dp x tp over
the processes, DDP or FSDP2, whole-layer activation checkpointing. :class:`hone.plan.config.Config`
is what the planner searches (tp, pp, dp, micro-batch, recompute, ZeRO stage, ...). The two
mappings between them live here and nowhere else:

* :func:`train_fields`: a planner configuration -> the recipe's ``[train]`` layout fields
  (what ``hone plan`` prints for `hone train`);
* :func:`fixed_fields`: the trainer's plan -> the planner's configuration fields it fixes
  (what the supervisor's re-planning evaluates).

A pure module: no torch, validated on the CPU with the numbers in its errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

from hone.errors import HoneError
from hone.plan.config import Config

__all__ = ["ParallelPlan", "fixed_fields", "train_fields"]


@dataclass(frozen=True, kw_only=True)
class ParallelPlan:
    dp: int = 1                                  # data-parallel degree
    tp: int = 1                                  # tensor-parallel degree
    data_parallel: Literal["fsdp", "ddp"] = "fsdp"
    activation_checkpointing: bool = False
    compile: bool = False
    mixed_precision: Literal["fp32", "bf16"] = "fp32"

    def validate(self, world_size: int, *, heads: int, kv_heads: int, ffn: int, batch_size: int) -> None:
        if self.dp * self.tp != world_size:
            raise HoneError(f"dp({self.dp}) * tp({self.tp}) = {self.dp * self.tp} != world_size {world_size}")
        for what, n in (("attention heads", heads), ("key/value heads", kv_heads), ("FFN size", ffn)):
            if n % self.tp:
                raise HoneError(f"tp={self.tp} does not divide {n} {what}")
        if batch_size % self.dp:
            raise HoneError(f"train.batch_size ({batch_size}) is not divisible by dp ({self.dp})")


def train_fields(config: Config | Mapping[str, Any]) -> dict:
    """The recipe's ``[train]`` layout fields (names as ``hone.recipe.TrainConfig``) for a planner
    configuration (a :class:`Config` or a plan record with its fields). `hone train` has no
    pipeline, ZeRO-1/2 or selective recompute: ZeRO-3 is FSDP, anything less DDP; any recompute
    is whole-layer checkpointing (``hone.plan.commands.hone_train_notes`` says where that differs)."""
    c = config.as_dict() if isinstance(config, Config) else config
    return {"micro_batch": c["micro_batch"], "tp": c["tp"], "data_parallel": "fsdp" if c["zero"] >= 3 else "ddp",
            "activation_checkpointing": c["recompute"] != "none"}


def fixed_fields(plan: ParallelPlan) -> dict:
    """The planner's configuration fields (all of :class:`Config`'s but the micro-batch) that the
    trainer's plan fixes: no pipeline or sequence parallelism, FSDP over more than one data-parallel
    rank is ZeRO-3 (else 0), activation checkpointing is full recompute."""
    return {"tp": plan.tp, "pp": 1, "dp": plan.dp, "recompute": "full" if plan.activation_checkpointing else "none",
            "zero": 3 if plan.data_parallel == "fsdp" and plan.dp > 1 else 0, "vpp": 1, "sequence_parallel": False}
