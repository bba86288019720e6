"""Matplotlib figures for the report, each returned as a base64 PNG."""

from __future__ import annotations

import base64
import io

import numpy as np

from hone.mix.laws import predict_dcpt


def _pyplot():
    """matplotlib's pyplot on the Agg backend, imported at the first plot: 0.6 s that a process
    pays only when it draws (every `hone` command that trains imports the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def funnel(stages: list[tuple[str, int]]) -> str:
    """Documents left after each curation step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 0.55 * len(stages) + 1))
    names = [s for s, _ in stages][::-1]
    counts = [n for _, n in stages][::-1]
    bars = ax.barh(names, counts, color="#4C72B0")
    ax.bar_label(bars, labels=[f"{c:,}" for c in counts], padding=3)
    ax.set_xlabel("documents")
    ax.set_title("Corpus funnel")
    ax.margins(x=0.15)
    return _png(fig)


def drop_reasons(reasons: dict[str, int]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 0.4 * max(1, len(reasons)) + 1.2))
    items = sorted(reasons.items(), key=lambda kv: kv[1])
    bars = ax.barh([k for k, _ in items], [v for _, v in items], color="#C44E52")
    ax.bar_label(bars, padding=3)
    ax.set_xlabel("documents dropped")
    ax.set_title("Drop reasons")
    ax.margins(x=0.15)
    return _png(fig)


def retrieval(metrics: dict) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3))
    keys = ["precision", "recall", "f1"]
    vals = [metrics.get(k) or 0.0 for k in keys]
    bars = ax.bar(keys, vals, color=["#55A868", "#8172B2", "#CCB974"])
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in vals])
    ax.set_ylim(0, 1.1)
    ax.set_title("Domain retrieval vs hidden labels")
    return _png(fig)


