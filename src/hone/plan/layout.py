"""Where the trainer's parallel plan and the planner's configuration meet.

:class:`ParallelPlan` is what `hone train` applies (``hone.train.parallelize``): pp x dp x tp over
the processes, pipeline stages (1F1B / interleaved / GPipe), DDP or FSDP2, tensor (+ sequence)
parallelism, whole-layer activation checkpointing. :class:`hone.plan.config.Config`
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
from hone.plan.memory import stage_layout

__all__ = ["ParallelPlan", "fixed_fields", "stage_layers", "train_fields"]


def stage_layers(n_layers: int, pp: int, vpp: int = 1) -> list[range]:
    """The decoder layers of each of the ``pp * vpp`` pipeline stages, in stage order (stage ``s``
    runs on rank ``s % pp``): per rank, the planner's :func:`hone.plan.memory.stage_layout`
    (evenly; where the layers do not divide, fewer on the first and last ranks, which also hold
    the embedding and the head), split evenly between the rank's virtual stages. A stage with no
    layer can only be the first (embedding only) or the last (norm, head and loss only)."""
    per_rank = stage_layout(_Layers(n_layers), Config(1, pp, 1, 1, vpp=vpp))
    sizes = [0] * (pp * vpp)
    for r, total in enumerate(per_rank):
        base, extra = divmod(total, vpp)
        chunks = [base + (1 if j < extra else 0) for j in range(vpp)]
        if r == 0 and pp > 1:
            chunks.reverse()  # a short chunk of the first rank is stage 0, which also embeds
        for j, n in enumerate(chunks):
            sizes[j * pp + r] = n
    out, lo = [], 0
    for n in sizes:
        out.append(range(lo, lo + n))
        lo += n
    return out


class _Layers:
    """The one field of a model shape that :func:`hone.plan.memory.stage_layout` reads."""

    def __init__(self, layers: int) -> None:
        self.layers = layers


@dataclass(frozen=True, kw_only=True)
class ParallelPlan:
    dp: int = 1                                  # data-parallel degree
    tp: int = 1                                  # tensor-parallel degree
    pp: int = 1                                  # pipeline stages (ranks)
    pp_schedule: Literal["1f1b", "interleaved", "gpipe"] = "1f1b"
    vpp: int = 1                                 # virtual stages per pipeline rank (interleaved)
    sequence_parallel: bool = False              # with tp > 1
    data_parallel: Literal["fsdp", "ddp"] = "fsdp"
    activation_checkpointing: bool = False
    compile: bool = False
    mixed_precision: Literal["fp32", "bf16"] = "fp32"

    def validate(self, world_size: int, *, heads: int, kv_heads: int, ffn: int, batch_size: int,
                 layers: int | None = None, micro_batch: int = 0) -> None:
        if self.dp * self.tp * self.pp != world_size:
            raise HoneError(f"dp({self.dp}) * tp({self.tp}) * pp({self.pp}) = {self.dp * self.tp * self.pp} "
                            f"!= world_size {world_size}")
        for what, n in (("attention heads", heads), ("key/value heads", kv_heads), ("FFN size", ffn)):
            if n % self.tp:
                raise HoneError(f"tp={self.tp} does not divide {n} {what}")
        if batch_size % self.dp:
            raise HoneError(f"train.batch_size ({batch_size}) is not divisible by dp ({self.dp})")
        if self.pp > 1:
            self._validate_pipeline(batch_size // self.dp, layers, micro_batch)

    def _validate_pipeline(self, rows: int, layers: int | None, micro_batch: int) -> None:
        if self.vpp > 1 and self.pp_schedule != "interleaved":
            raise HoneError(f"train.vpp = {self.vpp} needs train.pp_schedule = \"interleaved\"")
        stages = self.pp * self.vpp
        if layers is not None and any(not r for r in stage_layers(layers, self.pp, self.vpp)[1:-1]):
            raise HoneError(f"train.pp ({self.pp}) x train.vpp ({self.vpp}) = {stages} pipeline stages for {layers} "
                            "layers: every stage but the first and last needs at least one layer")
        micro = micro_batch or rows
        chunks = rows // micro if rows % micro == 0 else 0
        if chunks < self.pp:
            raise HoneError(f"train.pp = {self.pp} needs at least {self.pp} micro-batches per step: train.batch_size "
                            f"/ dp = {rows} sequences per rank in micro-batches of train.micro_batch = {micro} "
                            f"give {rows / micro:g}")
        rounds = max(1, chunks // self.pp)
        if self.pp_schedule == "interleaved" and chunks % rounds:
            raise HoneError(f"train.pp_schedule = \"interleaved\" runs micro-batches in rounds of train.pp "
                            f"({self.pp}): {chunks} micro-batches per step is not a multiple of {rounds} rounds")
        if self.data_parallel != "fsdp" and self.dp > 1:
            raise HoneError(f"train.pp = {self.pp} with dp = {self.dp}: use train.data_parallel = \"fsdp\" (ddp has "
                            "no pipeline support here)")


def train_fields(config: Config | Mapping[str, Any]) -> dict:
    """The recipe's ``[train]`` layout fields (names as ``hone.recipe.TrainConfig``) for a planner
    configuration (a :class:`Config` or a plan record with its fields). `hone train` has no
    ZeRO-1/2 or selective recompute: ZeRO-3 is FSDP, anything less DDP (FSDP under a pipeline,
    which has no DDP); any recompute is whole-layer checkpointing (``hone.plan.commands.hone_train_notes``
    says where that differs). A pipeline with vpp > 1 is the interleaved 1F1B schedule, else 1F1B."""
    c = config.as_dict() if isinstance(config, Config) else config
    fields = {"micro_batch": c["micro_batch"], "tp": c["tp"], "pp": c["pp"],
              "data_parallel": "fsdp" if c["zero"] >= 3 or c["pp"] > 1 else "ddp",
              "activation_checkpointing": c["recompute"] != "none",
              "sequence_parallel": bool(c["sequence_parallel"]) and c["tp"] > 1}
    if c["pp"] > 1:
        fields |= {"pp_schedule": "interleaved" if c["vpp"] > 1 else "1f1b", "vpp": c["vpp"]}
    return fields


def fixed_fields(plan: ParallelPlan) -> dict:
    """The planner's configuration fields (all of :class:`Config`'s but the micro-batch) that the
    trainer's plan fixes: FSDP over more than one data-parallel rank is ZeRO-3 (else 0), activation
    checkpointing is full recompute; GPipe is planned as 1F1B (same bubble, more activations held)."""
    return {"tp": plan.tp, "pp": plan.pp, "dp": plan.dp,
            "recompute": "full" if plan.activation_checkpointing else "none",
            "zero": 3 if plan.data_parallel == "fsdp" and plan.dp > 1 else 0, "vpp": plan.vpp,
            "sequence_parallel": plan.sequence_parallel and plan.tp > 1}
