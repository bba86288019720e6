"""Proxy sweep: short continual-pretraining runs at several domain ratios, each evaluated
on the held-out general and domain sets at several token budgets.

One run per ratio, from the same base model, with a constant learning rate after the
warm-up (``min_lr_ratio = 1``), so the loss at an early budget is the loss a shorter run
would have had, and one run gives every budget. Each (ratio, budget) appends one line to
``<workdir>/mix/runs.jsonl``::

    {"model_params": 180000, "ratio": 0.25, "tokens": 20480, "general_loss": 5.1, "domain_loss": 5.4}

plus one ``tokens: 0`` line per ratio for the base model (the loss before continual
pretraining, the CMR tolerance's reference). A re-run skips the lines already written and
resumes an interrupted ratio from its checkpoint under ``mix/runs/``.

With ``mix.orders = K`` > 1 each ratio is trained K times with different data orders (order
0 is the single run above; order k starts every stream at a random window drawn with seed
k), each order's points go to ``mix/orders.jsonl``, and the runs.jsonl line of a (ratio,
budget) is their mean, written once all K are measured, with extra fields the fitter
ignores: ``orders``, ``general_loss_sd`` / ``domain_loss_sd`` (over orders) and
``general_losses`` / ``domain_losses`` (every order's value). One proxy run follows one
data order, and its noise (0.01–0.04 nats on the tiny recipe) is larger than the effect of
a few tenths of ratio; the mean of K orders has about 1/√K of it. A re-run skips finished
orders as well as finished points.

With ``mix.base_tokens`` > 0 the base is first trained on general text only (for a random
model, which has no general knowledge to forget otherwise); it is kept in ``mix/base/``.

Before any training the sweep prints one estimate line: the proxy runs left (ratios x
orders), tokens each, the time from a few real proxy steps timed on a copy of the model (in
``mix/.estimate/``, removed after) and one timed evaluation, and the disk the proxy
checkpoints take at a time. After each point a progress line gives the ETA. A proxy run's
directory under ``mix/runs/`` (its checkpoints) is removed once all its points are recorded;
a run not yet recorded keeps its checkpoints, so a killed run resumes from them.

    hone mix sweep recipes/tiny-cpu.toml --workdir runs/tiny
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hone.errors import HoneError
from hone.evaluate import evaluate_sets, read_texts
from hone.recipe import Recipe
from hone.rundir import append_jsonl, atomic_path, ensure_dir, is_done, mark_done, read_jsonl
from hone.train.checkpoint import KEEP_CHECKPOINTS, checkpoint_step, checkpoints_newest_first
from hone.train.loop import train
from hone.train.run import build_loader

Log = Callable[[str], None]
PROBE_STEPS = 3  # timed proxy steps for the estimate: the first warms up, the others are measured


def budgets(recipe: Recipe) -> list[int]:
    """Token budgets of the sweep: mix.tokens, or a quarter, half and all of train.max_tokens."""
    m = recipe.mix
    return sorted(set(m.tokens)) if m.tokens else [recipe.train.max_tokens // 4, recipe.train.max_tokens // 2,
                                                   recipe.train.max_tokens]


def _budget_steps(token_budgets: list[int], per_step: int) -> list[int]:
    """The optimizer steps at which the budgets are evaluated (each rounded down to whole steps)."""
    return sorted({max(1, b // per_step) for b in token_budgets})


def _done_points(path: Path) -> set[tuple[float, float]]:
    return {(round(r["ratio"], 6), float(r["tokens"])) for r in read_jsonl(path)}


def _order_points(path: Path) -> dict[tuple[float, float, int], dict]:
    """mix/orders.jsonl rows by (ratio, tokens, order)."""
    return {(round(r["ratio"], 6), float(r["tokens"]), int(r["order"])): r for r in read_jsonl(path)}


def order_seed(order: int) -> int | None:
    """Order 0 reads every stream from its start (a plain sweep); order k from windows drawn with seed k."""
    return None if order == 0 else order


def _run_name(ratio: float, order: int) -> str:
    return f"r{ratio:.4f}" if order == 0 else f"r{ratio:.4f}-o{order}"


def _mean_row(rows: list[dict]) -> dict:
    """One runs.jsonl line from the same (ratio, budget) measured over several data orders."""
    out = {k: rows[0][k] for k in ("model_params", "ratio", "tokens")}
    out["orders"] = len(rows)
    for key in ("general_loss", "domain_loss"):
        vals = np.array([r[key] for r in rows], dtype=float)
        out[key] = float(vals.mean())
        out[f"{key}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out[key.replace("_loss", "_losses")] = [float(v) for v in vals]
    return out


def _proxy_train_config(recipe: Recipe, total_tokens: int):
    t = recipe.train
    return t.model_copy(update={"max_tokens": total_tokens, "min_lr_ratio": 1.0, "checkpoint_every": 0,
                                "lr": recipe.mix.lr or t.lr, "log_every": 10**9, "mixture": None,
                                "upsample_fraction": 0.0})


def _eval_losses(recipe: Recipe, model, tok, eval_sets: dict[str, Path]) -> dict[str, float]:
    general, domain = mix_sets(recipe)
    names = {"general_loss": general, "domain_loss": domain}
    texts = {key: read_texts(eval_sets[name]) for key, name in names.items()}
    scores = evaluate_sets(model, tok, texts, max_tokens=recipe.eval.max_tokens_per_set, seq_len=recipe.eval.seq_len,
                           batch_size=recipe.eval.batch_size, log=lambda m: None)
    return {key: scores[key]["nll"] for key in names}


def _loader(recipe: Recipe, workdir: Path, ratio: float, seq_len: int, offset_seed: int | None = None):
    loader = build_loader(recipe, workdir, phases=[(0, ratio)], seq_len=seq_len)
    if offset_seed is not None:  # another data order: start each stream at a random window
        for stream in loader.streams.values():
            g = torch.Generator().manual_seed(offset_seed)
            windows = max(1, (len(stream.tokens) - seq_len - 1) // seq_len)
            stream.pos = int(torch.randint(windows, (1,), generator=g)) * seq_len
    return loader


def _base_model(recipe: Recipe, workdir: Path, model, log: Log):
    """The sweep's starting point: the recipe's base model, or that model after
    ``mix.base_tokens`` of general-only training (done once, kept in mix/base/)."""
    n = recipe.mix.base_tokens
    if n <= 0:
        return model
    base_dir = workdir / "mix" / "base"
    weights = base_dir / "model.pt"
    if is_done(base_dir):
        model.load_state_dict(torch.load(weights, map_location=next(model.parameters()).device, weights_only=True))
        return model

    cfg = recipe.train.model_copy(update={"max_tokens": n, "checkpoint_every": 0, "log_every": 10**9,
                                          "mixture": None, "upsample_fraction": 0.0})
    steps = max(1, n // (cfg.batch_size * cfg.seq_len))
    log(f"mix: base: {steps} steps of general-only training ({n:,} tokens)")
    torch.manual_seed(recipe.run.seed)
    train(model, _loader(recipe, workdir, 0.0, cfg.seq_len), cfg, ensure_dir(base_dir), total_steps=steps,
          resume=True, log=lambda m: None)
    with atomic_path(weights) as tmp:
        torch.save(model.state_dict(), tmp)
    mark_done(base_dir, {"tokens": steps * cfg.batch_size * cfg.seq_len})
    return model


def proxy_run(recipe: Recipe, workdir: Path, base, tok, eval_sets: dict[str, Path], ratio: float,
              token_budgets: list[int], run_dir: Path, *, skip: set[float] = frozenset(),
              offset_seed: int | None = None,
              on_point: Callable[[dict], str | None] = lambda row: None, log: Log = print) -> list[dict]:
    """Train a copy of ``base`` at ``ratio`` up to the largest budget, evaluating at each;
    budgets in ``skip`` are trained through but not evaluated again. ``on_point`` records a
    row and may return text (the sweep's progress) to end the row's log line."""
    seq, batch = recipe.train.seq_len, recipe.train.batch_size
    per_step = seq * batch
    steps = _budget_steps(token_budgets, per_step)
    if all(s * per_step in skip for s in steps):
        return []
    cfg = _proxy_train_config(recipe, steps[-1] * per_step)
    first = min(s for s in steps if s * per_step not in skip)
    saved = checkpoints_newest_first(run_dir / "checkpoints")  # complete ones only (tmp dirs start with a dot)
    # A budget to evaluate lies behind the saved run: redo it from the base.
    if saved and checkpoint_step(saved[0]) > first:
        shutil.rmtree(run_dir)
    model = copy.deepcopy(base)
    loader = _loader(recipe, workdir, ratio, seq, offset_seed)
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    torch.manual_seed(recipe.run.seed)
    for s in steps:
        tokens = s * per_step
        t0 = time.perf_counter()
        train(model, loader, cfg, ensure_dir(run_dir), total_steps=steps[-1], resume=True, max_steps=s,
              log=lambda m: None)
        if tokens in skip:
            continue
        row = {"model_params": n_params, "ratio": ratio, "tokens": tokens,
               **_eval_losses(recipe, model, tok, eval_sets)}
        note = on_point(row) or ""
        rows.append(row)
        log(f"mix: ratio {ratio:.3f} tokens {tokens:>9,} general {row['general_loss']:.4f} domain "
            f"{row['domain_loss']:.4f} ({time.perf_counter() - t0:.0f}s){note}")
    return rows


def mix_sets(recipe: Recipe) -> tuple[str, str]:
    """(general set, domain set) whose losses the laws fit: mix.general_set / mix.domain_set, or by
    default the packaged 'general' / 'domain' sets, else the first held-out source of each role."""
    m, sources = recipe.mix, recipe.data.sources

    def first(role: str, packaged: str) -> str:
        if recipe.data.packaged is not None:
            return packaged
        return next((s.name for s in sources if s.role == role and s.heldout), packaged)

    return m.general_set or first("general", "general"), m.domain_set or first("domain", "domain")


def check_sets(recipe: Recipe, eval_sets: dict[str, Path]) -> None:
    """mix.general_set and mix.domain_set must name evaluation sets of the run."""
    for key, name in zip(("general_set", "domain_set"), mix_sets(recipe)):
        if name not in eval_sets:
            raise HoneError(f"mix.{key}: no evaluation set named {name!r} (have: {', '.join(sorted(eval_sets))})")


@dataclass(frozen=True)
class Probe:
    """Costs measured on this machine: one proxy step, one train call's start-up and
    checkpoint save, one evaluation of both sets, and one checkpoint on disk."""
    step_s: float
    call_s: float
    eval_s: float
    checkpoint_bytes: int


def fmt_duration(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_probe(recipe: Recipe, workdir: Path, model, tok, eval_sets: dict[str, Path]) -> tuple[Probe, dict[str, float]]:
    """Time a few real proxy steps on a copy of ``model`` (in mix/.estimate, removed after) and
    one evaluation of ``model``; return the costs and that evaluation's losses."""
    per_step = recipe.train.seq_len * recipe.train.batch_size
    steps = _budget_steps(budgets(recipe), per_step)
    n = min(PROBE_STEPS, steps[-1])
    probe_dir = workdir / "mix" / ".estimate"
    shutil.rmtree(probe_dir, ignore_errors=True)
    t0 = time.perf_counter()
    train(copy.deepcopy(model), _loader(recipe, workdir, 0.5, recipe.train.seq_len),
          _proxy_train_config(recipe, steps[-1] * per_step), ensure_dir(probe_dir), total_steps=steps[-1],
          max_steps=n, log=lambda m: None)
    wall = time.perf_counter() - t0
    step_times = [r["step_s"] for r in read_jsonl(probe_dir / "metrics.jsonl")]
    measured = step_times[1:] or step_times  # the first step warms up
    step_s = float(np.mean(measured))
    checkpoint_bytes = _tree_bytes(probe_dir / "checkpoints")
    shutil.rmtree(probe_dir, ignore_errors=True)
    t1 = time.perf_counter()
    losses = _eval_losses(recipe, model, tok, eval_sets)
    eval_s = time.perf_counter() - t1
    return Probe(step_s, max(0.0, wall - step_s * len(step_times)), eval_s, checkpoint_bytes), losses


def _pending(recipe: Recipe, done: set[tuple[float, float]], measured: dict) -> list[tuple[float, int, list[int]]]:
    """(ratio, order, budgets in tokens still to measure) of every proxy run with points left."""
    per_step = recipe.train.seq_len * recipe.train.batch_size
    all_tokens = [s * per_step for s in _budget_steps(budgets(recipe), per_step)]
    out = []
    for ratio in recipe.mix.ratios:
        key = round(ratio, 6)
        left = [t for t in all_tokens if (key, float(t)) not in done]
        for k in range(recipe.mix.orders):
            mine = left if recipe.mix.orders == 1 else [t for t in left if (key, float(t), k) not in measured]
            if mine:
                out.append((ratio, k, mine))
    return out


def _point_costs(recipe: Recipe, probe: Probe) -> dict[int, float]:
    """Seconds to reach and measure each budget of a proxy run from the previous one."""
    per_step = recipe.train.seq_len * recipe.train.batch_size
    costs, prev = {}, 0
    for s in _budget_steps(budgets(recipe), per_step):
        costs[s * per_step] = (s - prev) * probe.step_s + probe.call_s + probe.eval_s
        prev = s
    return costs


def _run_cost(costs: dict[int, float], left: list[int], probe: Probe) -> float:
    """A run trains through every budget (from the base) and evaluates only those left."""
    return sum(costs.values()) - (len(costs) - len(left)) * probe.eval_s


@dataclass(frozen=True)
class SweepLeft:
    """What the sweep still has to do in a run directory (read from its files, nothing measured)."""
    done: set[tuple[float, float]]                 # (ratio, tokens) already in mix/runs.jsonl
    pending: list[tuple[float, int, list[int]]]    # (ratio, order, budgets left) of every run with points left
    base_steps: int                                # general-only base steps still to train (mix.base_tokens)
    base_rows: bool                                # some ratio's tokens-0 line (the base's losses) still to write

    @property
    def points(self) -> int:
        return sum(len(left) for _, _, left in self.pending)


def sweep_left(recipe: Recipe, workdir: Path) -> SweepLeft:
    """The proxy runs, points and base training the sweep of ``recipe`` has left under ``workdir``/mix."""
    mixdir = Path(workdir) / "mix"
    done = _done_points(mixdir / "runs.jsonl")
    per_step = recipe.train.seq_len * recipe.train.batch_size
    base_done = recipe.mix.base_tokens <= 0 or is_done(mixdir / "base")
    return SweepLeft(done=done, pending=_pending(recipe, done, _order_points(mixdir / "orders.jsonl")),
                     base_steps=0 if base_done else max(1, recipe.mix.base_tokens // per_step),
                     base_rows=any((round(r, 6), 0.0) not in done for r in recipe.mix.ratios))


def sweep_estimate(recipe: Recipe, workdir: Path, probe: Probe) -> dict:
    """The cost of what the sweep has left, at ``probe``'s measured costs: proxy runs in all and to
    do, runs.jsonl lines done (the base's included), points to do, base steps to train, ``seconds``
    (in one process), the one ``line`` printed before any proxy run, and ``left`` (:class:`SweepLeft`).
    `hone mix sweep` and the decision stage (which counts it in the budget) both price with it."""
    left = sweep_left(recipe, workdir)
    per_step = recipe.train.seq_len * recipe.train.batch_size
    steps = _budget_steps(budgets(recipe), per_step)
    costs = _point_costs(recipe, probe)
    seconds = sum(_run_cost(costs, tokens, probe) for _, _, tokens in left.pending)
    seconds += left.base_steps * probe.step_s + (probe.call_s if left.base_steps else 0.0)
    seconds += probe.eval_s if left.base_rows else 0.0
    m = recipe.mix
    total = len(m.ratios) * m.orders
    per_run = min(KEEP_CHECKPOINTS, len(steps)) * probe.checkpoint_bytes
    base = (f" + {left.base_steps} general-only base step{'s' if left.base_steps > 1 else ''}"
            if left.base_steps else "")
    line = (f"mix: estimate: {len(left.pending)} of {total} proxy runs to do ({len(m.ratios)} ratios x {m.orders} "
            f"order{'s' if m.orders > 1 else ''}), {steps[-1] * per_step:,} tokens = {steps[-1]} steps each{base}, "
            f"{left.points} points | {probe.step_s:.3g} s/step measured, {probe.eval_s:.3g} s per evaluation | "
            f"about {fmt_duration(seconds)} | proxy checkpoints {fmt_bytes(per_run)} at a time "
            f"({min(KEEP_CHECKPOINTS, len(steps))} x {fmt_bytes(probe.checkpoint_bytes)}; each run's removed "
            f"once its points are recorded)")
    return {"runs_total": total, "runs_pending": len(left.pending), "lines_done": len(left.done),
            "points_pending": left.points, "base_steps": left.base_steps, "seconds": seconds, "line": line,
            "left": left}


class _Progress:
    """The progress line after each point: points done, elapsed, ETA from the measured pace."""

    def __init__(self, total_s: float, points: int, costs: dict[int, float]):
        self.total_s, self.points, self.costs = max(total_s, 1e-9), points, costs
        self.done_s, self.done_points, self.t0 = 0.0, 0, time.perf_counter()
        self.run_start = 0.0

    def point(self, tokens: int) -> str:
        self.done_points += 1
        self.done_s = min(self.total_s, self.done_s + self.costs.get(int(tokens), 0.0))
        elapsed = time.perf_counter() - self.t0
        eta = elapsed * (self.total_s - self.done_s) / max(self.done_s, 1e-9)
        return f" | point {self.done_points}/{self.points} | {fmt_duration(elapsed)} | ETA {fmt_duration(eta)}"

    def run_begin(self) -> None:
        self.run_start = self.done_s

    def run_done(self, cost: float) -> None:
        """A run also trains through budgets it does not evaluate: count its whole cost."""
        self.done_s = min(self.total_s, self.run_start + cost)


def _remove_run(run_dir: Path) -> int:
    """Delete a recorded proxy run's directory (its checkpoints); return the bytes freed."""
    if not run_dir.exists():
        return 0
    size = _tree_bytes(run_dir)
    shutil.rmtree(run_dir)
    return size


def run_sweep(recipe: Recipe, workdir: Path, model, tok, eval_sets: dict[str, Path], log: Log = print, *,
              dry_run: bool = False, probed: tuple[Probe, dict[str, float]] | None = None) -> Path:
    """Every (ratio, budget) of the recipe's [mix] section not yet in mix/runs.jsonl, from the
    prepared base ``model`` (the data stages have run: the corpus is tokenized with ``tok``).
    ``dry_run`` prints the estimate only: no proxy run, nothing written to mix/runs.jsonl.
    ``probed``: :func:`run_probe`'s answer for ``model`` when the caller measured it already and
    printed the estimate (the decision stage)."""
    workdir = Path(workdir)
    mixdir = ensure_dir(workdir / "mix")
    out = mixdir / "runs.jsonl"
    todo = sweep_left(recipe, workdir)
    done, pending = todo.done, todo.pending
    token_budgets = budgets(recipe)
    per_step = recipe.train.seq_len * recipe.train.batch_size
    if min(token_budgets) < per_step:
        raise HoneError(f"mix.tokens: budget {min(token_budgets)} is less than one step ({per_step} tokens)")
    orders = f" x {recipe.mix.orders} data orders" if recipe.mix.orders > 1 else ""
    log(f"mix: sweep of ratios {list(recipe.mix.ratios)} x budgets {token_budgets} tokens{orders} -> {out}")
    all_tokens = [0] + [s * per_step for s in _budget_steps(token_budgets, per_step)]
    freed = [0, 0]  # runs removed, bytes
    if not dry_run:
        _remove_recorded(recipe, mixdir, pending, freed)
    if all((round(r, 6), float(t)) in done for r in recipe.mix.ratios for t in all_tokens):
        log(f"mix: every point of the sweep is already in {out}")
        _say_removed(mixdir, freed, log)
        return out
    if probed is None:
        probed = run_probe(recipe, workdir, model, tok, eval_sets)
        log(sweep_estimate(recipe, workdir, probed[0])["line"])
    probe, base_losses = probed
    estimate = sweep_estimate(recipe, workdir, probe)
    if dry_run:
        return out
    base = _base_model(recipe, workdir, model, log)
    n_params = sum(p.numel() for p in base.parameters())
    before = base_losses if recipe.mix.base_tokens <= 0 else None
    costs = _point_costs(recipe, probe)
    progress = _Progress(estimate["seconds"], estimate["points_pending"], costs)
    for ratio in recipe.mix.ratios:
        if (round(ratio, 6), 0.0) not in done:
            before = before or _eval_losses(recipe, base, tok, eval_sets)
            append_jsonl(out, {"model_params": n_params, "ratio": ratio, "tokens": 0, **before})
        runs = {k: left for r, k, left in pending if r == ratio}

        def finished(order: int, left: list[int], ratio: float = ratio) -> None:
            """Its points are recorded: its checkpoints go (a killed run keeps them to resume)."""
            progress.run_done(_run_cost(costs, left, probe))
            freed[0] += 1
            freed[1] += _remove_run(mixdir / "runs" / _run_name(ratio, order))

        def record(row: dict) -> str:
            append_jsonl(out, row)
            return progress.point(row["tokens"])

        skip = {t for r, t in done if r == round(ratio, 6)}
        if recipe.mix.orders > 1:
            _ratio_over_orders(recipe, workdir, base, tok, eval_sets, ratio, token_budgets, skip, out, log,
                               progress=progress, finished_run=finished, left=runs)
        elif runs:
            progress.run_begin()
            proxy_run(recipe, workdir, base, tok, eval_sets, ratio, token_budgets,
                      mixdir / "runs" / _run_name(ratio, 0), skip=skip, on_point=record, log=log)
            finished(0, runs[0])
    _say_removed(mixdir, freed, log)
    return out


def _remove_recorded(recipe: Recipe, mixdir: Path, pending: list[tuple[float, int, list[int]]],
                     freed: list[int]) -> None:
    """Runs left from an earlier sweep whose points are all recorded: their checkpoints go."""
    open_runs = {(round(r, 6), k) for r, k, _ in pending}
    for ratio in recipe.mix.ratios:
        for k in range(recipe.mix.orders):
            run_dir = mixdir / "runs" / _run_name(ratio, k)
            if (round(ratio, 6), k) not in open_runs and run_dir.exists():
                freed[0] += 1
                freed[1] += _remove_run(run_dir)


def _say_removed(mixdir: Path, freed: list[int], log: Log) -> None:
    if not freed[0]:
        return
    kept = f"; base weights kept in {mixdir / 'base'}" if (mixdir / "base").exists() else ""
    log(f"mix: removed {freed[0]} recorded proxy run{'s' if freed[0] > 1 else ''} under {mixdir / 'runs'} "
        f"(checkpoints, {fmt_bytes(freed[1])} freed){kept}")


def _ratio_over_orders(recipe: Recipe, workdir: Path, base, tok, eval_sets: dict[str, Path], ratio: float,
                       token_budgets: list[int], finished: set[float], out: Path, log: Log, *,
                       progress: _Progress, finished_run: Callable[[int, list[int]], None],
                       left: dict[int, list[int]]) -> None:
    """mix.orders proxy runs at ``ratio`` (each order's points in mix/orders.jsonl), then one
    mean line per budget not yet in runs.jsonl."""
    per_step = recipe.train.seq_len * recipe.train.batch_size
    wanted = [s * per_step for s in _budget_steps(token_budgets, per_step) if s * per_step not in finished]
    if not wanted:
        return
    path = out.parent / "orders.jsonl"
    measured = _order_points(path)
    key = round(ratio, 6)

    def record(row: dict, order: int) -> str:
        row = {**row, "order": order}
        append_jsonl(path, row)
        measured[(key, float(row["tokens"]), order)] = row
        return progress.point(row["tokens"])

    for k in range(recipe.mix.orders):
        if k not in left:
            continue
        skip = set(finished) | {t for r, t, o in measured if r == key and o == k}
        progress.run_begin()
        proxy_run(recipe, workdir, base, tok, eval_sets, ratio, token_budgets,
                  out.parent / "runs" / _run_name(ratio, k),
                  skip=skip, offset_seed=order_seed(k), on_point=lambda row, k=k: record(row, k),
                  log=lambda m, k=k: log(f"{m} [order {k}]"))
        finished_run(k, left[k])
    for t in wanted:
        row = _mean_row([measured[(key, float(t), k)] for k in range(recipe.mix.orders)])
        append_jsonl(out, row)
        log(f"mix: ratio {ratio:.3f} tokens {t:>9,} mean of {row['orders']} orders: general {row['general_loss']:.4f} "
            f"(sd {row['general_loss_sd']:.4f}) domain {row['domain_loss']:.4f} (sd {row['domain_loss_sd']:.4f})")
