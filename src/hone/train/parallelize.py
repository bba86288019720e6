"""Apply parallelism to a single-device model from a plan value, in a fixed order:
pipeline split → tensor parallel → activation checkpointing → compile → data parallel (FSDP2 or DDP).

The model never reads the plan (STYLE.md rule 1); the plan is a pure value validated on
the CPU with the numbers in its error (:class:`hone.plan.layout.ParallelPlan`, where it meets
the planner's configuration).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from hone.errors import HoneError
from hone.model.weights import materialize
from hone.plan.layout import ParallelPlan
from hone.train.pipeline_parallel import Pipeline, split_stages


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object | None = None  # DeviceMesh with dims ("pp", "dp", "tp") when distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(plan: ParallelPlan, device_choice: str = "auto") -> DistContext:
    """Join the torchrun job (gloo on CPU, NCCL on GPU) and build the (pp, dp, tp) mesh."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device_choice != "cpu"
    if world == 1:
        return DistContext(device=torch.device("cuda" if use_cuda else "cpu"))
    from torch.distributed.device_mesh import init_device_mesh

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device_type = "cuda" if use_cuda else "cpu"
    mesh = init_device_mesh(device_type, (plan.pp, plan.dp, plan.tp), mesh_dim_names=("pp", "dp", "tp"))
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    return DistContext(rank=dist.get_rank(), world_size=world, local_rank=local, device=device, mesh=mesh)


def on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks the model holds: Hone's Llama's ``model.layers`` (less those a
    pipeline split deleted), the transformers backend's ``decoder_layers``."""
    return [layer for layer in getattr(model, "decoder_layers", None) or model.model.layers if layer is not None]


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool = False,
                          runs: list[list[nn.Module]] | None = None) -> None:
    """Megatron-style: column-parallel q/k/v and gate/up, row-parallel o and down. With sequence
    parallelism the norms and the residual stream between them are split along the sequence over
    the tp ranks: all-gather before attention / MLP, reduce-scatter after (torch's SequenceParallel
    and Shard(1) layouts). ``runs``: the consecutive layers each forward goes through (the model's,
    or each pipeline stage's); the sequence is split as a run starts and gathered as it ends, so
    embeddings, final norm and head see whole sequences as without it."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    if getattr(model, "backend", "hone") != "hone":  # fused qkv / gate_up, q/k norms, experts: no one plan fits
        raise HoneError(f"train.tp = {tp_mesh.size()}: the {model.backend} backend (model_type "
                        f"{getattr(model.config, 'model_type', '?')!r}) has no tensor-parallel plan; use train.tp = 1 "
                        "(FSDP2 or DDP over every process)")
    if any(getattr(layer.self_attn, "q_norm", None) is not None for layer in decoder_layers(model)):
        # Each rank holds some heads; the replicated q/k norm weights would need their gradients
        # summed over the tp group, which this plan does not do yet.
        raise HoneError(f"train.tp = {tp_mesh.size()}: Qwen3's q/k norms are not tensor-parallel yet; use train.tp = 1 "
                        "(FSDP2 or DDP over every process)")
    out = Shard(1) if sequence_parallel else Replicate()
    for layer in decoder_layers(model):
        plan = {
            "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(output_layouts=out),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=out),
        }
        if sequence_parallel:
            plan |= {"input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
                     # (x, cos, sin, cache, doc_mask): only the hidden states change layout
                     "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                                     desired_input_layouts=(Replicate(), None, None, None, None)),
                     "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))}
        parallelize_module(layer, tp_mesh, plan)
    if sequence_parallel:
        for run in runs if runs is not None else [decoder_layers(model)]:
            if run:
                run[0].register_forward_pre_hook(_split_sequence(tp_mesh))
                run[-1].register_forward_hook(_gather_sequence(tp_mesh))


def _split_sequence(tp_mesh):
    """Forward pre-hook: the whole sequence (the same on every tp rank) -> this rank's slice."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def hook(_module, args):
        x = args[0]
        if x.shape[1] % tp_mesh.size():
            raise HoneError(f"train.sequence_parallel: the sequence length {x.shape[1]} is not divisible by "
                            f"train.tp ({tp_mesh.size()})")
        whole = DTensor.from_local(x, tp_mesh, [Replicate()], run_check=False)
        return (whole.redistribute(tp_mesh, [Shard(1)]).to_local(), *args[1:])
    return hook


def _gather_sequence(tp_mesh):
    """Forward hook: this rank's slice of the sequence -> the whole sequence (all-gather)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def hook(_module, _args, out):
        return DTensor.from_local(out, tp_mesh, [Shard(1)], run_check=False).redistribute(
            tp_mesh, [Replicate()]).to_local()
    return hook


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Full recompute of every decoder layer (parameter names unchanged; the transformers
    backend turns this switch into transformers' own per-layer recompute)."""
    model.model.activation_checkpointing = True


def apply_fsdp(model: nn.Module, dp_mesh, mixed_precision: str, roots: list[nn.Module] | None = None) -> None:
    """One FSDP2 unit per decoder layer, then the roots: the model, or each pipeline stage."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp)
    # The root unit holds embeddings, final norm and the (possibly tied) head.
    for root in roots or [model]:
        fully_shard(root, mesh=dp_mesh, mp_policy=mp)


def parallelize(model: nn.Module, plan: ParallelPlan, ctx: DistContext,
                load: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Return the model wrapped as the plan says (the same object when nothing applies). Under a
    pipeline the model keeps only its stages' parts and carries their schedule as ``model.pipeline``
    (:class:`hone.train.pipeline_parallel.Pipeline`), which the training loop runs.

    A model built on the meta device is split and sharded there, then, given ``load``, materialized
    on the device (each rank allocates only its shards: :func:`hone.model.weights.materialize`) and
    ``load`` fills it, before DDP (which broadcasts real weights) wraps it. Without ``load`` it
    stays on the meta device and is not wrapped in DDP (`hone train --dry-run` counts its bytes)."""
    meta = on_meta(model)
    stages = split_stages(model, plan, ctx.mesh["pp"].get_local_rank()) if plan.pp > 1 else None
    if not meta:
        model.to(ctx.device)
    if plan.tp > 1:
        runs = [list(stage.layers) for stage in stages] if stages is not None else None
        apply_tensor_parallel(model, ctx.mesh["tp"], plan.sequence_parallel, runs)
    if plan.activation_checkpointing:
        apply_activation_checkpointing(model)
    if plan.compile:
        for layer in decoder_layers(model):
            layer.compile()
    if stages is not None and plan.dp > 1:
        apply_fsdp(model, ctx.mesh["dp"], plan.mixed_precision, roots=stages)
    elif plan.dp > 1 and plan.data_parallel == "fsdp":
        apply_fsdp(model, ctx.mesh["dp"], plan.mixed_precision)
    if meta and load is not None:
        materialize(model, ctx.device)
        load(model)
    if stages is not None and not on_meta(model):
        # After materializing: the schedule keeps the tied tensor itself, which materialize replaces.
        model.pipeline = Pipeline(stages, plan, ctx.mesh, ctx.device, tied=model.config.tie_word_embeddings)
    elif plan.dp > 1 and plan.data_parallel == "ddp" and not on_meta(model):
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, process_group=ctx.mesh["dp"].get_group(),
                    device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    return model
