"""The decision stage of `hone run` with a ``[budget]``: what the pure decision
(:mod:`hone.mix.decision`) needs measured on this machine, and what happened afterwards.

* before training: a short probe of real training steps (this machine's step time, when the
  cluster is ``local``), the mixture sweep when ``[mix]`` is given without ``train.mixture``
  (its cost estimated before it starts, refused when it alone exceeds the budget, and its
  measured time counted against the budget), then ``plan/decision.json``;
* on the way: :class:`Redecide` compares the measured step time after warm-up with the
  prediction, and when they differ by more than 10% records the token count the remaining
  budget buys (an event in events.jsonl, once per decision, also across resumes). It is not
  applied: the run keeps the decided step count, learning-rate schedule and mixture phases,
  all fixed at its first step, so that a resumed run repeats the steps an uninterrupted one
  takes (the loop's step count and schedule length cannot change mid-run);
* after training: the measured step time, throughput, peak memory, hours, cost and final
  losses beside the predictions, with the relative error of each.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

from hone.errors import HoneError
from hone.mix import sweep as mix_sweep
from hone.mix.decision import DECISION_FILE, LOCAL, decide, format_decision, recipe_cluster, recipe_shape, with_measured
from hone.mix.laws import fit_mixture, load_runs
from hone.recipe import Recipe
from hone.rundir import (
    CHECKPOINTS_DIR,
    EVAL_AFTER_FILE,
    METRICS_FILE,
    MIXTURE_FILE,
    append_event,
    read_events,
    read_json,
    read_jsonl,
    write_json,
)
from hone.train.checkpoint import latest_checkpoint
from hone.train.loop import model_shape
from hone.train.mixture import load_mixture, make_schedule

Log = Callable[[str], None]
WARMUP_STEPS = 2      # measured steps skipped before the step time counts (allocator, caches)
REDECIDE_AFTER = 5    # steps after warm-up that the re-decision averages
REDECIDE_GAP = 0.10   # relative difference of measured and predicted step time that re-decides


def decision_path(workdir: Path) -> Path:
    return Path(workdir) / DECISION_FILE


def inputs_hash(recipe: Recipe) -> str:
    """What the decision depends on: a change decides again."""
    data = json.loads(recipe.model_dump_json(include={"budget", "cluster", "train", "mix", "model"}))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- memory

def reset_peak_rss() -> None:
    """Start the process's peak-RSS count over (Linux), so that it measures training alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        return None
    return None


def current_rss_gib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------- before training

def _sweep_mixture(recipe: Recipe, workdir: Path, model, tok, eval_sets: dict[str, Path],
                   probed: tuple[mix_sweep.Probe, dict], log: Log) -> tuple[dict, dict]:
    """Run the [mix] sweep (priced first, from ``probed``: :func:`hone.mix.sweep.run_probe`'s
    answer) and fit the laws; return mixture.json and the sweep's cost."""
    mix_sweep.check_sets(recipe, eval_sets)
    mixdir = Path(workdir) / "mix"
    estimate = mix_sweep.sweep_estimate(recipe, workdir, probed[0])
    estimate_s = estimate["seconds"]
    log(estimate["line"])
    b = recipe.budget
    limit_s = {"gpu_hours": (b.gpu_hours or 0) * 3600, "days": (b.days or 0) * 86400}.get(b.kind)
    log(f"decision: the mixture sweep is estimated at {estimate_s:.0f} s = {estimate_s / 3600:.4g} GPU-hours "
        "(counted in the budget)")
    if limit_s is not None and estimate_s >= limit_s:
        raise HoneError(f"budget.{b.kind}: the mixture sweep alone is estimated at {estimate_s / 3600:.4g} "
                        f"GPU-hours, the whole budget; give train.mixture, fewer mix.ratios or smaller mix.tokens")
    t0 = time.perf_counter()
    runs = mix_sweep.run_sweep(recipe, workdir, model, tok, eval_sets, log=log, probed=probed)
    seconds = time.perf_counter() - t0
    mixture = fit_mixture(load_runs(runs), tolerance=b.general_tolerance, source=str(runs))
    mixture["schedule"] = make_schedule(mixture["chosen"]["ratio"])
    write_json(mixdir / MIXTURE_FILE, mixture)
    return mixture, {"seconds": seconds, "estimate_s": estimate_s, "gpus": 1, "points": len(load_runs(runs))}


