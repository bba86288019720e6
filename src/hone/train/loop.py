"""The training loop: AdamW, warm-up + cosine schedule, per-domain loss, metrics.jsonl, a
dense progress line, and resumable DCP checkpoints.

One code path for 1 process and for N under torchrun: every rank builds the same global
batch from the deterministic mixture loader and keeps its data-parallel slice of rows, so
N processes see exactly the data 1 process sees, and the logged losses are the global ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hone.recipe import TrainConfig
from hone.rundir import append_jsonl, ensure_dir
from hone.train.checkpoint import latest_checkpoint, resume_from_newest, save_checkpoint
from hone.train.data import MixtureLoader
from hone.train.parallelize import DistContext

__all__ = ["train", "lr_at", "latest_checkpoint"]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr`` then cosine decay to ``cfg.lr * cfg.min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget metric lines past the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().split("\n") if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=tuple(cfg.betas))


def _gather_rows(per_seq: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """All ranks' per-sequence losses in global row order (tp ranks hold copies)."""
    if not ctx.distributed:
        return per_seq
    parts = [torch.empty_like(per_seq) for _ in range(ctx.world_size)]
    dist.all_gather(parts, per_seq)
    dp_group = ctx.mesh["dp"]
    ranks = dp_group.mesh.flatten().tolist() if hasattr(dp_group, "mesh") else list(range(ctx.world_size))
    # Global rank of dp index i along this rank's dp dimension.
    return torch.cat([parts[r] for r in ranks])


def _batch_digest(inputs: torch.Tensor) -> str:
    return hashlib.sha1(inputs.numpy().tobytes()).hexdigest()[:12]


def train(model: torch.nn.Module, loader: MixtureLoader, cfg: TrainConfig, workdir: Path, *,
          total_steps: int, resume: bool = False, max_steps: int | None = None,
          ctx: DistContext | None = None, log: Callable[[str], None] = print) -> dict:
    """Train ``model`` (already parallelized for ``ctx``) for ``total_steps`` or until ``max_steps``."""
    ctx = ctx or DistContext(device=next(model.parameters()).device)
    workdir = ensure_dir(Path(workdir)) if ctx.is_main else Path(workdir)
    ctx.barrier()
    ckpt_root = workdir / "checkpoints"
    metrics_path = workdir / "metrics.jsonl"
    say = log if ctx.is_main else (lambda m: None)
    optimizer = make_optimizer(model, cfg)
    start = resume_from_newest(ckpt_root, model, optimizer, loader, say) if resume else 0
    if ctx.is_main:
        if not resume and metrics_path.exists():
            metrics_path.unlink()
        _truncate_metrics(metrics_path, start)
    stop = min(total_steps, max_steps) if max_steps else total_steps
    seq_len = next(iter(loader.streams.values())).seq_len
    tokens_per_step = loader.batch_size * seq_len
    dp = ctx.mesh["dp"].size() if ctx.mesh is not None else 1
    rows = loader.batch_size // dp
    lo = ctx.dp_rank() * rows
    n_params = sum(p.numel() for p in model.parameters())
    say(f"train: {n_params / 1e6:.1f}M params | {tokens_per_step} tokens/step ({rows} seqs x {dp} dp) | "
        f"{total_steps} steps = {total_steps * tokens_per_step:,} tokens | domain ratio {loader.ratio:.2f} | "
        f"lr {cfg.lr:g} | world {ctx.world_size} | threads {torch.get_num_threads()}")
    model.train()
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if cfg.mixed_precision == "bf16" \
        else contextlib.nullcontext()
    t0, last = time.perf_counter(), {}
    for step in range(start, stop):
        lr = lr_at(step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets, names = loader.next_batch()
        digest = _batch_digest(inputs)
        x, y = inputs[lo:lo + rows].to(ctx.device), targets[lo:lo + rows].to(ctx.device)
        with autocast:
            logits = model(x)
        per_token = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        per_seq = per_token.view(y.shape).mean(dim=1)
        loss = per_seq.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        optimizer.step()
        all_seq = _gather_rows(per_seq.detach().float().cpu(), ctx)
        elapsed = time.perf_counter() - t0
        done = step + 1 - start
        tps = done * tokens_per_step / elapsed
        by_domain = {name: float(all_seq[[i for i, n in enumerate(names) if n == name]].mean()) for name in set(names)}
        loss_value = float(all_seq.mean())
        last = {"step": step + 1, "loss": loss_value, "loss_by_domain": by_domain, "lr": lr,
                "grad_norm": float(gnorm), "tokens": (step + 1) * tokens_per_step,
                "tokens_per_s": tps, "elapsed_s": elapsed, "batch": digest}
        if ctx.is_main:
            append_jsonl(metrics_path, last)
        if (step + 1) % cfg.log_every == 0 or step + 1 == stop:
            eta = (stop - step - 1) * elapsed / done
            dom = " ".join(f"{k[:3]} {v:.3f}" for k, v in sorted(by_domain.items()))
            say(f"step {step + 1:>5}/{total_steps} | loss {loss_value:.4f} ({dom}) | lr {lr:.2e} | "
                f"gnorm {float(gnorm):.2f} | {tps:,.0f} tok/s | {_fmt_time(elapsed)} | ETA {_fmt_time(eta)}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < stop:
            save_checkpoint(ckpt_root, step + 1, model, optimizer, loader, ctx)
    if stop > start:
        save_checkpoint(ckpt_root, stop, model, optimizer, loader, ctx)
    return {"steps": stop, "total_steps": total_steps, "last": last, "served": dict(loader.served)}
