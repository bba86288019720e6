"""Cluster simulator benchmark (issue 7): cost-aware re-planning vs checkpoint-restart and naive
elastic on 128 H100s (16 nodes of 8) running four jobs, at the Llama 3 failure rate and above.

    python benchmarks/cluster_sim.py                       # 54 days, 10 seeds, rate x1, x10, x30, x100
    python benchmarks/cluster_sim.py --seeds 5 --days 30 --out /tmp/cluster-bench

The jobs are benchmarks/cluster_jobs.toml: a 70B pretraining run (weight 4, 64 GPUs), an 8B
continual-pretraining run (weight 2, 32 GPUs), a 1B run (weight 1, 16 GPUs) and a 1.7B
ablation (weight 0.5, 16 GPUs); throughput per node count comes from the planner. The failure
rate x1 is Llama 3's per-GPU rate (419 interruptions / 54 days / 16,384 GPUs, ~50,700 GPU-hours
per failure: ~3.3 failures in 54 days on 128 GPUs); x10 to x100 show where the policies part.
Prints one JSON object: per rate, each policy's goodput (weighted FLOPs / the no-failure ideal)
and the cost-aware policy's weighted-FLOPs ratio to each baseline (mean, min, max over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from hone.heal.failures import LLAMA3_GPU_MTBF_H
from hone.heal.jobs import load_jobs
from hone.heal.simulate import simulate

JOBS = Path(__file__).with_name("cluster_jobs.toml")
POLICIES = ["checkpoint-restart", "naive-elastic", "cost-aware"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--days", type=float, default=54.0)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--rates", default="1,10,30,100", help="multiples of the Llama 3 per-GPU failure rate")
    ap.add_argument("--out", default="",
                    help="also write simulation.json / summary.json / cluster_sim.png per rate here")
    a = ap.parse_args()
    jobs = load_jobs(JOBS)
    out = {"command": "python benchmarks/cluster_sim.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items() if v),
           "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
                      f"{platform.python_version()}",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "cluster": "16 x 8 x H100", "jobs_file": str(JOBS.name), "days": a.days, "seeds": a.seeds, "rates": {}}
    for x in (float(r) for r in a.rates.split(",")):
        t0 = time.perf_counter()
        res = simulate(jobs, n_gpus=128, gpus_per_node=8, gpu="H100", days=a.days, policies=POLICIES,
                       seeds=list(range(a.seeds)), mtbf_h=LLAMA3_GPU_MTBF_H / x)
        wall = time.perf_counter() - t0
        if a.out:
            from hone.heal.cluster_report import write_outputs

            write_outputs(res, Path(a.out) / f"rate-x{x:g}")
        s = res["summary"]
        out["rates"][f"x{x:g}"] = {
            "gpu_mtbf_h": round(LLAMA3_GPU_MTBF_H / x, 1), "cluster_mtbf_h": round(LLAMA3_GPU_MTBF_H / x / 128, 2),
            "failures_per_run": s["cost-aware"]["failures"], "wall_s": round(wall, 2),
            "goodput": {p: {k: round(v, 4) for k, v in s[p]["goodput"].items()} for p in POLICIES},
            "lost_gpu_hours": {p: {k: round(v, 1) for k, v in s[p]["lost_gpu_hours"].items()} for p in POLICIES},
            "reconfigurations": {p: s[p]["reconfigurations"] for p in POLICIES},
            "cost_aware_vs": {p: {k: round(v, 4) for k, v in s[p]["cost_aware_ratio"].items()} for p in POLICIES[:2]},
            # Headroom: no policy can beat a baseline by more than the ideal (no failures) does.
            "ideal_vs": {p: round(1 / s[p]["goodput"]["mean"], 4) for p in POLICIES},
        }
        if "initial_nodes" not in out:
            out["initial_nodes"] = {j["name"]: j["initial_nodes"] for j in res["jobs"]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
