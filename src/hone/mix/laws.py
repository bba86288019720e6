"""Mixture laws: how general and domain validation loss depend on the domain ratio, the
continual-pretraining tokens and the model size, fitted to proxy runs, and the ratio
they recommend.

CMR (Gu et al. 2024), as 1-D laws fitted per slice:
  * domain / general loss vs ratio at each token budget:  L(R) = a·R^s + b
  * loss vs tokens at each ratio:                          L(T) = α·T^s + β
  * critical mixture ratio vs tokens:                      R*(T) = α·T^s + β
  R*(T) is the largest ratio whose general loss stays within ``tolerance`` of the loss
  before continual pretraining (absolute, in nats: 0.05 in the paper).

D-CPT (Que et al. 2024), one surface per loss:
  L(N, D, r) = E + A/N^α + B·r^η/D^β + C/(r + ε)^γ
  with r = the ratio of the corpus whose loss is modelled (domain: R, general: 1 − R);
  the N term is fitted only when several model sizes are present.

Fits use scipy's ``least_squares`` with a robust ``soft_l1`` loss (residuals beyond
``F_SCALE`` nats count linearly, so one bad proxy run does not bend the curve) from a few
starting points, and report R² and residuals. Both laws choose the ratio the same way:
at the planned token budget, the ratio with the lowest predicted domain loss among those
whose predicted general loss is within the tolerance of the reference.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from hone.errors import HoneError

F_SCALE = 0.05  # nats: the robust loss's inlier scale
MIN_RATIOS = 4  # distinct ratios a loss-vs-ratio fit needs (it has 3 parameters)
LOSSES = ("general_loss", "domain_loss")
GRID = np.linspace(0.0, 1.0, 1001)


# ---------------------------------------------------------------------------- points

def validate_points(rows: list[dict], source: str = "runs") -> list[dict]:
    """Check and normalize runs.jsonl rows; a bad row is a one-line error naming it."""
    out = []
    for i, row in enumerate(rows, 1):
        where = f"{source}:{i}"
        if not isinstance(row, dict):
            raise HoneError(f"{where}: not a JSON object")
        for key in ("ratio", "tokens"):
            v = row.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise HoneError(f"{where}: {key} must be a finite number (got {v!r})")
        if not 0.0 <= row["ratio"] <= 1.0:
            raise HoneError(f"{where}: ratio {row['ratio']} is outside [0, 1]")
        if row["tokens"] < 0:
            raise HoneError(f"{where}: tokens {row['tokens']} is negative")
        params = row.get("model_params")
        if params is not None and (not isinstance(params, (int, float)) or not params > 0):
            raise HoneError(f"{where}: model_params must be a positive number or null (got {params!r})")
        clean = {"model_params": params, "ratio": float(row["ratio"]), "tokens": float(row["tokens"])}
        for key in LOSSES:
            v = row.get(key)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
                raise HoneError(f"{where}: {key} must be a finite number or null (got {v!r})")
            clean[key] = None if v is None else float(v)
        out.append(clean)
    if not out:
        raise HoneError(f"{source}: no runs to fit")
    return out


def load_runs(path: Path) -> list[dict]:
    """Rows of a runs.jsonl file, validated."""
    path = Path(path)
    if not path.exists():
        raise HoneError(f"{path}: file not found")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise HoneError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return validate_points(rows, str(path))


# ---------------------------------------------------------------------------- fitting

def _robust(residuals, starts: list[np.ndarray], bounds, max_nfev: int = 300) -> np.ndarray:
    """The best of a few soft-L1 least-squares fits from different starting points."""
    # scipy is imported by the fit alone: 0.6 s that `hone plan --recipe` (predictions only) skips
    from scipy.optimize import least_squares

    best = None
    for x0 in starts:
        x0 = np.clip(x0, bounds[0], bounds[1])
        try:
            r = least_squares(residuals, x0, loss="soft_l1", f_scale=F_SCALE, bounds=bounds, max_nfev=max_nfev,
                              x_scale="jac")
        except ValueError:
            continue
        if np.all(np.isfinite(r.x)) and (best is None or r.cost < best.cost):
            best = r
    if best is None:
        raise HoneError("the law fit did not converge from any starting point")
    return best.x


def _quality(y: np.ndarray, pred: np.ndarray) -> dict:
    res = y - pred
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(res ** 2)) / ss_tot if ss_tot > 0 else (1.0 if np.allclose(res, 0) else 0.0)
    return {"r2": r2, "rmse": float(np.sqrt(np.mean(res ** 2))), "residuals": [float(v) for v in res], "n": int(len(y))}


def power_curve(x, a: float, s: float, b: float):
    """a·x^s + b (x ≥ 0; 0^s = 0 for s > 0)."""
    return a * np.power(np.asarray(x, dtype=float), s) + b


def fit_ratio_curve(ratios, losses) -> dict:
    """Loss vs domain ratio at one token budget: L(R) = a·R^s + b (s > 0)."""
    x, y = np.asarray(ratios, float), np.asarray(losses, float)
    span = float(y[np.argmax(x)] - y[np.argmin(x)]) or 1e-3
    starts = [np.array([span, s, float(y[np.argmin(x)])]) for s in (0.3, 1.0, 3.0)]
    p = _robust(lambda t: power_curve(x, *t) - y, starts, ([-np.inf, 1e-3, -np.inf], [np.inf, 10.0, np.inf]))
    return {"a": float(p[0]), "s": float(p[1]), "b": float(p[2]), **_quality(y, power_curve(x, *p))}


def fit_token_curve(tokens, values) -> dict:
    """A quantity vs tokens: α·(T/T0)^s + β, T0 the largest T (for conditioning)."""
    t, y = np.asarray(tokens, float), np.asarray(values, float)
    t0 = float(t.max())
    x = t / t0
    starts = [np.array([float(y[np.argmin(t)] - y[np.argmax(t)]) or 1e-3, s, float(y.min())]) for s in (-1.0, -0.3,
                                                                                                        0.5)]
    p = _robust(lambda q: q[0] * np.power(x, q[1]) + q[2] - y, starts,
                ([-np.inf, -5.0, -np.inf], [np.inf, 5.0, np.inf]))
    return {"alpha": float(p[0]), "s": float(p[1]), "beta": float(p[2]), "t0": t0,
            **_quality(y, p[0] * np.power(x, p[1]) + p[2])}


def eval_token_curve(fit: dict, tokens: float) -> float:
    return float(fit["alpha"] * (tokens / fit["t0"]) ** fit["s"] + fit["beta"])


# D-CPT parameter vector: E, log A, α, log B, η, β, log C, γ, log ε (A, α dropped with one size).
DCPT_NAMES = ["E", "A", "alpha", "B", "eta", "beta", "C", "gamma", "epsilon"]


def dcpt_value(p: dict, n, d, r):
    """E + A/(N/N0)^α + B·r^η/(D/D0)^β + C/(r + ε)^γ with p's normalizers N0, D0."""
    r = np.asarray(r, float)
    out = p["E"] + p["B"] * np.power(r, p["eta"]) * np.power(np.asarray(d, float) / p["d0"], -p["beta"]) \
        + p["C"] * np.power(r + p["epsilon"], -p["gamma"])
    if p.get("A") is not None:
        out = out + p["A"] * np.power(np.asarray(n, float) / p["n0"], -p["alpha"])
    return out