def _ema(values: list[float], alpha: float = 0.2) -> list[float]:
    """Bias-corrected exponential moving average: small batches make raw loss noisy."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


def loss_curves(metrics: list[dict]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    steps = [m["step"] for m in metrics]
    losses = [m["loss"] for m in metrics]
    ax.plot(steps, losses, label="batch loss", color="black", lw=0.8, alpha=0.35)
    ax.plot(steps, _ema(losses), label="batch loss (smoothed)", color="black", lw=2)
    domains = sorted({d for m in metrics for d in m.get("loss_by_domain", {})})
    for d in domains:
        pts = [(m["step"], m["loss_by_domain"][d]) for m in metrics if d in m.get("loss_by_domain", {})]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{d} sequences", lw=1, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig)


def learning_rate(metrics: list[dict], schedule: str = "") -> str:
    """The learning rate of every logged step (metrics.jsonl's ``lr``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 2.4))
    pts = [(m["step"], m["lr"]) for m in metrics if m.get("lr") is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#DD8452", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_ylim(bottom=0)
    ax.set_title("Learning rate" + (f" ({schedule} schedule)" if schedule else ""))
    ax.grid(alpha=0.3)
    return _png(fig)


def perplexity(table: dict[str, dict]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    names = list(table)
    x = range(len(names))
    w = 0.38
    before = [table[n]["ppl_before"] for n in names]
    after = [table[n]["ppl_after"] for n in names]
    b1 = ax.bar([i - w / 2 for i in x], before, w, label="before", color="#8C8C8C")
    b2 = ax.bar([i + w / 2 for i in x], after, w, label="after", color="#4C72B0")
    ax.bar_label(b1, labels=[f"{v:.1f}" for v in before], fontsize=8)
    ax.bar_label(b2, labels=[f"{v:.1f}\n({table[n]['ppl_change']:+.1%})" for v, n in zip(after, names)], fontsize=8)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity before / after, per evaluation set")
    ax.margins(y=0.25)
    ax.legend()
    return _png(fig)


def loss_limits(values: list[float], margin: float = 0.1) -> tuple[float, float] | None:
    """Y-axis limits that follow the measured losses with a margin of ``margin`` of their span
    (at least 0.02 nats), so a fitted curve that leaves their range (CMR near ratio 0) is clipped
    at the axes instead of flattening the points. None without values."""
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    pad = max((hi - lo) * margin, 0.02)
    return lo - pad, hi + pad


def mixture_fits(points: list[dict], mixture: dict | None) -> str:
    """General and domain loss vs domain ratio: the proxy runs' points per token budget, the
    fitted CMR curves (solid) and D-CPT curves (dashed), the tolerance line and the chosen ratio."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    trained = [p for p in points if p["tokens"] > 0]
    budgets = sorted({p["tokens"] for p in trained})
    colors = plt.cm.viridis(np.linspace(0.1, 0.85, max(1, len(budgets))))
    grid = np.linspace(0, 1, 201)
    laws = (mixture or {}).get("laws", {})
    for ax, key, title in zip(axes, ("general_loss", "domain_loss"), ("General loss", "Domain loss")):
        shown = [p[key] for p in trained if p[key] is not None]  # the y-range: measured points and reference lines
        for t, c in zip(budgets, colors):
            pts = [(p["ratio"], p[key]) for p in trained if p["tokens"] == t and p[key] is not None]
            ax.scatter([x for x, _ in pts], [y for _, y in pts], color=c, s=22, zorder=3, label=f"{t:,.0f} tokens")
            cmr = next((s for s in laws.get("cmr", {}).get("by_tokens", []) if s["tokens"] == t and s.get(key)), None)
            if cmr:
                f = cmr[key]
                with np.errstate(divide="ignore"):  # s < 0: the curve leaves the axes at ratio 0
                    ax.plot(grid, f["a"] * grid ** f["s"] + f["b"], color=c, lw=1.4)
            if "dcpt" in laws:
                ax.plot(grid, predict_dcpt(laws["dcpt"], grid, t, mixture.get("model_params"))[key], color=c, lw=1,
                        ls="--")
        before = (mixture or {}).get("loss_before", {}).get(key)
        if before is None:
            before = next((p[key] for p in points if p["tokens"] == 0 and p[key] is not None), None)
        if before is not None:
            ax.axhline(before, color="gray", lw=0.8, ls=":", label="before")
            shown.append(before)
        if key == "general_loss" and mixture and mixture.get("chosen"):
            ref = mixture["chosen"].get("reference_general_loss")
            if ref is not None:
                ax.axhline(ref + mixture["tolerance"], color="#C44E52", lw=0.8, ls="-.", label="tolerance")
                shown.append(ref + mixture["tolerance"])
        limits = loss_limits(shown)
        if limits is not None:
            ax.set_ylim(*limits)  # lines are clipped at the axes
        if mixture and mixture.get("chosen"):
            ax.axvline(mixture["chosen"]["ratio"], color="#C44E52", lw=1.2,
                       label=f"chosen {mixture['chosen']['ratio']:.3f}")
        ax.set_xlabel("domain ratio")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(title + (" (solid: CMR, dashed: D-CPT)" if laws and key == "general_loss" else ""), fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    return _png(fig)


def experts(out: dict) -> str:
    """Domain experts: perplexity per evaluation set (groups) for every variant (bars), log scale."""
    plt = _pyplot()
    sets, models = list(out["sets"]), list(out["models"])
    fig, ax = plt.subplots(figsize=(min(11, 2.2 + 1.6 * len(sets)), 3.8))
    w = 0.8 / len(models)
    colors = plt.cm.tab10(np.arange(len(models)) % 10)
    for i, (m, c) in enumerate(zip(models, colors)):
        vals = [out["models"][m][s]["ppl"] for s in sets]
        ax.bar([j - 0.4 + (i + 0.5) * w for j in range(len(sets))], vals, w, label=m, color=c)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("Domain experts: perplexity per held-out set")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def decision_curve(decision: dict, metrics: list[dict]) -> str:
    """The training loss over tokens, the law's predicted eval losses at the chosen ratio over it,
    and the measured eval losses at the end."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if metrics:
        tokens = [m["tokens"] for m in metrics]
        ax.plot(tokens, _ema([m["loss"] for m in metrics]), color="black", lw=1.5, label="training loss (smoothed)")
    colors = {"domain_loss": "tab:green", "general_loss": "tab:blue"}
    curve = decision.get("curve") or []
    measured = decision.get("measured") or {}
    for key, color in colors.items():
        name = key.replace("_loss", "")
        if curve:
            ax.plot([c["tokens"] for c in curve], [c[key] for c in curve], ls="--", color=color,
                    label=f"{name} loss predicted by the law")
        if measured.get(key) is not None:
            ax.plot([decision["tokens"]], [measured[key]], "o", color=color, label=f"{name} loss measured")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("nats/token")
    ax.set_title(f"Predicted and measured loss at domain ratio {decision['ratio']:.2f}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)
