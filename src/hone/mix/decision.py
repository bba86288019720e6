"""The decision: from one recipe's budget and cluster, the layout, the token count and the domain
ratio, chosen together, with what each predicts (``plan/decision.json``).

1. Layout: the planner's fastest configuration that `hone train` can run (recompute none or
   full, ZeRO 0 or 3) with Hone's trainer constants; the recipe's own layout fields stay fixed.
2. Tokens: whole optimizer steps that fit the budget at the predicted step time, after the
   mixture sweep's cost (GPU-hours and days budgets).
3. Ratio: at that token count, the lowest predicted domain loss among the ratios whose predicted
   general loss stays within ``general_tolerance`` of the reference (the base's loss, or the best
   any ratio reaches), from the mixture's fitted law.

Pure: numpy, the laws and the planner; no torch (`hone plan --recipe` prices a run in a second).
The parts that measure (the probe, the sweep, training) live in :mod:`hone.mix.budget`.

    from hone.mix.decision import decide
    d = decide(recipe, shape, cluster, mixture=mixture_json)   # a dict, as written to decision.json
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from hone.errors import HoneError
from hone.mix.laws import LOSSES, predict_cmr, predict_dcpt
from hone.plan.config import Constants
from hone.plan.hardware import GPUS, Cluster, load_cluster
from hone.plan.layout import train_fields
from hone.plan.search import config_label, evaluate_fixed, nothing_fits_message, search_hone_trainer
from hone.plan.shapes import ModelShape, load_shape
from hone.recipe import Recipe, domain_ratio

DECISION_FILE = Path("plan") / "decision.json"  # in the run directory
PREDICTED = ("step_time_s", "tokens_per_s", "memory_gib_per_gpu", "hours", "gpu_hours", "cost", "domain_loss",
             "general_loss")
LOCAL = "local"
CURVE_POINTS = 24
RATIOS = np.linspace(0.0, 1.0, 101)  # candidate domain ratios
CMR_REACH = 100  # CMR predicts up to this many times its largest sweep budget (D-CPT has no limit)
# Layout fields of [train] a recipe may pin; train.layout = "auto" lets the planner choose the rest.
LAYOUT_KEYS = ("tp", "pp", "micro_batch", "activation_checkpointing", "data_parallel", "vpp")


# ---------------------------------------------------------------------------- inputs

def recipe_shape(recipe: Recipe) -> ModelShape:
    """The model's shape from the recipe alone (no weights): the random model's fields, or an HF
    directory's config.json."""
    m = recipe.model
    if m.source == "random":
        r = m.random
        return ModelShape("random", r.layers, r.hidden, r.heads, r.kv_heads, r.ffn, r.vocab)
    if m.source == "smollm2":
        return load_shape("smollm2-135m")
    if m.source == "hf":
        config = Path(m.path) / "config.json"
        if not config.is_file():
            raise HoneError(f"model.path: {m.path}: no config.json (the decision reads the model's shape from it)")
        return load_shape(str(config))
    raise HoneError(f"model.source: {m.source!r}: the decision reads the shape from an HF config.json; "
                    "run `hone run`, which reads it from the loaded model")


def local_cluster(memory_gib: float, devices: int = 1) -> Cluster:
    """This machine as a cluster of ``devices`` CPU workers sharing its memory."""
    gpu = GPUS["cpu"]
    cpu = type(gpu)("cpu", gpu.peak_tflops, round(memory_gib / devices, 3), gpu.hbm_gbps, gpu.nvlink_gbps,
                    gpu.network_gbps)
    return Cluster(cpu, 1, devices, cpu.nvlink_gbps, cpu.network_gbps, name=LOCAL)


def machine_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return GPUS["cpu"].memory_gib


def recipe_cluster(recipe: Recipe) -> Cluster:
    spec = recipe.cluster.spec if recipe.cluster else LOCAL
    if spec == LOCAL:
        return local_cluster(machine_memory_gib())
    try:
        return load_cluster(spec)
    except HoneError as e:
        raise HoneError(f"cluster.spec: {e}") from None


# ---------------------------------------------------------------------------- 1. layout

