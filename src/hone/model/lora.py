"""LoRA on either model backend: adapters on the blocks' linear layers, the rest frozen
(optionally the embeddings / LM head trained whole), the merged model and PEFT's adapter format.

    lines = apply_lora(model, recipe.train.lora, seed=0)   # replaces the targeted nn.Linear in place
    init_lora(model, seed=0)                               # A: PEFT's kaiming init, B: zeros (real device)
    save_adapter(model, cfg, Path("final-adapter"))        # adapter_config.json + adapter_model.safetensors
    merge_lora(model)                                      # back to plain nn.Linear, W + s B A

A :class:`LoRALinear` *is* an ``nn.Linear`` (its base ``weight`` / ``bias`` keep their names, so
the base's weights load by name as before) with two children ``lora_A`` / ``lora_B`` whose names,
under ``base_model.model.``, are exactly PEFT's keys. The adapters are built wherever the model is
(the meta device too, before FSDP2 shards them); their initial values come from a seeded
generator per module name, so 1 process and N processes start from the same adapters.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from hone.errors import HoneError
from hone.model.weights import WeightSource
from hone.recipe import LoraConfig
from hone.rundir import atomic_dir, write_json

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoRALinear(nn.Linear):
    """``y = x W^T + b + scaling * B(A(dropout(x)))`` with ``W``, ``b`` frozen."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)  # the base's own tensors, under the same names
        self.register_parameter("bias", base.bias)
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight)


def scaling(cfg: LoraConfig) -> float:
    return cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks: the transformers backend's ``decoder_layers``, Hone's Llama's ``model.layers``."""
    layers = getattr(model, "decoder_layers", None) or model.model.layers
    return [layer for layer in layers if layer is not None]


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside a decoder block, by its name in the model."""
    blocks = {id(b) for b in _blocks(model)}
    prefixes = [name + "." for name, m in model.named_modules() if id(m) in blocks]
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(name.startswith(p) for p in prefixes)}


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a target name: the module's whole name or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def select_targets(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """The block linears ``targets`` names (all when empty); a target matching none is an error."""
    linears = block_linears(model)
    if not targets:
        return linears
    for t in targets:
        if not any(_matches(name, t) for name in linears):
            leaves = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in linears}))
            raise HoneError(f"train.lora.targets: {t!r} matches no linear layer of the model's blocks "
                            f"(they are: {leaves})")
    return {name: m for name, m in linears.items() if any(_matches(name, t) for t in targets)}


def embedding_names(model: nn.Module) -> tuple[str, str]:
    """Parameter names of the input embedding matrix and of the LM head's weight (the same
    tensor under two names when they are tied)."""
    emb = model.hf_model.get_input_embeddings() if hasattr(model, "hf_model") else model.model.embed_tokens
    first = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    return first[id(emb.weight)], first[id(model.lm_head.weight)]


def apply_lora(model: nn.Module, cfg: LoraConfig) -> str:
    """Freeze ``model``, put adapters on the targeted linears and unfreeze what trains; return a
    line saying what trains. ``model.lr_scales`` (parameter name -> factor of the learning rate)
    gives the trained embedding / head their ``embedding_lr_ratio``."""
    chosen = select_targets(model, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    s = scaling(cfg)
    for name, linear in chosen.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, LoRALinear(linear, cfg.r, s, cfg.dropout))
    emb_name, head_name = embedding_names(model)
    whole = list(dict.fromkeys([emb_name] * cfg.train_embeddings + [head_name] * cfg.train_lm_head))
    for name in whole:
        model.get_parameter(name).requires_grad_(True)
    model.lr_scales = {name: cfg.embedding_lr_ratio for name in whole}
    model.lora_config = cfg
    adapters = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in lora_modules(model).values())
    trained = adapters + sum(model.get_parameter(n).numel() for n in whole)
    total = sum(p.numel() for p in model.parameters())
    return (f"lora: r {cfg.r}, alpha {cfg.alpha:g} (scale {s:.4g}{', rslora' if cfg.rslora else ''}) on "
            f"{len(chosen)} linear layers ({', '.join(target_leaves(model))})"
            + (f", whole: {', '.join(whole)} at {cfg.embedding_lr_ratio:g} x lr" if whole else "")
            + f"; {trained / 1e6:.2f}M of {total / 1e6:.1f}M parameters train ({trained / total:.2%})")


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def target_leaves(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in lora_modules(model)})


def lora_init_tensors(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Initial adapters as PEFT makes them (A: kaiming-uniform with a = sqrt(5), B: zeros), whole, on
    the CPU, from a generator seeded by ``seed`` and the module's name: the same on every rank."""
    out = {}
    for name, m in lora_modules(model).items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform_(a=sqrt(5)) on a (r, in) matrix
        a = torch.rand(m.lora_A.weight.shape, generator=g) * (2 * bound) - bound
        out[f"{name}.lora_A.weight"] = a
        out[f"{name}.lora_B.weight"] = torch.zeros(m.lora_B.weight.shape)
    return out


