"""The pieces that keep the training loop free of host syncs in its steady state (issue 17).

A step's numbers (per-sequence losses, gradient norm) go to the host by a non-blocking copy
into pinned memory, read one step later, while the GPU runs the next step's forward and
backward; a non-finite gradient norm skips the optimizer step on the device itself (the fused
AdamW's ``found_inf``), so the host never waits to decide it. On a CPU every copy is already
synchronous, and these helpers do what the plain loop did.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch tensor on ``device``: on CUDA through pinned memory, copied asynchronously (the
    host goes on preparing the next step while the copy runs); elsewhere a plain ``.to``."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` can skip itself on a device-side flag (fused Adam / AdamW)."""
    return bool(optimizer.defaults.get("fused")) and getattr(optimizer, "_step_supports_amp_scaling", False)


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> bool | None:
    """``optimizer.step()`` unless ``grad_norm`` is NaN/inf. With a fused optimizer the test stays
    on the device (returns None: the host does not know yet); otherwise it reads the norm (a sync,
    free on a CPU) and returns whether the step was taken."""
    if takes_found_inf(optimizer):
        # The fused kernel leaves parameters, moments and step counts as they were when found_inf is 1.
        optimizer.found_inf = (~torch.isfinite(grad_norm.detach().float())).float().reshape(())
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return None
    if not torch.isfinite(grad_norm).item():
        return False
    optimizer.step()
    return True


class HostCopy:
    """A device tensor's values on their way to the host: pinned buffer + CUDA event on a GPU,
    the tensor itself elsewhere. ``values()`` waits for this copy only (not for later work)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.event = None
        if t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = t.detach()

    def values(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host