def decide_run(recipe: Recipe, workdir: Path, model, tok, eval_sets: dict[str, Path], log: Log) -> dict:
    """plan/decision.json for ``recipe`` (reused when its inputs have not changed)."""
    path = decision_path(workdir)
    key = inputs_hash(recipe)
    if path.exists() and (old := read_json(path)).get("inputs_hash") == key:
        log(f"decision: {path} is up to date (layout, {old['tokens']:,} tokens, ratio {old['ratio']:.3f})")
        return old
    if path.exists() and (held := latest_checkpoint(Path(workdir) / CHECKPOINTS_DIR, log=lambda m: None)):
        # Training under the old decision would resume with another token count and schedule.
        raise HoneError(f"budget: the recipe's budget, cluster, model, train or mix changed since {path}, and "
                        f"{workdir} holds checkpoints ({held.name}) trained under that decision; run again with "
                        "--fresh to decide and train again, or use a new --workdir")
    cluster = recipe_cluster(recipe)
    local = cluster.name == LOCAL
    sweeping = not recipe.train.mixture and "mix" in recipe.model_fields_set
    # This machine's step time (cluster "local") and the sweep's price come from real proxy steps.
    probed = mix_sweep.run_probe(recipe, Path(workdir), model, tok, eval_sets) if local or sweeping else None
    mixture, sweep = None, None
    if recipe.train.mixture:
        mixture = load_mixture(Path(recipe.train.mixture))
    elif sweeping:
        mixture, sweep = _sweep_mixture(recipe, Path(workdir), model, tok, eval_sets, probed, log)
    shape = model_shape(model) if model is not None else None
    shape = shape or recipe_shape(recipe)
    params = float(sum(p.numel() for p in model.parameters())) if model is not None else None
    overhead = None
    if local and (rss := current_rss_gib()) is not None:
        overhead = max(0.0, rss - (params or 0) * 4 / 2**30)  # the weights are counted by the planner
    decision = decide(recipe, shape, cluster, mixture=mixture, measured_step_s=probed[0].step_s if local else None,
                      overhead_gib=overhead, sweep=sweep, params=params)
    decision["inputs_hash"] = key
    write_json(path, decision)
    log("decision:\n" + format_decision(decision))
    return decision


def decided_recipe(recipe: Recipe, decision: dict) -> Recipe:
    """``recipe`` with the decision applied: tokens, schedule and layout in [train]."""
    s = decision["schedule"]
    update = {"max_tokens": int(decision["tokens"]), "domain_ratio": float(s["ratio"]), "mixture": None,
              "upsample_fraction": s["upsample"]["fraction"] if s.get("upsample") else 0.0,
              "upsample_ratio": s["upsample"]["ratio"] if s.get("upsample") else None}
    if decision["cluster"]["name"] != LOCAL:
        update |= decision["layout"]["train"]
    return recipe.model_copy(update={"train": recipe.train.model_copy(update=update)})


# ---------------------------------------------------------------------------- on the way