@torch.no_grad()
def init_lora(model: nn.Module, seed: int) -> None:
    """Set the adapters of a model on a real device (not sharded) to their initial values."""
    for name, t in lora_init_tensors(model, seed).items():
        model.get_parameter(name).copy_(t)


class WithLoRAInit(WeightSource):
    """The base's weights plus the adapters' initial values: one source for
    :func:`hone.model.weights.load_weights` (which fills every rank's shards by name)."""

    def __init__(self, base: WeightSource, init: dict[str, torch.Tensor]) -> None:
        self.base, self.init, self.where = base, init, base.where

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {**self.base.shapes(), **{k: tuple(v.shape) for k, v in self.init.items()}}

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self.init[name][index] if name in self.init else self.base.read(name, index)

    def copy_into(self, name: str, index: tuple[slice, ...], out: torch.Tensor) -> None:
        if name in self.init:
            out.copy_(self.init[name][index])
        else:
            self.base.copy_into(name, index, out)

    def file_of(self, name: str) -> str:
        return "LoRA init" if name in self.init else self.base.file_of(name)

    def close(self) -> None:
        self.base.close()


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's keys -> tensors (fp32, contiguous, CPU): every adapter, plus the embeddings / head
    trained whole (PEFT's ``modules_to_save``, saved under the module's own name)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
    for name in getattr(model, "lr_scales", {}):
        out[PEFT_PREFIX + name] = model.get_parameter(name)
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def adapter_config(model: nn.Module, cfg: LoraConfig, base_path: str | None) -> dict:
    """PEFT's adapter_config.json (the fields PEFT reads; it fills the rest with its defaults)."""
    modules = [name.rsplit(".", 2)[-2] for name in getattr(model, "lr_scales", {})]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
            "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
            "target_modules": target_leaves(model), "modules_to_save": modules or None, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_dora": False}


def save_adapter(model: nn.Module, cfg: LoraConfig, outdir: Path, base_path: str | None = None) -> Path:
    """``outdir`` as ``peft.PeftModel.from_pretrained(base, outdir)`` reads it; swapped in atomically."""
    with atomic_dir(Path(outdir)) as tmp:
        save_file(adapter_tensors(model), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / ADAPTER_CONFIG, adapter_config(model, cfg, base_path))
    return Path(outdir)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + scaling B A) and put plain ``nn.Linear``
    modules back: the model transformers loads with no adapter code. In place; returns ``model``."""
    for name, m in lora_modules(model).items():
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight = nn.Parameter(m.merged_weight().detach().clone())
        if m.bias is not None:
            plain.bias = nn.Parameter(m.bias.detach().clone())
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    model.lr_scales = {}
    return model


def with_lora_init(model: nn.Module, source: WeightSource, seed: int) -> WeightSource:
    """``source`` plus the initial values of ``model``'s adapters, if it has any."""
    return WithLoRAInit(source, lora_init_tensors(model, seed)) if lora_modules(model) else source


def has_frozen(model: nn.Module) -> bool:
    """Whether some parameters do not train (LoRA): checkpoints then hold only the ones that do."""
    return any(not p.requires_grad for p in model.parameters())
