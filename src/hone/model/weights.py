"""Weights by fully-qualified name into a model built on the meta device.

The model is built on ``meta`` (no memory), parallelized (its parameters become DTensors
where tensor parallel or FSDP2 split them), materialized with :func:`materialize`, then
:func:`load_weights` copies into every parameter and persistent buffer the part this rank
holds, read from a :class:`WeightSource`: an HF directory's safetensors (one file, or shards
with ``model.safetensors.index.json``), read slice by slice so a rank never holds a tensor it
does not own, or tensors already in memory (a GGUF file, a random init: small models).

    with torch.device("meta"):
        model = Llama(cfg)
    model = parallelize(model, plan, ctx)          # FSDP2 / TP on the meta device
    materialize(model, ctx.device)
    load_weights(model, SafetensorsDir(path))      # each rank reads only its slices
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from hone.errors import HoneError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class WeightSource:
    """Tensors by name: their global shapes, and any rectangular slice of one."""

    where: str  # the file (or what) the tensors come from, for error messages

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        raise NotImplementedError

    def file_of(self, name: str) -> str:
        return self.where

    def close(self) -> None:
        pass


class TensorDict(WeightSource):
    """Tensors already in memory (GGUF, random init, a reference model's state dict)."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        self.tensors, self.where = tensors, where

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self.tensors[name][index]


class SafetensorsDir(WeightSource):
    """An HF directory's ``model.safetensors`` or its shards listed in ``model.safetensors.index.json``;
    files are memory-mapped and only the slices asked for are read."""

    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        single, index = path / SINGLE_FILE, path / INDEX_FILE
        if single.is_file():
            files = [single]
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise HoneError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            files = [path / f for f in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise HoneError(f"{f}: file not found (listed in {index.name})")
        else:
            raise HoneError(f"{single}: file not found (nor {index.name}; only safetensors weights are read)")
        self.where = str(single if single.is_file() else index)
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}  # tensor name -> open file
        self._files: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            try:
                handle = self._stack.enter_context(safe_open(str(f), framework="pt"))
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise HoneError(f"{f}: not a readable safetensors file ({e})") from None
            for name in handle.keys():
                self._handles[name], self._files[name] = handle, str(f)
                self._shapes[name] = tuple(handle.get_slice(name).get_shape())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        sl = self._handles[name].get_slice(name)
        return sl[index] if index else sl[:]

    def file_of(self, name: str) -> str:
        return self._files.get(name, self.where)

    def close(self) -> None:
        self._stack.close()


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Give a model built on the meta device (possibly parallelized) real, uninitialized storage on
    ``device``, and recompute the buffers derived from its config (RoPE tables), which are no
    weights: :func:`load_weights` fills the rest."""
    tied = _tied_parameters(model)
    model.to_empty(device=device)
    for first, *others in tied:  # to_empty gives each module its own new tensor: tie them again
        shared = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)
    _restore_derived_buffers(model, torch.device(device))
    return model


def _tied_parameters(model: nn.Module) -> list[list[str]]:
    """Names of each parameter that more than one module holds (a tied embedding and head)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _restore_derived_buffers(model: nn.Module, device: torch.device) -> None:
    body = getattr(model, "model", None)
    if hasattr(body, "reset_rope"):  # Hone's Llama: cos/sin tables
        body.reset_rope(device)
        return
    hf = getattr(model, "hf_model", None)
    if hf is not None:  # transformers: its own initializer recomputes rotary inv_freq (non-persistent buffers)
        for module in hf.modules():
            non_persistent = getattr(module, "_non_persistent_buffers_set", ())
            if any(name in non_persistent for name, _ in module.named_buffers(recurse=False)):
                hf._init_weights(module)


def _holders(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every parameter and persistent buffer by FQN, each tensor once (a tied head is the
    embedding under a second name: it is listed under its first name only), and the second
    names (alias -> first name)."""
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            aliases[name] = seen[id(t)]
            continue
        seen[id(t)] = name
        out[name] = t
    return out, aliases


def names_match(model: nn.Module, source: WeightSource) -> bool:
    """Whether the source has a tensor for each of the model's (transformers renames or fuses some
    families' tensors on load, e.g. Mixtral's experts: their files do not match their modules)."""
    holders, aliases = _holders(model)
    shapes = source.shapes()
    return all(_source_name(name, aliases, shapes) is not None for name in holders)


def local_index(t: torch.Tensor) -> tuple[slice, ...]:
    """The slice of the global tensor this rank holds: all of a plain tensor, this rank's shard of
    a DTensor (FSDP2's dim-0 chunk, TP's row or column block, or both)."""
    if not isinstance(t, DTensor):
        return tuple(slice(0, n) for n in t.shape)
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def load_weights(model: nn.Module, source: WeightSource) -> None:
    """Copy into each of the model's tensors (materialized) the part of the source's tensor of the
    same name that this rank holds, converting the dtype. A tensor missing from the source, one
    the model does not have, or a shape that differs is a one-line HoneError naming the file."""
    try:
        holders, aliases = _holders(model)
        shapes = source.shapes()
        names = {name: _source_name(name, aliases, shapes) for name in holders}
        missing = sorted(n for n, src in names.items() if src is None)
        if missing:
            raise HoneError(f"{source.where}: no tensor {missing[0]!r} (the model needs it; {len(missing)} missing)")
        known = set(holders) | set(aliases)
        extra = sorted(set(shapes) - known)
        if extra:
            raise HoneError(f"{source.file_of(extra[0])}: tensor {extra[0]!r} is not in the model "
                            f"({len(extra)} unexpected; does config.json fit the weights?)")
        for name, t in holders.items():
            src = names[name]
            if tuple(shapes[src]) != tuple(t.shape):
                raise HoneError(f"{source.file_of(src)}: tensor {src!r} has shape {tuple(shapes[src])}, the model "
                                f"wants {tuple(t.shape)}")
            local = t.to_local() if isinstance(t, DTensor) else t
            if local.numel():
                local.copy_(source.read(src, local_index(t)))
    finally:
        source.close()
    _after_load(model)


def _source_name(name: str, aliases: dict[str, str], shapes: dict) -> str | None:
    """The source's name for a model tensor: its own, else that of a tensor tied to it."""
    if name in shapes:
        return name
    tied = [alias for alias, first in aliases.items() if first == name and alias in shapes]
    return tied[0] if tied else None


def _after_load(model: nn.Module) -> None:
    """The transformers backend decides whether its fused loss matches transformers' head by a
    probe forward, which needs real weights: run it now, every rank alike. Under FSDP2 the probe
    goes around the root module, so one forward through it first sets FSDP up (lazily, as the
    first step would), and the shards are gathered for the probe."""
    if not hasattr(model, "fused_head") or not hasattr(model, "hf_model"):
        return
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    was = model.training
    model.eval()
    try:
        if sharded:
            with torch.no_grad():
                model(torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device))
            for m in sharded:
                m.unshard()
        model.fused_head = model._head_matches()  # noqa: SLF001
    finally:
        for m in sharded:
            m.reshard()
        model.train(was)
