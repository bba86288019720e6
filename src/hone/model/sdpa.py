"""Which fused attention kernel ``F.scaled_dot_product_attention`` tries first on CUDA, set in
one place for the whole process (issue 17).

PyTorch picks the first backend in its priority order that accepts the inputs. On Hopper
(sm90+) cuDNN's attention is the fastest for training shapes, then FlashAttention-2; before
Hopper, flash first. Every backend stays in the list, so inputs one refuses (a GQA layout, a
mask, a head size) fall through to the next rather than failing; GQA reaches flash and cuDNN
as ``enable_gqa`` (Hone's Attention passes it on CUDA). ``HONE_SDPA`` = ``cudnn`` / ``flash`` /
``efficient`` / ``math`` puts that one first instead (for benchmarks). Nothing changes on a CPU.
"""

from __future__ import annotations

import os

import torch

from hone.errors import HoneError

ENV_SDPA = "HONE_SDPA"
_NAMES = ("cudnn", "flash", "efficient", "math")


def sdpa_order(capability: tuple[int, int], forced: str | None = None) -> list[str]:
    """Backend names, first tried first, for a GPU of compute ``capability`` (major, minor)."""
    order = ["cudnn", "flash", "efficient", "math"] if capability >= (9, 0) else ["flash", "cudnn", "efficient", "math"]
    if forced:
        if forced not in _NAMES:
            raise HoneError(f"{ENV_SDPA}={forced!r} is not one of {', '.join(_NAMES)}")
        order = [forced] + [n for n in order if n != forced]
    return order


def pin_sdpa_backend(device: torch.device) -> str | None:
    """Set the process's SDPA priority order for ``device`` (CUDA only); returns it as text for the
    start line, None on a CPU or a PyTorch without priority control."""
    if device.type != "cuda":
        return None
    from torch.nn.attention import SDPBackend

    setter = getattr(torch._C, "_set_sdp_priority_order", None)
    if setter is None:
        return None
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    order = sdpa_order(torch.cuda.get_device_capability(device), os.environ.get(ENV_SDPA) or None)
    torch.backends.cuda.enable_cudnn_sdp(True)
    torch.backends.cuda.enable_flash_sdp(True)
    priority = [int(backends[n]) for n in order]
    # Backends Hone does not name (PyTorch's "overrideable") keep their places after these.
    setter(priority + [int(b) for b in torch._C._get_sdp_priority_order() if int(b) not in priority])
    return "attention " + " > ".join(order)