def _dcpt_unpack(q: np.ndarray, with_n: bool, n0: float, d0: float) -> dict:
    full = list(q) if with_n else [q[0], None, None, *q[1:]]
    E, lA, alpha, lB, eta, beta, lC, gamma, leps = full
    return {"E": float(E), "A": None if lA is None else float(np.exp(lA)),
            "alpha": None if alpha is None else float(alpha),
            "B": float(np.exp(lB)), "eta": float(eta), "beta": float(beta), "C": float(np.exp(lC)),
            "gamma": float(gamma), "epsilon": float(np.exp(leps)), "n0": n0, "d0": d0}


def fit_dcpt(n, d, r, y) -> dict:
    """Fit the D-CPT surface to losses ``y`` at model sizes ``n``, tokens ``d`` (> 0) and ratios ``r``."""
    n, d, r, y = (np.asarray(v, float) for v in (n, d, r, y))
    with_n = len(np.unique(n)) > 1
    n0, d0 = float(n.max()), float(d.max())
    lo = [-np.inf, -20, 0.0, -20, 0.0, 0.0, -20, 0.0, math.log(1e-4)]
    hi = [np.inf, 20, 4.0, 20, 4.0, 4.0, 20, 4.0, math.log(2.0)]
    keep = list(range(9)) if with_n else [0, 3, 4, 5, 6, 7, 8]
    bounds = ([lo[i] for i in keep], [hi[i] for i in keep])

    def resid(q):
        return dcpt_value(_dcpt_unpack(q, with_n, n0, d0), n, d, r) - y

    starts = []
    for gamma, eps, beta in ((0.3, 0.1, 0.3), (1.0, 0.05, 1.0), (0.1, 0.5, 0.5)):
        full = np.array([y.min() - 0.1, math.log(0.1), 0.3, math.log(0.1), 1.0, beta,
                         math.log(0.1), gamma, math.log(eps)])
        starts.append(full[keep])
    q = _robust(resid, starts, bounds, max_nfev=600)
    p = _dcpt_unpack(q, with_n, n0, d0)
    return {"params": p, **_quality(y, dcpt_value(p, n, d, r))}


