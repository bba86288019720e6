"""Trainer speed options applied to a built model before training (issue 17): fused q/k/v and
gate/up projections, the SDPA backend order, float8 matmuls. Each returns what it did, for the
start line; none changes parameter names, so checkpoints and the HF export are unaffected."""

from __future__ import annotations

import torch
from torch import nn

from hone.errors import HoneError
from hone.model.llama import Llama, set_fused_projections
from hone.model.sdpa import pin_sdpa_backend
from hone.recipe import TrainConfig

FLOAT8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with float8 tensor cores


def _own_llama(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)
    return isinstance(inner, Llama) or any(type(m).__name__ == "DecoderLayer" for m in inner.modules())


def fuse_projections(model: nn.Module, cfg: TrainConfig, device: torch.device, tp: int = 1) -> str:
    """Turn fused projections on or off as ``train.fused_projections`` says (None: on with CUDA)."""
    want = cfg.fused_projections if cfg.fused_projections is not None else device.type == "cuda"
    source = "pinned by the recipe" if cfg.fused_projections is not None else f"default on {device.type}"
    if not _own_llama(model):
        return "fused projections off (not Hone's Llama)"
    if want and tp > 1:
        set_fused_projections(model, False)
        return "fused projections off (tp > 1 shards each projection)"
    refusal = set_fused_projections(model, want)
    if refusal:
        return f"fused projections off ({refusal})"
    return f"fused projections {'on' if want else 'off'} ({source})"


def check_float8(cfg: TrainConfig, device: torch.device) -> None:
    """A one-line error when ``train.float8`` cannot run here (checked before any work)."""
    if not cfg.float8:
        return
    if device.type != "cuda":
        raise HoneError(f"train.float8 = true needs a CUDA GPU of compute capability 8.9+ (this run is on "
                        f"{device.type}); set train.float8 = false")
    cap = torch.cuda.get_device_capability(device)
    if cap < FLOAT8_MIN_CAPABILITY:
        raise HoneError(f"train.float8 = true needs compute capability 8.9+ (Ada, Hopper); "
                        f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}: set train.float8 = false")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise HoneError("train.float8 = true needs torchao: pip install 'hone[float8]'") from None


def apply_float8(model: nn.Module, cfg: TrainConfig, device: torch.device) -> str | None:
    """float8 (tensorwise-scaled) training of the decoder layers' linear layers; the head and any
    layer whose sizes are not multiples of 16 stay in bf16 (float8 GEMMs need them)."""
    check_float8(cfg, device)
    if not cfg.float8:
        return None
    from torchao.float8 import convert_to_float8_training

    def keep(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and "lm_head" not in fqn \
            and module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(getattr(model, "module", model), module_filter_fn=keep)
    return "float8 matmuls on (torchao, decoder layers)"


def speed_options(model: nn.Module, cfg: TrainConfig, device: torch.device, tp: int = 1) -> str:
    """Apply all of the above; the start line's text."""
    parts = [fuse_projections(model, cfg, device, tp)]
    for note in (pin_sdpa_backend(device), apply_float8(model, cfg, device)):
        if note:
            parts.append(note)
    return ", ".join(parts)
