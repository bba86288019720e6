"""Apply parallelism to a single-device model from a plan value, in a fixed order:
tensor parallel → activation checkpointing → compile → data parallel (FSDP2 or DDP).

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


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object | None = None  # DeviceMesh with dims ("dp", "tp") when distributed

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
    """Join the torchrun job (gloo on CPU, NCCL on GPU) and build the (dp, tp) mesh."""
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
    mesh = init_device_mesh(device_type, (plan.dp, plan.tp), mesh_dim_names=("dp", "tp"))
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    return DistContext(rank=dist.get_rank(), world_size=world, local_rank=local, device=device, mesh=mesh)


def on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated decoder blocks: Hone's Llama's ``model.layers``, the transformers backend's ``decoder_layers``."""
    return getattr(model, "decoder_layers", None) or model.model.layers


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Megatron-style: column-parallel q/k/v and gate/up, row-parallel o and down."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if getattr(model, "backend", "hone") != "hone":  # fused qkv / gate_up, q/k norms, experts: no one plan fits
        raise HoneError(f"train.tp = {tp_mesh.size()}: the {model.backend} backend (model_type "
                        f"{getattr(model.config, 'model_type', '?')!r}) has no tensor-parallel plan; use train.tp = 1 "
                        "(FSDP2 or DDP over every process)")
    if any(getattr(layer.self_attn, "q_norm", None) is not None for layer in model.model.layers):
        # Each rank holds some heads; the replicated q/k norm weights would need their gradients
        # summed over the tp group, which this plan does not do yet.
        raise HoneError(f"train.tp = {tp_mesh.size()}: Qwen3's q/k norms are not tensor-parallel yet; use train.tp = 1 "
                        "(FSDP2 or DDP over every process)")
    for layer in model.model.layers:
        parallelize_module(layer, tp_mesh, {
            "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        })


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Full recompute of every decoder layer (parameter names unchanged; the transformers
    backend turns this switch into transformers' own per-layer recompute)."""
    model.model.activation_checkpointing = True


def apply_fsdp(model: nn.Module, dp_mesh, mixed_precision: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp)
    # The root unit holds embeddings, final norm and the (possibly tied) head.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def parallelize(model: nn.Module, plan: ParallelPlan, ctx: DistContext,
                load: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Return the model wrapped as the plan says (the same object when nothing applies).

    A model built on the meta device is sharded there, then, given ``load``, materialized on the
    device (each rank allocates only its shards: :func:`hone.model.weights.materialize`) and
    ``load`` fills it, before DDP (which broadcasts real weights) wraps it. Without ``load`` it
    stays on the meta device and is not wrapped in DDP (`hone train --dry-run` counts its bytes)."""
    meta = on_meta(model)
    if not meta:
        model.to(ctx.device)
    if plan.tp > 1:
        apply_tensor_parallel(model, ctx.mesh["tp"])
    if plan.activation_checkpointing:
        apply_activation_checkpointing(model)
    if plan.compile:
        for layer in decoder_layers(model):
            layer.compile()
    if plan.dp > 1 and plan.data_parallel == "fsdp":
        apply_fsdp(model, ctx.mesh["dp"], plan.mixed_precision)
    if meta and load is not None:
        materialize(model, ctx.device)
        load(model)
    if plan.dp > 1 and plan.data_parallel == "ddp" and not on_meta(model):
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, process_group=ctx.mesh["dp"].get_group(),
                    device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    return model