# ---------------------------------------------------------------------------- laws

def _cmr_slices(points: list[dict], loss: str) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    by_t: dict[float, list[tuple[float, float]]] = {}
    for p in points:
        if p["tokens"] > 0 and p[loss] is not None:
            by_t.setdefault(p["tokens"], []).append((p["ratio"], p[loss]))
    return {t: (np.array([a for a, _ in v]), np.array([b for _, b in v]))
            for t, v in sorted(by_t.items()) if len({a for a, _ in v}) >= MIN_RATIOS}


def fit_cmr(points: list[dict], source: str = "runs") -> dict:
    """Per-budget ratio curves for both losses, plus per-ratio token curves where ≥ 3 budgets."""
    law: dict = {"law": "cmr", "by_tokens": {}, "by_ratio": {}}
    for loss in LOSSES:
        slices = _cmr_slices(points, loss)
        if not slices:
            have = sorted({p["ratio"] for p in points if p["tokens"] > 0 and p[loss] is not None})
            raise HoneError(f"{source}: too few points to fit the CMR law for {loss}: need >= {MIN_RATIOS} distinct "
                            f"ratios at one token budget > 0 (got ratios {have})")
        for t, (x, y) in slices.items():
            law["by_tokens"].setdefault(repr(t), {"tokens": t})[loss] = {**fit_ratio_curve(x, y),
                                                                          "points": [[float(a), float(b)] for a,
                                                                                     b in zip(x, y)]}
        by_r: dict[float, list[tuple[float, float]]] = {}
        for p in points:
            if p["tokens"] > 0 and p[loss] is not None:
                by_r.setdefault(p["ratio"], []).append((p["tokens"], p[loss]))
        for r, v in sorted(by_r.items()):
            if len({t for t, _ in v}) >= 3:
                law["by_ratio"].setdefault(repr(r), {"ratio": r})[loss] = fit_token_curve(*zip(*v))
    law["by_tokens"] = sorted(law["by_tokens"].values(), key=lambda s: s["tokens"])
    law["by_ratio"] = sorted(law["by_ratio"].values(), key=lambda s: s["ratio"])
    return law


def _interp_tokens(ts: list[float], vs: list[float], tokens: float) -> float:
    """A value known at budgets ``ts`` at another budget: power law in T with >= 3 budgets,
    linear in log T with 2 (both extrapolate)."""
    if len(ts) == 1:
        return vs[0]
    for t, v in zip(ts, vs):
        if math.isclose(t, tokens, rel_tol=1e-9):
            return v
    if len(ts) >= 3:
        return eval_token_curve(fit_token_curve(ts, vs), tokens)
    (t1, v1), (t2, v2) = zip(ts, vs)
    w = (math.log(tokens) - math.log(t1)) / (math.log(t2) - math.log(t1))
    return v1 + w * (v2 - v1)


def predict_cmr(law: dict, ratio, tokens: float) -> dict[str, np.ndarray]:
    ratio = np.atleast_1d(np.asarray(ratio, float))
    out = {}
    for loss in LOSSES:
        fits = [(s["tokens"], s[loss]) for s in law["by_tokens"] if s.get(loss)]
        ts = [t for t, _ in fits]
        vals = [power_curve(ratio, f["a"], f["s"], f["b"]) for _, f in fits]
        out[loss] = np.array([_interp_tokens(ts, [float(v[i]) for v in vals], tokens) for i in range(len(ratio))])
    return out