def pinned_layout(recipe: Recipe, cluster: Cluster) -> dict:
    """The planner fields the recipe fixes: all its layout with train.layout = "recipe", else
    only the layout fields it sets."""
    t = recipe.train
    given = set(LAYOUT_KEYS) if t.layout == "recipe" else set(t.model_fields_set) & set(LAYOUT_KEYS)
    fixed: dict = {}
    if "tp" in given:
        fixed["tp"] = t.tp
    if "pp" in given:
        fixed["pp"] = t.pp
    if "vpp" in given:
        fixed["vpp"] = t.vpp
    if "activation_checkpointing" in given:
        fixed["recompute"] = "full" if t.activation_checkpointing else "none"
    if "micro_batch" in given and t.micro_batch:
        fixed["micro_batch"] = t.micro_batch
    if "data_parallel" in given:
        fixed["zero"] = 3 if t.data_parallel == "fsdp" else 0
    if t.layout == "recipe":
        tp, pp = t.tp, t.pp
        dp = max(1, cluster.n_gpus // (tp * pp))
        fixed.setdefault("micro_batch", max(1, t.batch_size // dp))
        fixed["zero"] = fixed["zero"] if dp > 1 else 0
    return fixed


def choose_layout(shape: ModelShape, cluster: Cluster, seq: int, global_batch: int, fixed: dict,
                  constants: Constants) -> dict:
    """The fastest configuration `hone train` can run (one line naming cluster.spec when none fits)."""
    if {"tp", "pp", "micro_batch", "recompute", "zero"} <= fixed.keys():
        rec = evaluate_fixed(shape, cluster, seq, global_batch, fixed, constants)
        if not rec["fits"]:
            raise HoneError(f"cluster.spec: {cluster.name}: the recipe's layout (train.layout = \"recipe\") "
                            f"{rec.get('reason')}")
        return rec
    res = search_hone_trainer(shape, cluster, seq, global_batch, constants, fixed=fixed, top=1)
    if not res.plans:
        why = nothing_fits_message(shape, cluster, seq, global_batch, constants, res, fixed)
        raise HoneError(f"cluster.spec: {cluster.name}: no layout of {shape.name} fits: {why}")
    return res.plans[0]


# ---------------------------------------------------------------------------- 2. tokens

def budget_steps(recipe: Recipe, step_s: float, gpus: int, sweep_gpu_hours: float = 0.0,
                 sweep_hours: float = 0.0) -> tuple[int, str]:
    """Whole optimizer steps the budget buys, and how they were counted."""
    b, t = recipe.budget, recipe.train
    per_step = t.seq_len * t.batch_size
    kind = b.kind
    if kind == "tokens":
        steps, how = b.tokens // per_step, f"budget.tokens {b.tokens:,} / {per_step:,} tokens per step"
        left = f"{b.tokens:,} tokens"
    else:
        if kind == "gpu_hours":
            train_hours = (b.gpu_hours - sweep_gpu_hours) / gpus
            left = f"{b.gpu_hours:g} GPU-hours" + (f" - {sweep_gpu_hours:.4g} for the sweep" if sweep_gpu_hours else "")
        else:
            train_hours = b.days * 24 - sweep_hours
            left = f"{b.days:g} days" + (f" - {sweep_hours:.4g} h for the sweep" if sweep_hours else "")
        steps = math.floor(max(0.0, train_hours) * 3600 / step_s) if step_s > 0 else 0
        how = f"({left}) / ({step_s:.4g} s per step on {gpus} GPU{'s' if gpus > 1 else ''})"
    if steps < 1:
        one = step_s * gpus / 3600
        need = {"tokens": f"{per_step:,} tokens", "gpu_hours": f"{one:.3g} GPU-hours",
                "days": f"{step_s / 86400:.3g} days"}[kind]
        raise HoneError(f"budget.{kind}: {left} buys no optimizer step (one step of {t.batch_size} x {t.seq_len} "
                        f"tokens needs {need} at the predicted {step_s:.4g} s per step)")
    return steps, how


# ---------------------------------------------------------------------------- 3. ratio

def _law_predict(mixture: dict, law: str, ratios: np.ndarray, tokens: float, params: float | None) -> dict:
    fit = mixture["laws"][law]
    if law == "cmr":
        return predict_cmr(fit, ratios, tokens)
    has_size_term = fit["general_loss"]["params"].get("A") is not None
    return predict_dcpt(fit, ratios, tokens, params if has_size_term else None)


def size_term(mixture: dict, law: str, params: float) -> str:
    """What the law knows about the target's size."""
    fitted = mixture.get("model_params")
    if law == "dcpt" and mixture["laws"]["dcpt"]["general_loss"]["params"].get("A") is not None:
        sizes = sorted({p["model_params"] for p in mixture.get("points", []) if p.get("model_params")})
        return f"D-CPT model-size term fitted on {len(sizes)} proxy sizes, evaluated at {params:,.0f} parameters"
    if fitted and abs(fitted - params) / params > 0.01:
        return (f"proxy size only ({fitted:,.0f} parameters; the target has {params:,.0f}): losses are the "
                "proxy's, a sweep over several sizes fits the size term")
    return "fitted at the target's size"


def choose_mix(mixture: dict, tokens: float, params: float, tolerance: float, reference: str) -> dict:
    """The ratio with the lowest predicted domain loss whose general loss is within ``tolerance``
    of the reference; both references are reported, and whether every ratio passes."""
    laws = list(mixture.get("laws", {}))
    if not laws:
        raise HoneError("train.mixture: the mixture file has no fitted law (write one with hone mix fit)")
    lo, hi = mixture.get("chosen", {}).get("ratio_range", [0.0, 1.0])
    law, g, d, bad = None, None, None, []
    # D-CPT first: it models the token count in closed form; CMR interpolates between its budgets
    # with one token-curve fit per ratio (so on a coarser grid of ratios).
    for name in sorted(laws, key=lambda k: k != "dcpt"):
        if name == "cmr" and (far := _cmr_too_far(mixture["laws"]["cmr"], tokens)):
            bad.append(far)
            continue
        ratios = RATIOS if name == "dcpt" else RATIOS[::5]
        grid = ratios[(ratios >= lo - 1e-9) & (ratios <= hi + 1e-9)]
        pred = _law_predict(mixture, name, grid, tokens, params)
        g, d = np.asarray(pred["general_loss"], float), np.asarray(pred["domain_loss"], float)
        if np.all(np.isfinite(g)) and np.all(np.isfinite(d)) and (g > 0).all() and (d > 0).all():
            law = name
            break
        bad.append(f"{name} predicts a domain loss of {float(np.min(d)):.3g} nats")
    if law is None:
        return _unpredictable(mixture, tokens, "; ".join(bad))
    base = (mixture.get("loss_before") or {}).get("general_loss")
    best = float(g.min())
    refs = {"base": base, "best": best}
    used = reference if refs[reference] is not None else "best"
    limit = refs[used] + tolerance
    ok = g <= limit + 1e-12
    if not ok.any():
        i = int(np.argmin(g))
        raise HoneError(f"budget.general_tolerance: {tolerance:g} nats: no domain ratio in {lo:g}..{hi:g} keeps the "
                        f"predicted general loss within it of the {used} ({refs[used]:.4f}); the lowest is "
                        f"{g[i]:.4f} at ratio {grid[i]:.3f} (+{g[i] - refs[used]:.4f}) at {tokens:,.0f} tokens")
    i = int(np.flatnonzero(ok)[np.argmin(d[ok])])
    passes = {name: (bool(np.all(g <= v + tolerance + 1e-12)) if v is not None else None) for name, v in refs.items()}
    return {"law": law, "ratio": float(grid[i]), "domain_loss": float(d[i]), "general_loss": float(g[i]),
            "reference": used, "reference_general_loss": {"base": base, "best": best},
            "limit": limit, "critical_ratio": float(grid[np.flatnonzero(ok)].max()), "ratio_range": [lo, hi],
            "every_ratio_passes": passes, "size_term": size_term(mixture, law, params)}


def _cmr_too_far(fit: dict, tokens: float) -> str | None:
    """CMR is fitted per sweep budget; its token curves are three-point fits, not extrapolated far."""
    budgets = [b["tokens"] for b in fit.get("by_tokens", [])]
    if budgets and tokens > CMR_REACH * max(budgets):
        return f"cmr is fitted at budgets up to {max(budgets):,.0f} tokens and not extrapolated beyond {CMR_REACH}x"
    return None


def _unpredictable(mixture: dict, tokens: float, why: str) -> dict:
    """No law gives physical losses at ``tokens`` (extrapolated too far): keep the mixture's own
    ratio and predict no loss, rather than choose by a negative one."""
    ratio = (mixture.get("schedule") or {}).get("ratio", mixture.get("chosen", {}).get("ratio"))
    target = mixture.get("target_tokens")
    return {"law": None, "ratio": float(ratio), "domain_loss": None, "general_loss": None, "reference": None,
            "reference_general_loss": {"base": (mixture.get("loss_before") or {}).get("general_loss"), "best": None},
            "limit": None, "critical_ratio": None, "ratio_range": mixture.get("chosen", {}).get("ratio_range"),
            "every_ratio_passes": {}, "size_term": "",
            "unpredictable": f"no fitted law gives positive losses at {tokens:,.0f} tokens ({why}): the ratio is the "
                             f"mixture's own choice at {target:,.0f} tokens and the losses are not predicted"}


def loss_curve(mixture: dict, law: str, ratio: float, tokens: float, per_step: int, params: float) -> list[dict]:
    """The law's predicted losses at ``ratio`` from one step to ``tokens`` (geometric spacing)."""
    ts = np.unique(np.geomspace(per_step, max(tokens, per_step), CURVE_POINTS if law == "dcpt" else 8).round())
    out = []
    for t in ts:
        p = _law_predict(mixture, law, np.array([ratio]), float(t), params)
        out.append({"tokens": int(t), **{k: float(p[k][0]) for k in LOSSES}})
    return out


# ---------------------------------------------------------------------------- the decision

def decide(recipe: Recipe, shape: ModelShape, cluster: Cluster, *, mixture: dict | None = None,
           measured_step_s: float | None = None, overhead_gib: float | None = None, sweep: dict | None = None,
           params: float | None = None) -> dict:
    """plan/decision.json's content before training.

    ``measured_step_s``: a probe's step time on this machine (replaces the planner's);
    ``overhead_gib``: memory the process holds besides the model's state (CPU: measured RSS);
    ``sweep``: the mixture sweep's cost ({"seconds", "gpus"}), counted against the budget;
    ``params``: the model's parameter count (default: the shape's)."""
    if recipe.budget is None:
        raise HoneError("budget: the recipe has no [budget] section (gpu_hours, tokens or days)")
    b, t = recipe.budget, recipe.train
    seq, gb = t.seq_len, t.batch_size
    k = Constants.hone_trainer(**({"overhead_gib": overhead_gib} if overhead_gib is not None else {}))
    rec = choose_layout(shape, cluster, seq, gb, pinned_layout(recipe, cluster), k)
    gpus = rec["gpus"]
    step_s = measured_step_s or rec["step_time_s"]
    params = float(params or shape.params())
    sweep_s = float((sweep or {}).get("seconds", 0.0))
    sweep_gpu_hours = sweep_s * (sweep or {}).get("gpus", 1) / 3600
    steps, how = budget_steps(recipe, step_s, gpus, sweep_gpu_hours, sweep_s / 3600)
    per_step = seq * gb
    tokens = steps * per_step
    hours = steps * step_s / 3600
    predicted = {"step_time_s": step_s, "tokens_per_s": per_step / step_s,
                 "memory_gib_per_gpu": rec["memory_gib_per_gpu"], "hours": hours, "gpu_hours": hours * gpus,
                 "cost": hours * gpus * b.price_per_gpu_hour, "domain_loss": None, "general_loss": None}
    mix, curve, notes = None, [], []
    schedule = {"ratio": domain_ratio(recipe), "upsample": None}
    if mixture is not None:
        mix = choose_mix(mixture, tokens, params, b.general_tolerance, b.general_tolerance_reference)
        predicted.update(domain_loss=mix["domain_loss"], general_loss=mix["general_loss"])
        schedule = {"ratio": mix["ratio"], "upsample": (mixture.get("schedule") or {}).get("upsample")}
        if mix["law"] is not None:
            curve = loss_curve(mixture, mix["law"], mix["ratio"], tokens, per_step, params)
        else:
            notes.append(mix["unpredictable"])
        notes += _mix_notes(mixture, mix, tokens, b.general_tolerance)
    if t.upsample_fraction:
        up = t.upsample_ratio if t.upsample_ratio is not None else min(1.0, 2 * schedule["ratio"])
        schedule["upsample"] = {"fraction": t.upsample_fraction, "ratio": up}
    if schedule["upsample"]:
        notes.append("the laws model a constant ratio: the upsampling phase is kept but not in the predicted losses")
    if mixture is None:
        notes.append("no fitted mixture (train.mixture or [mix]): the ratio is the recipe's and losses are not "
                     "predicted")
    sweep_out = None
    if sweep:
        sweep_out = {**sweep, "gpu_hours": sweep_gpu_hours, "cost": sweep_gpu_hours * b.price_per_gpu_hour}
    return {"version": 1, "model": shape.summary(), "cluster": cluster.to_json(),
            "budget": {"kind": b.kind, "value": getattr(b, b.kind), "price_per_gpu_hour": b.price_per_gpu_hour,
                       "general_tolerance": b.general_tolerance, "reference": b.general_tolerance_reference},
            "layout": {**{key: rec[key] for key in ("tp", "pp", "dp", "micro_batch", "recompute", "zero", "vpp",
                                                     "gpus", "mfu")},
                       "train": train_fields(rec)},
            "ratio": schedule["ratio"], "schedule": schedule, "tokens": tokens, "steps": steps,
            "predicted": predicted, "mixture": mix, "sweep": sweep_out, "curve": curve,
            "inputs": {"layout": _layout_source(recipe, cluster, rec),
                       "step_time": ("measured: a short probe of real training steps on this machine"
                                     if measured_step_s else f"planner: {_breakdown(rec)}"),
                       "memory": "planner with Hone's trainer constants (fp32 weights, grads, AdamW moments)"
                                 + (f" + {overhead_gib:.2f} GiB the process holds (measured RSS)"
                                    if overhead_gib is not None else ""),
                       "tokens": f"{steps:,} steps = {how}",
                       "ratio": (f"{mix['law']} law from the mixture at {tokens:,} tokens; {mix['size_term']}"
                                 if mix and mix["law"] else "the mixture's own choice (no law predicts this far)"
                                 if mix else "recipe (train.domain_ratio or the sources' weights)")},
            "notes": notes}


def _mix_notes(mixture: dict, mix: dict, tokens: int, tolerance: float) -> list[str]:
    notes = []
    budgets = [p["tokens"] for p in mixture.get("points", []) if p.get("tokens")]
    if budgets and tokens > 2 * max(budgets):
        notes.append(f"the law is extrapolated from proxy budgets up to {max(budgets):,.0f} tokens to {tokens:,}")
    passes = mix["every_ratio_passes"]
    if passes.get("base"):
        notes.append(f"every ratio in {mix['ratio_range'][0]:g}..{mix['ratio_range'][1]:g} keeps the predicted "
                     f"general loss within {tolerance:g} nats of the base: that tolerance does not constrain the "
                     "choice (general_tolerance_reference = \"best\" does)")
    return notes


def _layout_source(recipe: Recipe, cluster: Cluster, rec: dict) -> str:
    how = "the recipe's layout" if recipe.train.layout == "recipe" else "planner search (hone train's options)"
    return f"{how} on {cluster.name} ({cluster.n_gpus} x {cluster.gpu.name}): " + config_label(rec)


def _breakdown(rec: dict) -> str:
    return f"{rec['step_time_s']:.4g} s per step at MFU {rec['mfu']:.1%}"


# ---------------------------------------------------------------------------- after training

def with_measured(decision: dict, measured: dict) -> dict:
    """The decision with ``measured`` (same keys as predicted) and the relative error of each
    prediction, (predicted - measured) / measured."""
    error = {}
    for key in PREDICTED:
        p, m = decision["predicted"].get(key), measured.get(key)
        error[key] = (p - m) / m if p is not None and m not in (None, 0) else None
    return {**decision, "measured": {k: measured.get(k) for k in PREDICTED}, "error": error}


def format_decision(d: dict) -> str:
    """The decision as a table: predicted, and measured with the error once trained."""
    lay, b = d["layout"], d["budget"]
    lines = [f"model {d['model']['name']} ({d['model']['params'] / 1e9:.3g}B params) on {d['cluster']['name']}; "
             f"budget {b['kind']} = {b['value']:g} at {b['price_per_gpu_hour']:g} per GPU-hour",
             f"layout: {config_label(lay)} on {lay['gpus']} GPU(s)",
             f"tokens: {d['tokens']:,} ({d['steps']:,} steps); domain ratio {d['ratio']:.3f}"
             + (f", then {d['schedule']['upsample']['ratio']:.3f} over the last "
                f"{d['schedule']['upsample']['fraction']:.0%} of steps" if d["schedule"].get("upsample") else "")]
    if d.get("sweep"):
        s = d["sweep"]
        lines.append(f"mixture sweep: {s['seconds']:.0f} s = {s['gpu_hours']:.4g} GPU-hours, cost "
                     f"{s['cost']:.4g} (counted in the budget)")
    if (m := d.get("mixture")) and m.get("law"):
        r = m["reference_general_loss"]
        base = f"{r['base']:.4f}" if r["base"] is not None else "unknown"
        lines.append(f"general loss references: base {base}, best {r['best']:.4f}; tolerance "
                     f"{b['general_tolerance']:g} nats over the {m['reference']} -> limit {m['limit']:.4f}; "
                     f"largest ratio within it {m['critical_ratio']:.3f}")
    measured = d.get("measured")
    head = f"{'':<20} {'predicted':>14}" + (f" {'measured':>14} {'error':>9}" if measured else "")
    lines += ["", head]
    for key in PREDICTED:
        p = d["predicted"].get(key)
        row = f"{key:<20} {_num(p):>14}"
        if measured:
            e = d["error"].get(key)
            row += f" {_num(measured.get(key)):>14} {('%+.1f%%' % (100 * e)) if e is not None else '-':>9}"
        lines.append(row)
    lines += [f"{k}: {v}" for k, v in d["inputs"].items()]
    lines += [f"note: {n}" for n in d.get("notes", [])]
    return "\n".join(lines)


def _num(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
