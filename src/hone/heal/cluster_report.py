"""Outputs of `hone cluster simulate`: the text table, the JSON files and the plot."""

from __future__ import annotations

from pathlib import Path

from hone.heal.simulate import BUCKETS
from hone.rundir import atomic_path, ensure_dir, write_json

COLORS = {"checkpoint-restart": "#C44E52", "naive-elastic": "#DD8452", "cost-aware": "#55A868"}
BUCKET_COLORS = {"rollback": "#C44E52", "restart": "#DD8452", "checkpoint": "#8172B2", "idle": "#937860",
                 "down": "#8C8C8C"}


def format_text(res: dict) -> str:
    c = res["config"]
    rate = (f"per-GPU MTBF {c['gpu_mtbf_h']:,.0f} h (cluster MTBF {c['cluster_mtbf_h']:.1f} h)" if c["gpu_mtbf_h"]
            else f"trace {c['trace']}")
    lines = [f"{c['gpus']} x {c['gpu']} ({c['nodes']} nodes of {c['gpus_per_node']}), {c['days']:g} days, {rate}, "
             f"repair {c['repair']} h, {len(c['seeds'])} seed(s)",
             "jobs: " + "; ".join(f"{j['name']} ({j['model']}, w={j['weight']:g}) on {j['initial_nodes']} nodes"
                                 for j in res["jobs"]),
             "",
             f"{'policy':<19} {'goodput':>8} {'min':>7} {'max':>7} {'wPFLOP':>12} {'failures':>8} {'reconf':>6} "
             + " ".join(f"{b:>10}" for b in (*BUCKETS[1:], "lost")) + "   (lost GPU-hours, mean)"]
    for p, s in res["summary"].items():
        g, lost = s["goodput"], s["lost_gpu_hours"]
        lines.append(f"{p:<19} {g['mean']:>8.2%} {g['min']:>7.2%} {g['max']:>7.2%} "
                     f"{s['weighted_flops']['mean'] / 1e15:>12,.0f} "
                     f"{s['failures']:>8.1f} {s['reconfigurations']:>6.1f} "
                     + " ".join(f"{lost[b]:>10,.1f}" for b in (*BUCKETS[1:], "lost")))
    lines.append("useful tokens (mean, billions): " + "; ".join(
        f"{p} " + ", ".join(f"{n} {v / 1e9:,.1f}" for n, v in s["useful_tokens"].items()) for p,
        s in res["summary"].items()))
    for p, s in res["summary"].items():
        if "cost_aware_ratio" in s:
            r = s["cost_aware_ratio"]
            lines.append(f"cost-aware / {p}: mean {r['mean']:.4f}x, min {r['min']:.4f}x, max {r['max']:.4f}x")
    return "\n".join(lines)


def write_outputs(res: dict, out: Path) -> dict:
    """simulation.json (everything), summary.json, cluster_sim.png; each written then renamed."""
    ensure_dir(out)
    paths = {"simulation": out / "simulation.json", "summary": out / "summary.json", "plot": out / "cluster_sim.png"}
    write_json(paths["simulation"], res)
    write_json(paths["summary"], {"config": res["config"], "ideal_weighted_flops": res["ideal_weighted_flops"],
                                  "summary": res["summary"]})
    plot(res, paths["plot"])
    return paths


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    pols = list(res["summary"])
    fig = plt.figure(figsize=(11, 3.2 + 1.8 * len(pols)))
    grid = fig.add_gridspec(1 + len(pols), 2, height_ratios=[2.2] + [1] * len(pols))
    ax = fig.add_subplot(grid[0, 0])
    g = [res["summary"][p]["goodput"] for p in pols]
    ax.bar(pols, [x["mean"] for x in g], color=[COLORS.get(p, "#4C72B0") for p in pols],
           yerr=[[x["mean"] - x["min"] for x in g], [x["max"] - x["mean"] for x in g]], capsize=4)
    lo = min(x["min"] for x in g)
    ax.set_ylim(max(0.0, lo - (1 - lo) * 0.5 - 0.01), 1.0)
    ax.set_ylabel("weighted FLOPs / ideal")
    ax.set_title(f"Goodput, mean and min-max over {len(res['config']['seeds'])} seed(s)")
    ax = fig.add_subplot(grid[0, 1])
    bottom = [0.0] * len(pols)
    for b in BUCKETS[1:]:
        vals = [res["summary"][p]["lost_gpu_hours"][b] for p in pols]
        ax.bar(pols, vals, bottom=bottom, label=b, color=BUCKET_COLORS[b])
        bottom = [x + y for x, y in zip(bottom, vals)]
    ax.set_ylabel("GPU-hours (mean)")
    ax.set_title("Lost GPU-hours")
    ax.legend(fontsize=8)
    # Show the seed whose failures hit jobs most often: the first seed may have none.
    seed = max(res["config"]["seeds"],
               key=lambda sd: (sum(r["failures"]["hit_jobs"] for r in res["runs"] if r["seed"] == sd), -sd))
    names = [j["name"] for j in res["jobs"]]
    for i, p in enumerate(pols):
        ax = fig.add_subplot(grid[1 + i, :])
        run = next(r for r in res["runs"] if r["policy"] == p and r["seed"] == seed)
        tl = run["timeline"] + [[res["config"]["days"] * 24] + run["timeline"][-1][1:]]
        xs = [row[0] for row in tl]
        ax.stackplot(xs, *[[row[1 + k] for row in tl] for k in range(len(names))], labels=names, step="post")
        for e in run["events"]:
            if e["event"].endswith("failure"):
                ax.axvline(e["t_h"], color="k", lw=0.6, ls=":")
        ax.set_ylim(0, res["config"]["nodes"])
        ax.set_xlim(0, res["config"]["days"] * 24)
        ax.set_ylabel("nodes")
        ax.set_title(f"{p}: nodes per job, seed {seed} (dotted: failures)", fontsize=9)
        if i == 0:
            ax.legend(fontsize=7, loc="lower left", ncol=len(names))
    ax.set_xlabel("hours")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