def fit_dcpt_law(points: list[dict], source: str = "runs") -> dict:
    law: dict = {"law": "dcpt"}
    for loss in LOSSES:
        pts = [p for p in points if p["tokens"] > 0 and p[loss] is not None]
        sizes = {p["model_params"] for p in pts}
        n_params = 9 if len(sizes) > 1 else 7
        ratios, budgets = {p["ratio"] for p in pts}, {p["tokens"] for p in pts}
        if len(pts) < n_params + 2 or len(ratios) < 3 or len(budgets) < 2:
            raise HoneError(f"{source}: too few points to fit the D-CPT law for {loss}: need >= {n_params + 2} points "
                            f"with tokens > 0 over >= 3 ratios and >= 2 token budgets (got {len(pts)} points, "
                            f"{len(ratios)} ratios, {len(budgets)} budgets)")
        n = [p["model_params"] or 1.0 for p in pts]
        r = [p["ratio"] if loss == "domain_loss" else 1.0 - p["ratio"] for p in pts]
        fit = fit_dcpt(n, [p["tokens"] for p in pts], r, [p[loss] for p in pts])
        fit["points"] = [[p["model_params"], p["ratio"], p["tokens"], p[loss]] for p in pts]
        law[loss] = fit
    return law


def predict_dcpt(law: dict, ratio, tokens: float, params: float | None = None) -> dict[str, np.ndarray]:
    ratio = np.atleast_1d(np.asarray(ratio, float))
    out = {}
    for loss in LOSSES:
        p = law[loss]["params"]
        r = ratio if loss == "domain_loss" else 1.0 - ratio
        out[loss] = dcpt_value(p, params or p["n0"], tokens, r)
    return out


# ---------------------------------------------------------------------------- choosing

def reference_losses(points: list[dict], model_params) -> dict[str, float | None]:
    """Losses before continual pretraining: the mean over tokens == 0 rows of that size."""
    ref = {}
    for loss in LOSSES:
        vals = [p[loss] for p in points if p["tokens"] == 0 and p[loss] is not None
                and (model_params is None or p["model_params"] in (None, model_params))]
        ref[loss] = float(np.mean(vals)) if vals else None
    return ref


