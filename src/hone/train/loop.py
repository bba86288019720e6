"""Single-process training loop: AdamW, warm-up + cosine schedule, per-domain loss,
metrics.jsonl, a dense progress line, and resumable checkpoints.

Checkpoints hold model, optimizer, scheduler position, loader state and RNG, written to
a temporary directory and renamed, so a kill at any moment leaves either the previous
checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import shutil
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hone.recipe import TrainConfig
from hone.rundir import append_jsonl, atomic_dir, ensure_dir, read_json, write_json
from hone.train.data import MixtureLoader

KEEP_CHECKPOINTS = 2


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr`` then cosine decay to ``cfg.lr * cfg.min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return out


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, loader: MixtureLoader) -> Path:
    target = ckpt_root / f"step_{step:06d}"
    with atomic_dir(target) as tmp:
        save_file(_weights(model), str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        write_json(tmp / "trainer_state.json", {"step": step, "loader": loader.state_dict()})
    for old in sorted(ckpt_root.glob("step_*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(ckpt_root: Path, log: Callable[[str], None] = print) -> Path | None:
    """Newest complete checkpoint; an unreadable one is reported and skipped."""
    for path in sorted(ckpt_root.glob("step_*"), reverse=True):
        needed = [path / n for n in ("model.safetensors", "optimizer.pt", "trainer_state.json")]
        if all(p.exists() for p in needed):
            try:
                read_json(path / "trainer_state.json")
                return path
            except Exception as e:  # noqa: BLE001 - any damage means: use an older one
                log(f"checkpoint {path.name} is unreadable ({e}); trying an older one")
        else:
            log(f"checkpoint {path.name} is incomplete; trying an older one")
    return None


def load_checkpoint(path: Path, model, optimizer, loader: MixtureLoader) -> int:
    state = load_file(str(path / "model.safetensors"))
    model.load_state_dict(state, strict=False)
    blob = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng"])
    trainer = read_json(path / "trainer_state.json")
    loader.load_state_dict(trainer["loader"])
    return int(trainer["step"])


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget metric lines past the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def train(model: torch.nn.Module, loader: MixtureLoader, cfg: TrainConfig, workdir: Path, *,
          total_steps: int, resume: bool = False, max_steps: int | None = None,
          log: Callable[[str], None] = print) -> dict:
    """Train ``model`` for ``total_steps`` (or stop early at ``max_steps``); return a summary."""
    workdir = ensure_dir(Path(workdir))
    ckpt_root = workdir / "checkpoints"
    metrics_path = workdir / "metrics.jsonl"
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=tuple(cfg.betas))
    start = 0
    if resume and (ckpt := latest_checkpoint(ckpt_root, log)) is not None:
        start = load_checkpoint(ckpt, model, optimizer, loader)
        log(f"resumed from {ckpt} at step {start}")
    elif not resume and metrics_path.exists():
        metrics_path.unlink()
    _truncate_metrics(metrics_path, start)
    stop = min(total_steps, max_steps) if max_steps else total_steps
    tokens_per_step = loader.batch_size * (next(iter(loader.streams.values())).seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"train: {n_params / 1e6:.1f}M params | {tokens_per_step} tokens/step | {total_steps} steps "
        f"= {total_steps * tokens_per_step:,} tokens | domain ratio {loader.ratio:.2f} | "
        f"lr {cfg.lr:g} | threads {torch.get_num_threads()}")
    device = next(model.parameters()).device
    model.train()
    t0, last = time.perf_counter(), {}
    for step in range(start, stop):
        lr = lr_at(step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets, names = loader.next_batch()
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        per_seq = per_token.view(targets.shape).mean(dim=1)
        loss = per_seq.mean()
        per_seq, loss_value = per_seq.detach(), float(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        elapsed = time.perf_counter() - t0
        done = step + 1 - start
        tps = done * tokens_per_step / elapsed
        by_domain = {}
        for name in set(names):
            rows = [i for i, n in enumerate(names) if n == name]
            by_domain[name] = float(per_seq[rows].mean())
        last = {"step": step + 1, "loss": loss_value, "loss_by_domain": by_domain, "lr": lr,
                "grad_norm": float(gnorm), "tokens": (step + 1) * tokens_per_step,
                "tokens_per_s": tps, "elapsed_s": elapsed}
        append_jsonl(metrics_path, last)
        if (step + 1) % cfg.log_every == 0 or step + 1 == stop:
            eta = (stop - step - 1) * elapsed / done
            dom = " ".join(f"{k[:3]} {v:.3f}" for k, v in sorted(by_domain.items()))
            log(f"step {step + 1:>5}/{total_steps} | loss {loss_value:.4f} ({dom}) | lr {lr:.2e} | "
                f"gnorm {float(gnorm):.2f} | {tps:,.0f} tok/s | {_fmt_time(elapsed)} | ETA {_fmt_time(eta)}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < stop:
            save_checkpoint(ckpt_root, step + 1, model, optimizer, loader)
    if stop > start:
        save_checkpoint(ckpt_root, stop, model, optimizer, loader)
    return {"steps": stop, "total_steps": total_steps, "last": last, "served": dict(loader.served)}
