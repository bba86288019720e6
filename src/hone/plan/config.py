"""A parallel configuration (a pure value) and the planner's calibration constants."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from hone.errors import HoneError

# none; selective = Megatron's (attention core recomputed); op = torchtitan's per-op selective
# checkpointing (every second matmul and all element-wise ops recomputed); full = whole layers.
RECOMPUTE = ("none", "selective", "op", "full")


@dataclass(frozen=True)
class Config:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    recompute: str = "selective"
    zero: int = 1
    vpp: int = 1
    sequence_parallel: bool = True  # only meaningful when tp > 1

    def label(self) -> str:
        v = f",vpp={self.vpp}" if self.vpp > 1 else ""
        return (f"tp={self.tp},pp={self.pp},dp={self.dp},mb={self.micro_batch},recompute={self.recompute},"
                f"zero={self.zero}{v}")

    def as_dict(self) -> dict:
        return asdict(self)


_FIX_KEYS = {"tp": "tp", "pp": "pp", "dp": "dp", "mb": "micro_batch", "micro_batch": "micro_batch",
             "recompute": "recompute", "zero": "zero", "vpp": "vpp", "sp": "sequence_parallel"}


def parse_fix(spec: str) -> dict:
    """``tp=8,pp=8,dp=4,mb=1,recompute=full,zero=1,vpp=2`` -> partial config fields (validated types).
    recompute is one of none, selective, op, full."""
    out: dict = {}
    for part in (p for p in spec.split(",") if p.strip()):
        key, sep, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or key not in _FIX_KEYS:
            raise HoneError(f"--fix {spec!r}: bad item {part!r} (keys: tp, pp, dp, mb, recompute, zero, vpp, sp)")
        name = _FIX_KEYS[key]
        if name == "recompute":
            if val not in RECOMPUTE:
                raise HoneError(f"--fix: recompute must be one of {', '.join(RECOMPUTE)} (got {val!r})")
            out[name] = val
        elif name == "sequence_parallel":
            out[name] = val.lower() in ("1", "true", "yes", "on")
        else:
            try:
                out[name] = int(val)
            except ValueError:
                raise HoneError(f"--fix: {key} must be an integer (got {val!r})") from None
            if name == "zero" and not 0 <= out[name] <= 3:
                raise HoneError(f"--fix: zero must be 0..3 (got {out[name]})")
            if name != "zero" and out[name] < 1:
                raise HoneError(f"--fix: {key} must be at least 1 (got {out[name]})")
    return out


@dataclass(frozen=True)
class Constants:
    """Calibration constants: fitted on published runs (benchmarks/plan_accuracy.py) or measured."""

    eff_max: float = 0.57          # achieved / peak for large GEMMs in a training step (fitted, plan_accuracy.py)
    eff_half_width: float = 64.0   # per-GPU hidden width h/tp at which efficiency is half of eff_max (fitted)
    tp_overlap: float = 0.0        # fraction of TP collectives hidden behind compute
    dp_overlap: float = 0.8        # fraction of the last backward usable to hide the DP gradient reduce
    fsdp_overlap: float = 0.8      # fraction of a micro-batch's compute usable to hide FSDP gathers
    overhead_gib: float = 2.5      # CUDA context, NCCL and cuBLAS workspaces
    fragmentation: float = 0.08    # allocator slack on activations and transient buffers
    weight_bytes: float = 2.0      # bf16 weights
    grad_bytes: float = 4.0        # fp32 gradient accumulation (Megatron default)
    optim_bytes: float = 12.0      # fp32 master weights + Adam m and v
    logits_bytes: float = 6.0      # bf16 logits + fp32 copy for the loss, per vocab entry per token
    dp_comm_bytes: float = 2.0     # gradient reduce dtype (bf16)
    flash_attention: bool = True
    vocab_parallel: bool = True    # TP splits the embedding and LM head (Megatron); Hone's trainer keeps them whole
    # Measured by `hone plan calibrate` on Hone's own layer (0: the formulas above), bytes per
    # token per layer kept for the backward: without recompute, and under whole-layer recompute.
    act_bytes_per_token: float = 0.0
    ckpt_bytes_per_token: float = 0.0
    # ... and the extra bytes at the peak of a layer's backward, without and with recompute.
    backward_bytes_per_token: float = 0.0
    recompute_backward_bytes_per_token: float = 0.0

    @classmethod
    def hone_trainer(cls, **kw) -> "Constants":
        """What `hone train` holds per parameter: fp32 parameters (bf16 is only FSDP2's compute
        copy, gathered per layer), fp32 gradients, AdamW's two fp32 moments (the parameters are
        their own master copy); tensor parallel splits the decoder layers only."""
        return cls(weight_bytes=4.0, grad_bytes=4.0, optim_bytes=8.0, vocab_parallel=False).with_(**kw)

    def with_(self, **kw) -> "Constants":
        names = {f.name for f in fields(self)}
        bad = set(kw) - names
        if bad:
            raise HoneError(f"unknown planner constant {sorted(bad)[0]!r}")
        return replace(self, **kw)
