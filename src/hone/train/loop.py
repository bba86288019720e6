"""The training loop: AdamW, the learning-rate schedule (hone.train.schedule), per-domain loss,
metrics.jsonl and its tracking backends (hone.train.tracking), a dense progress line, and
resumable DCP checkpoints.

One code path for 1 process and for N under torchrun: every rank builds the same global
batch from the deterministic mixture loader and keeps its data-parallel slice of rows, so
N processes see exactly the data 1 process sees, and the logged losses are the global ones.

For self-healing (hone.heal): a NaN/inf gradient norm or loss skips the optimizer step,
puts the batch window in ``heal/skips.json`` and reloads the newest checkpoint in place;
every loader batch goes to the sample ledger ``samples.jsonl``; under the supervisor each
rank rewrites a heartbeat after every step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from hone.errors import HoneError
from hone.model.documents import set_doc_eos_id
from hone.model.llama import LlamaConfig
from hone.model.shape import shape_of
from hone.plan.hardware import gpu_for_device_name
from hone.plan.shapes import ModelShape, flops_per_token
from hone.recipe import TrainConfig, device_settings
from hone.rundir import append_event, append_jsonl, ensure_dir
from hone.train.checkpoint import checkpoint_step, latest_checkpoint, resume_from_newest, save_checkpoint
from hone.train.data import MixtureLoader
from hone.train.faults import maybe_fail, poison_loss, slow_down
from hone.train.hooks import (
    CheckpointSchedule,
    Heartbeat,
    NonFiniteLoss,
    SampleLedger,
    check_finite,
    heal_dir,
    load_skips,
    micro_batch,
    record_skips,
    skip_window,
    write_model_info,
)
from hone.train.parallelize import DistContext
from hone.train.preempt import Preempted, received, stop_requested
from hone.train.schedule import BaseState, lr_at, use_base_optimizer, warmup_start
from hone.train.speed import speed_options
from hone.train.step_sync import HostCopy, step_unless_nonfinite, to_device
from hone.train.tracking import Tracking, open_tracking

__all__ = ["train", "lr_at", "latest_checkpoint"]


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
    """AdamW over the parameters that train (all, or LoRA's): weight decay on matrices only; a
    parameter the model scales (``model.lr_scales``: LoRA's embeddings / head) gets its own group
    whose ``lr_scale`` the loop multiplies the schedule's learning rate by."""
    inner = getattr(model, "module", model)  # DDP keeps the model's names under .module
    scales = getattr(inner, "lr_scales", {})
    decay, no_decay, scaled = [], [], {}
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        if name in scales:
            scaled.setdefault(scales[name], []).append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    # Fused (one kernel for all parameters) on CUDA; DTensor parameters take the default path.
    every = decay + no_decay + [p for ps in scaled.values() for p in ps]
    on_cuda = all(p.is_cuda for p in every)
    plain = not any(hasattr(p, "full_tensor") for p in every)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups += [{"params": ps, "weight_decay": cfg.weight_decay, "lr_scale": s} for s, ps in scaled.items()]
    return torch.optim.AdamW([g for g in groups if g["params"]],
                             lr=cfg.lr, betas=tuple(cfg.betas), fused=True if on_cuda and plain else None)


def model_shape(model: torch.nn.Module) -> ModelShape | None:
    """The planner's shape of the model for FLOPs / MFU: Hone's Llama's exactly, the transformers
    backend's from its config's common keys; None (MFU left out) when there is none."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, LlamaConfig):
        return shape_of(cfg)
    return model.planner_shape() if hasattr(model, "planner_shape") else None


def _gather_rows(per_seq: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """All ranks' per-sequence losses in global row order.

    The (pp, dp, tp) mesh is row-major over ranks 0..world-1: the last pipeline stage (the one
    whose losses are real) holds ranks (pp-1)*dp*tp onwards, and there data-parallel index i lives
    on tp ranks which hold identical copies; take the first of each.
    """
    if not ctx.distributed:
        return per_seq
    parts = [torch.empty_like(per_seq) for _ in range(ctx.world_size)]
    dist.all_gather(parts, per_seq)
    pp, dp, tp = (ctx.mesh[d].size() for d in ("pp", "dp", "tp"))
    return torch.cat(parts[(pp - 1) * dp * tp::tp])


def peak_flops(device: torch.device) -> float | None:
    """Per-device dense bf16 peak for MFU: ``HONE_PEAK_FLOPS`` if set, else the planner's GPU
    table (:func:`hone.plan.hardware.gpu_for_device_name`); None on a CPU or an unknown GPU."""
    if os.environ.get("HONE_PEAK_FLOPS"):
        return float(os.environ["HONE_PEAK_FLOPS"])
    if device.type == "cuda":
        gpu = gpu_for_device_name(torch.cuda.get_device_name(device))
        return gpu.peak_tflops * 1e12 if gpu else None
    return None


def memory_gib(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _no_grad_sync(model):
    """Skip the data-parallel gradient reduction for all but the last micro-batch."""
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def off():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return off()
    return contextlib.nullcontext()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, pp_group=None,
                   uncounted: list[torch.Tensor] = ()) -> torch.Tensor:
    """Global gradient-norm clipping that also works when tensor parallelism leaves some
    parameters plain tensors (norms, embeddings) and others DTensors (sharded matrices), and,
    given the pipeline's process group, over the parameters of every stage (``uncounted``: a
    tensor another stage holds too, counted there, clipped here alike)."""
    grads = [p.grad for p in params if p.grad is not None]
    kinds = {hasattr(g, "full_tensor") for g in grads}
    if len(kinds) < 2 and pp_group is None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    squares = [torch.linalg.vector_norm(p.grad.float()) for p in params
               if p.grad is not None and all(p is not u for u in uncounted)]
    total = torch.stack([(n.full_tensor() if hasattr(n, "full_tensor") else n) ** 2 for n in squares]).sum() \
        if squares else torch.zeros((), device=params[0].device)
    if pp_group is not None:  # each stage holds some of the parameters: sum their squares over the stages
        dist.all_reduce(total, group=pp_group)
    total = total.sqrt()
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def _batch_digest(inputs: torch.Tensor) -> str:
    return hashlib.sha1(inputs.numpy().tobytes()).hexdigest()[:12]


def _broadcaster(ctx: DistContext) -> Callable:
    """Rank 0's value on every rank (decisions that all ranks must take alike)."""
    def broadcast(value):
        if not ctx.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return broadcast


def _non_finite(workdir: Path, ctx: DistContext, cfg: TrainConfig, *, step: int, batch: int, first_batch: int,
                loss: float, grad_norm: float) -> NonFiniteLoss:
    """Record the offending window in the skip list (rank 0) and return the error to raise when
    no checkpoint exists to roll back to in place."""
    skipped = skip_window(batch, first_batch, cfg.nan_skip_batches)
    if ctx.is_main:
        why = {"step": step, "batch": batch, "loss": loss, "grad_norm": grad_norm}
        record_skips(workdir, skipped, {k: str(v) if isinstance(v, float) else v for k, v in why.items()})
        append_event(workdir, "nonfinite", step=step, batch=batch, loss=loss, grad_norm=grad_norm,
                     skip_batches=skipped, world=ctx.world_size)
    ctx.barrier()  # the skip list is on disk before any rank reads it back
    return NonFiniteLoss(
        f"non-finite loss at step {step} (loss {loss}, grad norm {grad_norm}) before any checkpoint: loader batches "
        f"{skipped} are now in {heal_dir(workdir) / 'skips.json'} and will be skipped; train again with --resume "
        f"(--supervise does this by itself)")


def _roll_back(ckpt_root: Path, model, optimizer, loader: MixtureLoader, say) -> int | None:
    """Reload the newest checkpoint in the running processes (no restart: the cheapest recovery
    from a NaN, which is the data's or the optimizer's fault, not the machine's); None if there is none."""
    if latest_checkpoint(ckpt_root, say) is None:
        return None
    return resume_from_newest(ckpt_root, model, optimizer, loader, say)


def _preempted(ckpt_root: Path, step: int, model, optimizer, loader: MixtureLoader, ctx: DistContext,
               workdir: Path, say) -> Preempted:
    """A preemption signal reached some rank: checkpoint this step (unless the schedule just
    did), record it, and return the error that stops the job with the "resumable" status."""
    newest = latest_checkpoint(ckpt_root, lambda m: None)
    if checkpoint_step(newest) != step:
        newest = save_checkpoint(ckpt_root, step, model, optimizer, loader, ctx)
    sig, at = received() or ("a peer rank's signal", None)
    waited = f" {time.time() - at:.1f} s after {sig}" if at else f" on {sig}"
    if ctx.is_main:
        append_event(workdir, "preempted", step=step, signal=sig, world=ctx.world_size,
                     checkpoint=newest.name, signal_to_checkpoint_s=round(time.time() - at, 3) if at else None)
    say(f"preempted: stopped after step {step} with checkpoint {newest.name}{waited}")
    return Preempted(f"stopped after step {step} on {sig}; checkpoint {newest.name} is written, "
                     f"run the same command again to resume")


@contextlib.contextmanager
def _loader_at(loader: MixtureLoader, state: dict | None):
    """``loader`` as it was in ``state`` inside the block (None: as it is), then as it is again:
    with the next step already fetched, a checkpoint still records the finished step's position."""
    if state is None:
        yield
        return
    now = loader.state_dict()
    loader.load_state_dict(state)
    try:
        yield
    finally:
        loader.load_state_dict(now)


def doc_masks(model: torch.nn.Module, cfg: TrainConfig, loader: MixtureLoader) -> str:
    """Keep packed documents apart in ``model`` as ``train.doc_mask`` says, at the token streams'
    end-of-document id; returns what was done, for the start line."""
    eos = loader.eos_id if cfg.doc_mask else None
    refusal = set_doc_eos_id(model, eos)
    if not cfg.doc_mask:
        return "document masks off (train.doc_mask = false)"
    if eos is None:
        return "document masks off: the token streams name no end-of-document id"
    if refusal:
        return f"document masks off: {refusal} (causal attention over whole sequences)"
    return f"document masks on (end of document: id {eos})"


def train(model: torch.nn.Module, loader: MixtureLoader, cfg: TrainConfig, workdir: Path, *,
          total_steps: int, resume: bool = False, max_steps: int | None = None,
          ctx: DistContext | None = None, log: Callable[[str], None] = print,
          base: BaseState | None = None, tracking: Tracking | None = None,
          on_step: Callable[[dict], None] | None = None) -> dict:
    """Train ``model`` (already parallelized for ``ctx``) for ``total_steps`` or until ``max_steps``;
    ``base``: the base's training state (re-warm-up, optimizer); ``tracking``: the run's [log] backends;
    ``on_step`` sees each step's metrics row on the main rank (the budget's re-decision)."""
    ctx = ctx or DistContext(device=next(model.parameters()).device)
    cfg, settings = device_settings(cfg, ctx.device.type)
    if ctx.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the matmuls left in fp32
    documents = doc_masks(model, cfg, loader)
    speed = speed_options(model, cfg, ctx.device, ctx.mesh["tp"].size() if ctx.mesh is not None else 1)
    workdir = ensure_dir(Path(workdir)) if ctx.is_main else Path(workdir)
    ctx.barrier()
    ckpt_root = workdir / "checkpoints"
    metrics_path = workdir / "metrics.jsonl"
    say = log if ctx.is_main else (lambda m: None)
    optimizer = make_optimizer(model, cfg)
    start = resume_from_newest(ckpt_root, model, optimizer, loader, say) if resume else 0
    warm_lr, warm_why = warmup_start(cfg, base)
    if start == 0:  # the base's optimizer state only before the run's own first checkpoint (all ranks read it)
        optimizer_why = use_base_optimizer(cfg, base, model, optimizer)
        say(f"train: {cfg.schedule} schedule, {warm_why}; {optimizer_why}")
    skips, first_batch = load_skips(workdir), loader.step
    ledger = SampleLedger(workdir, ctx.is_main)
    ledger.start(loader.step, start, fresh=not resume)
    heartbeat = Heartbeat(workdir, ctx.rank)
    fault_dir = heal_dir(workdir)
    # Before the metrics past the checkpoint are forgotten: they say which steps the trackers have.
    board = open_tracking(tracking, workdir, say, fresh=not resume) if ctx.is_main else None
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
    micro = micro_batch(cfg, rows)
    if rows % micro:
        raise HoneError(f"train.micro_batch ({micro}) does not divide the {rows} sequences each rank gets per step")
    pipe = getattr(model, "pipeline", None)  # hone.train.pipeline_parallel.Pipeline under pp > 1
    n_params = sum(p.numel() for p in model.parameters())
    if ctx.distributed:  # sharded parameters count their global size
        n_params = sum(p.full_tensor().numel() if hasattr(p, "full_tensor") else p.numel() for p in model.parameters())
    if pipe is not None:
        n_params = pipe.total_params(model)
    shape = model_shape(getattr(model, "module", model))
    # Model FLOPs per token, the planner's convention (causal attention counted in full).
    fpt = flops_per_token(shape, seq_len) if shape is not None else None
    peak = peak_flops(ctx.device)
    # A shape whose parameter count is far off the model's (an MoE's active experts) would
    # mislead the supervisor's memory model: only its FLOPs are used then.
    if heartbeat.enabled and ctx.is_main and shape is not None and abs(shape.params() - n_params) <= 0.1 * n_params:
        write_model_info(fault_dir, shape, ctx.device)  # what the supervisor's re-planning needs
    say(f"train: {n_params / 1e6:.1f}M params | {tokens_per_step} tokens/step ({dp} dp x {rows // micro} "
        f"micro-batches x {micro} seqs x {seq_len}) | {total_steps} steps = {total_steps * tokens_per_step:,} tokens | "
        f"domain ratio {loader.ratio:.2f} | lr {cfg.lr:g} | world {ctx.world_size}"
        + (f" (pp {pipe.plan.pp} {pipe.plan.pp_schedule})" if pipe is not None else "") + f" | {ctx.device} | "
        f"threads {torch.get_num_threads()}"
        + (f" | {fpt / 1e9:.2f} GFLOP/token" if fpt else "")
        + (f" | peak {peak / 1e12:.0f} TFLOP/s per device" if peak else ""))
    say(f"train: {settings}; {documents}")
    say(f"train: {speed}")
    model.train()
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if cfg.mixed_precision == "bf16" \
        else contextlib.nullcontext()
    schedule = CheckpointSchedule(cfg, total_steps=total_steps, start=start, world=ctx.world_size, n_params=n_params,
                                  broadcast=_broadcaster(ctx), say=say, workdir=workdir if ctx.is_main else None)
    t0, last = time.perf_counter(), {}
    t_step = t0
    rolled_back: dict | None = None  # a NaN roll-back in place, until its first completed step
    # Overlapped (train.overlap_steps): step n+1's forward and backward are queued before step n's
    # numbers are read, logged and checked, so the host never idles the GPU. Step n's optimizer
    # update was queued before n+1's forward, skipped on the device when its gradient norm is not
    # finite; when the host then finds it bad, it rolls back and n+1's gradients are dropped.
    overlap = cfg.overlap_steps if cfg.overlap_steps is not None else ctx.device.type == "cuda"
    step = start  # the next step to compute
    pending: dict | None = None  # a step computed and updated, whose numbers are not read yet

    def compute(step: int) -> dict:
        """Batch, forward and backward of ``step``; the gradients are left on the model."""
        t_begin = time.perf_counter()
        skipped = []
        while loader.step in skips:  # a window that gave a non-finite loss: consumed, never trained on
            skipped_batch = loader.step
            loader.next_batch()
            skipped.append((skipped_batch, loader.last_ids))
        batch_index = loader.step
        inputs, targets, names = loader.next_batch()
        run = {"step": step, "t_begin": t_begin, "skipped": skipped, "batch": batch_index, "names": names,
               "ids": loader.last_ids, "digest": _batch_digest(inputs), "loader": loader.state_dict(),
               "lr": lr_at(step, total_steps, cfg, warm_lr)}
        poison = poison_loss(step + 1, ctx.rank, fault_dir)
        x, y = to_device(inputs[lo:lo + rows], ctx.device), to_device(targets[lo:lo + rows], ctx.device)
        optimizer.zero_grad(set_to_none=True)
        per_seq_parts = []
        if pipe is not None:
            with autocast:
                per_seq_parts.append(pipe.step(x, y, micro=micro, token_weight=1.0 / (rows * seq_len), poison=poison))
        for i in range(0, rows if pipe is None else 0, micro):
            sync = contextlib.nullcontext() if i + micro >= rows else _no_grad_sync(model)
            with sync:
                with autocast:
                    # Summed over micro-batches, loss is the mean over the rank's rows of the
                    # mean over each row's tokens.
                    loss, per_token = model(x[i:i + micro], y[i:i + micro], token_weight=1.0 / (rows * seq_len))
                if poison:  # fault injection: NaN reaches every rank through the gradient reduction
                    loss = loss * float("nan")
                loss.backward()
            per_seq_parts.append(per_token.mean(dim=1))
        run["per_seq"] = per_seq_parts
        return run

    def update(run: dict) -> None:
        """Clip and step (skipped when the norm is not finite), then start the numbers' way to the host."""
        for group in optimizer.param_groups:
            group["lr"] = run["lr"] * group.get("lr_scale", 1.0)
        gnorm = clip_grad_norm(list(model.parameters()), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"),
                               pp_group=pipe.group if pipe is not None else None,
                               uncounted=pipe.uncounted() if pipe is not None else ())
        step_unless_nonfinite(optimizer, gnorm)
        numbers = torch.cat(run.pop("per_seq") + [gnorm.detach().reshape(1).to(torch.float32)]).float()
        run["numbers"] = HostCopy(numbers)
        run["t_launched"] = time.perf_counter()

    while step < stop or pending is not None:
        launched = compute(step) if step < stop and (pending is None or overlap) else None
        if pending is None:
            update(launched)
            pending, step = launched, step + 1
            continue
        done_step = pending["step"]  # finish it: read, check, log, checkpoint
        for skipped_batch, skipped_ids in pending["skipped"]:
            ledger.record(skipped_batch, None, skipped_ids, "skipped")
        numbers = pending["numbers"].values()
        per_seq, gnorm = numbers[:-1], float(numbers[-1])
        bad = None if math.isfinite(gnorm) else {"loss": float(per_seq.mean()), "grad_norm": gnorm}
        stall = slow_down(done_step + 1, ctx.rank) if bad is None else 0.0
        if stall:
            time.sleep(stall)
        if bad is None:
            maybe_fail("step", done_step + 1, ctx.rank, fault_dir)
        t_gather = time.perf_counter()
        all_seq = _gather_rows(per_seq.clone(), ctx)
        now = time.perf_counter()
        # Work and wait of this rank: a straggler is the rank the others wait for at the gather.
        busy_s, wait_s = pending["t_launched"] - pending["t_begin"] + stall, now - t_gather
        elapsed, step_s = now - t0, now - t_step
        t_step = now
        done = done_step + 1 - start
        tps = done * tokens_per_step / elapsed
        names, lr = pending["names"], pending["lr"]
        by_domain = {name: float(all_seq[[i for i, n in enumerate(names) if n == name]].mean()) for name in set(names)}
        loss_value = float(all_seq.mean())
        if bad is not None or not check_finite(loss_value, gnorm):
            bad = bad or {"loss": loss_value, "grad_norm": gnorm}
            error = _non_finite(workdir, ctx, cfg, step=done_step + 1, batch=pending["batch"], first_batch=first_batch,
                                **bad)
            t_bad, failed = time.time(), done_step + 1
            heartbeat.beat(done_step, state="rollback")
            back = _roll_back(ckpt_root, model, optimizer, loader, say)
            if back is None:
                heartbeat.beat(done_step, state="stopping")
                raise error
            pending = None  # and the step computed after it is dropped with its gradients
            step = start = schedule.last = back
            skips, first_batch = load_skips(workdir), loader.step
            ledger.start(loader.step, start, fresh=False)
            if ctx.is_main:
                _truncate_metrics(metrics_path, start)
                append_event(workdir, "decision", failure="nonfinite", step=failed - 1, checkpoint_step=start,
                             action="rollback", world=ctx.world_size, lost_steps=failed - 1 - start,
                             why="reload the newest checkpoint in the running workers and skip the window",
                             options=[{"action": "rollback", "world": ctx.world_size,
                                       "cost_s": round((stop - start) * step_s, 3)}])
            rolled_back = {"time": t_bad, "lost_steps": failed - 1 - start}
            t0 = t_step = time.perf_counter()
            continue
        mfu = fpt * tokens_per_step / step_s / (peak * ctx.world_size) if fpt and peak else None
        last = {"step": done_step + 1, "loss": loss_value, "loss_by_domain": by_domain, "lr": lr,
                "grad_norm": gnorm, "tokens": (done_step + 1) * tokens_per_step,
                "tokens_per_s": tps, "step_s": step_s, "mfu": mfu, "mem_gib": round(memory_gib(ctx.device), 3),
                "elapsed_s": elapsed, "batch": pending["digest"], "world": ctx.world_size}
        ledger.record(pending["batch"], done_step + 1, pending["ids"], "trained")
        if ctx.is_main:
            append_jsonl(metrics_path, last)
            if on_step is not None:
                on_step(last)
            if board is not None:
                board.log_step(last)
        if (done_step + 1) % cfg.log_every == 0 or done_step + 1 == stop:
            eta = (stop - done_step - 1) * elapsed / done
            dom = " ".join(f"{k[:3]} {v:.3f}" for k, v in sorted(by_domain.items()))
            say(f"step {done_step + 1:>5}/{total_steps} | loss {loss_value:.4f} ({dom}) | lr {lr:.2e} | "
                f"gnorm {gnorm:.2f} | {tps:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu else "")
                + f" | {last['mem_gib']:.2f} GiB | {_fmt_time(elapsed)} | ETA {_fmt_time(eta)}")
        # A checkpoint or a stop here is of step done_step: the loader as it was after that step's batch.
        with _loader_at(loader, pending["loader"] if launched is not None else None):
            if schedule.due(done_step + 1, stop, step_s):
                t_ckpt = time.perf_counter()
                save_checkpoint(ckpt_root, done_step + 1, model, optimizer, loader, ctx)
                schedule.saved(done_step + 1, time.perf_counter() - t_ckpt)
            heartbeat.beat(done_step + 1, step_s=step_s, busy_s=busy_s, wait_s=wait_s)
            if rolled_back is not None:
                if ctx.is_main:
                    append_event(workdir, "recovered", failure="nonfinite", step=done_step + 1, world=ctx.world_size,
                                 recovery_s=round(time.time() - rolled_back["time"], 3), detect_s=0.0,
                                 restart_s=0.0, lost_steps=rolled_back["lost_steps"])
                say(f"recovered from a non-finite loss in place: step {done_step + 1} done "
                    f"{time.time() - rolled_back['time']:.1f} s after it")
                rolled_back = None
            if stop_requested(ctx.distributed, ctx.device):  # every rank alike, after the same step
                heartbeat.beat(done_step + 1, state="stopping")
                raise _preempted(ckpt_root, done_step + 1, model, optimizer, loader, ctx, workdir, say)
        pending = None
        if launched is not None:
            update(launched)
            pending, step = launched, step + 1
    if stop > start:
        save_checkpoint(ckpt_root, stop, model, optimizer, loader, ctx)
    if board is not None:
        board.close()
    return {"steps": stop, "total_steps": total_steps, "last": last, "served": dict(loader.served)}