class Redecide:
    """After warm-up, compare the measured step time with the prediction; beyond 10% apart,
    record the token count the remaining budget buys at the measured pace (once per decision:
    a resumed run that finds its event in events.jsonl does not record another)."""

    def __init__(self, recipe: Recipe, workdir: Path, decision: dict, log: Log):
        self.recipe, self.workdir, self.decision, self.log = recipe, Path(workdir), decision, log
        self.times: list[float] = []
        self.done = any(e.get("kind") == "redecide" and e.get("previous_tokens") == decision["tokens"]
                        for e in read_events(self.workdir))

    def __call__(self, row: dict) -> None:
        if self.done or self.recipe.budget is None or self.recipe.budget.kind == "tokens":
            return
        self.times.append(float(row["step_s"]))
        if len(self.times) < WARMUP_STEPS + REDECIDE_AFTER:
            return
        self.done = True
        measured = statistics.median(self.times[WARMUP_STEPS:])
        predicted = self.decision["predicted"]["step_time_s"]
        gap = measured / predicted - 1
        if abs(gap) <= REDECIDE_GAP:
            return
        event = redecision(self.decision, int(row["step"]), measured)
        append_event(self.workdir, "redecide", **event)
        self.log(f"decision: measured {measured:.4g} s per step, {gap:+.0%} off the predicted {predicted:.4g} s: the "
                 f"remaining budget buys {event['tokens']:,} tokens in all ({event['steps']:,} steps) instead of "
                 f"{self.decision['tokens']:,}; recorded in events.jsonl, not applied (this run keeps its step count "
                 "and learning-rate schedule, so that a resumed run repeats its steps)")


def redecision(decision: dict, step: int, step_s: float) -> dict:
    """The token count the budget buys when the steps after ``step`` take ``step_s`` each."""
    pred = decision["predicted"]
    steps_total = decision["steps"]
    per_step = decision["tokens"] // steps_total
    budget_s = steps_total * pred["step_time_s"]  # the training time the budget left after the sweep
    spent_s = step * step_s
    more = max(0, math.floor((budget_s - spent_s) / step_s + 1e-9))  # 8.6 / 0.2 is 42.99... in floats
    steps = step + more
    return {"step": step, "measured_step_s": step_s, "predicted_step_s": pred["step_time_s"],
            "steps": steps, "tokens": steps * per_step, "previous_tokens": decision["tokens"], "applied": False}


# ---------------------------------------------------------------------------- after training

def measure(recipe: Recipe, workdir: Path, decision: dict, peak_gib: float | None = None) -> dict:
    """What the run did, with the keys of decision.json's ``predicted`` (``peak_gib``: the
    training's peak memory per process when measured, else the metrics' peak)."""
    rows = read_jsonl(Path(workdir) / METRICS_FILE)
    times = [float(r["step_s"]) for r in rows]
    steady = times[WARMUP_STEPS:] or times
    step_s = statistics.median(steady) if steady else None
    per_step = recipe.train.seq_len * recipe.train.batch_size
    gpus = decision["layout"]["gpus"]
    hours = sum(times) / 3600 if times else None
    out = {"step_time_s": step_s, "tokens_per_s": per_step / step_s if step_s else None,
           "memory_gib_per_gpu": peak_gib or max((float(r["mem_gib"]) for r in rows), default=None),
           "hours": hours, "gpu_hours": hours * gpus if hours is not None else None,
           "cost": hours * gpus * recipe.budget.price_per_gpu_hour if hours is not None else None,
           "domain_loss": None, "general_loss": None}
    after = Path(workdir) / EVAL_AFTER_FILE
    if after.exists():
        scores = read_json(after)
        general, domain = mix_sweep.mix_sets(recipe)
        out["general_loss"] = (scores.get(general) or {}).get("nll")
        out["domain_loss"] = (scores.get(domain) or {}).get("nll")
    return out


def finish_decision(recipe: Recipe, workdir: Path, log: Log, peak_gib: float | None = None) -> dict | None:
    """decision.json with ``measured`` and ``error``, after training and the evaluation."""
    path = decision_path(workdir)
    if not path.exists():
        return None
    decision = with_measured(read_json(path), measure(recipe, workdir, read_json(path), peak_gib))
    write_json(path, decision)
    errs = ", ".join(f"{k} {v:+.0%}" for k, v in decision["error"].items() if v is not None)
    log(f"decision: predicted vs measured, relative error: {errs} ({path})")
    return decision
