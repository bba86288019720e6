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
import math
import os
import struct
from pathlib import Path
from typing import Iterable

import torch
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

    def copy_into(self, name: str, index: tuple[slice, ...], out: torch.Tensor) -> None:
        """``out.copy_(self.read(name, index))``, which a file source does in bounded pieces."""
        out.copy_(self.read(name, index))

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


# The safetensors format's dtype names (little-endian, row-major)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# Rows of a tensor are read this many bytes at a time into the destination (bounded extra memory).
READ_CHUNK_BYTES = 32 << 20


class SafetensorsDir(WeightSource):
    """An HF directory's ``model.safetensors`` or its shards listed in ``model.safetensors.index.json``.

    Only the rows a slice needs are read, with ``pread`` in chunks of ``READ_CHUNK_BYTES`` straight
    into the destination: no memory map, whose touched pages would stay in the process's resident
    memory, and no copy of a whole tensor for a rank that holds a part of it."""

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
        self._fds: list[int] = []
        # tensor name -> (file, fd, dtype, shape, byte offset of its data)
        self._entries: dict[str, tuple[str, int, torch.dtype, tuple[int, ...], int]] = {}
        try:
            for f in files:
                self._read_header(f)
        except BaseException:
            self.close()
            raise

    def _read_header(self, f: Path) -> None:
        fd = os.open(f, os.O_RDONLY)
        self._fds.append(fd)
        try:
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, n, 8))
            for name, e in header.items():
                if name != "__metadata__":
                    self._entries[name] = (str(f), fd, SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"]),
                                           8 + n + e["data_offsets"][0])
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise HoneError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: e[3] for name, e in self._entries.items()}

    def _rows(self, name: str, first: int, last: int) -> torch.Tensor:
        """Rows ``first:last`` (dim 0) of a tensor, read from its file."""
        file, fd, dtype, shape, offset = self._entries[name]
        row = dtype.itemsize * math.prod(shape[1:])
        buf = bytearray(row * (last - first) if shape else dtype.itemsize)
        done, start = 0, offset + row * first
        while done < len(buf):
            got = os.preadv(fd, [memoryview(buf)[done:]], start + done)
            if got == 0:
                raise HoneError(f"{file}: tensor {name!r} is cut short (the file ends early)")
            done += got
        if not buf:
            return torch.empty((0, *shape[1:]), dtype=dtype)
        t = torch.frombuffer(buf, dtype=dtype)
        return t.view(last - first, *shape[1:]) if shape else t.view(())

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        if not index:  # a scalar
            return self._rows(name, 0, 1)
        return self._rows(name, index[0].start, index[0].stop)[(slice(None), *index[1:])]

    def copy_into(self, name: str, index: tuple[slice, ...], out: torch.Tensor) -> None:
        if not index:
            out.copy_(self._rows(name, 0, 1))
            return
        _, _, dtype, shape, _ = self._entries[name]
        first, last = index[0].start, index[0].stop
        step = max(1, READ_CHUNK_BYTES // max(1, dtype.itemsize * math.prod(shape[1:])))
        for i in range(first, last, step):
            j = min(last, i + step)
            out[i - first:j - first].copy_(self._rows(name, i, j)[(slice(None), *index[1:])])

    def file_of(self, name: str) -> str:
        return self._entries[name][0] if name in self._entries else self.where

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


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
def load_weights(model: nn.Module, source: WeightSource, whole: Iterable[str] | None = None) -> None:
    """Copy into each of the model's tensors (materialized) the part of the source's tensor of the
    same name that this rank holds, converting the dtype. A tensor missing from the source, one
    the model does not have, or a shape that differs is a one-line HoneError naming the file.
    ``whole``: every tensor name of the whole model, when ``model`` holds only part of it (a
    pipeline stage); the source's other tensors are then another stage's, not unexpected."""
    try:
        holders, aliases = _holders(model)
        shapes = source.shapes()
        names = {name: _source_name(name, aliases, shapes) for name in holders}
        missing = sorted(n for n, src in names.items() if src is None)
        if missing:
            raise HoneError(f"{source.where}: no tensor {missing[0]!r} (the model needs it; {len(missing)} missing)")
        known = set(whole) if whole is not None else set(holders) | set(aliases)
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
                source.copy_into(src, local_index(t), local)
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