def choose_ratio(predict, tokens: float, tolerance: float, general_before: float | None,
                 measured: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Lowest predicted domain loss among ratios whose general loss is within ``tolerance``
    of ``general_before`` (or, without it, of the prediction at the lowest ratio).

    Only ratios inside the ``measured`` range are candidates: a law extrapolated past its
    points can promise anything (D-CPT's C/(r+eps)^gamma term gave a negative domain loss
    at ratio 0 on a sweep that started at 0.25). ``physical`` says every prediction there
    is a positive loss; ``fit_mixture`` never lets a non-physical law choose.
    """
    lo, hi = measured
    grid = GRID[(GRID >= lo - 1e-9) & (GRID <= hi + 1e-9)]
    pred = predict(grid, tokens)
    g, d = pred["general_loss"], pred["domain_loss"]
    reference = general_before if general_before is not None else float(g[0])
    feasible = g <= reference + tolerance
    if feasible.any():
        i = int(np.flatnonzero(feasible)[np.argmin(d[feasible])])
    else:
        i = int(np.argmin(g))
    critical = float(grid[np.flatnonzero(feasible)].max()) if feasible.any() else 0.0
    return {"ratio": float(grid[i]), "tokens": tokens, "general_loss": float(g[i]), "domain_loss": float(d[i]),
            "feasible": bool(feasible.any()), "critical_ratio": critical, "reference_general_loss": reference,
            "reference": "before" if general_before is not None else "lowest ratio",
            "ratio_range": [float(grid[0]), float(grid[-1])],
            "physical": bool(np.all(np.isfinite(g)) and np.all(np.isfinite(d)) and (g > 0).all() and (d > 0).all())}


def fit_mixture(points: list[dict], *, law: str = "both", tolerance: float = 0.05,
                target_tokens: float | None = None, source: str = "runs") -> dict:
    """Fit the laws to ``points`` and choose the ratio; returns mixture.json's content (no schedule)."""
    if law not in ("cmr", "dcpt", "both"):
        raise HoneError(f"--law {law!r}: expected cmr, dcpt or both")
    if not tolerance >= 0:
        raise HoneError(f"--tolerance {tolerance}: must be >= 0")
    points = validate_points(points, source)
    trained = [p for p in points if p["tokens"] > 0]
    if not trained:
        raise HoneError(f"{source}: too few points to fit: no run with tokens > 0")
    sizes = sorted({p["model_params"] for p in trained if p["model_params"] is not None})
    size = max(sizes, key=lambda s: sum(p["model_params"] == s for p in trained)) if sizes else None
    target = float(target_tokens or max(p["tokens"] for p in trained))
    ref = reference_losses(points, size)
    out = {"version": 1, "tolerance": tolerance, "target_tokens": target, "model_params": size,
           "loss_before": ref, "laws": {}, "points": points}
    choices = {}
    ratios = [p["ratio"] for p in trained]
    measured = (min(ratios), max(ratios))
    if law in ("cmr", "both"):
        own = [p for p in points if size is None or p["model_params"] in (None, size)]
        fit = fit_cmr(own, source)
        fit["model_params"] = size
        fit["critical_ratio_by_tokens"] = _critical_by_tokens(fit, tolerance, ref["general_loss"])
        out["laws"]["cmr"] = fit
        choices["cmr"] = choose_ratio(lambda r, t: predict_cmr(fit, r, t), target, tolerance, ref["general_loss"],
                                       measured)
    if law in ("dcpt", "both"):
        fit = fit_dcpt_law(points, source)
        out["laws"]["dcpt"] = fit
        choices["dcpt"] = choose_ratio(lambda r, t: predict_dcpt(fit, r, t, size), target, tolerance,
                                        ref["general_loss"], measured)
    for name, c in choices.items():
        out["laws"][name]["choice"] = c
    usable = [k for k in choices if choices[k]["physical"]]
    if not usable:
        raise HoneError(f"{source}: no law gives positive losses over the measured ratios "
                        f"{measured[0]:g}..{measured[1]:g}; measure more points")
    best = max(usable, key=lambda k: mean_r2(out["laws"][k]))
    out["chosen"] = {"law": best, **choices[best]}
    return out


def _critical_by_tokens(fit: dict, tolerance: float, general_before: float | None) -> dict:
    """R*(T) at each budget, and the fit R*(T) = α·T^s + β when there are >= 3 budgets."""
    rows = []
    for s in fit["by_tokens"]:
        if s.get("general_loss") and s.get("domain_loss"):
            c = choose_ratio(lambda r, t, s=s: {k: power_curve(r, s[k]["a"], s[k]["s"], s[k]["b"]) for k in LOSSES},
                             s["tokens"], tolerance, general_before)
            rows.append({"tokens": s["tokens"], "critical_ratio": c["critical_ratio"]})
    out: dict = {"points": rows}
    if len(rows) >= 3:
        out["fit"] = fit_token_curve([r["tokens"] for r in rows], [r["critical_ratio"] for r in rows])
    return out


def mean_r2(law: dict) -> float:
    if law["law"] == "dcpt":
        return float(np.mean([law[k]["r2"] for k in LOSSES]))
    vals = [s[k]["r2"] for s in law["by_tokens"] for k in LOSSES if s.get(k)]
    return float(np.mean(vals))


def predict(mixture: dict, ratio: float, tokens: float | None = None, params: float | None = None,
            law: str | None = None) -> dict[str, float]:
    """Predicted {general_loss, domain_loss} at ``ratio`` from a mixture.json's fitted laws."""
    if not 0.0 <= ratio <= 1.0:
        raise HoneError(f"--ratio {ratio} is outside [0, 1]")
    law = law or mixture.get("chosen", {}).get("law")
    fits = mixture.get("laws", {})
    if law not in fits:
        raise HoneError(f"the mixture file has no fitted {law!r} law (has: {', '.join(fits) or 'none'})")
    tokens = float(tokens or mixture["target_tokens"])
    if tokens <= 0:
        raise HoneError(f"--tokens {tokens}: must be > 0")
    if law == "cmr":
        fitted = fits["cmr"].get("model_params")
        if params is not None and fitted is not None and params != fitted:
            raise HoneError(f"--params {params}: the CMR law was fitted for {fitted} parameters only "
                            "(the D-CPT law, fitted on several sizes, predicts other sizes)")
        pred = predict_cmr(fits["cmr"], [ratio], tokens)
    else:
        pred = predict_dcpt(fits["dcpt"], [ratio], tokens, params)
    return {k: float(pred[k][0]) for k in LOSSES}
