"""`hone cluster simulate`: several training jobs on a cluster that fails, under each recovery policy.

    hone cluster simulate --jobs jobs.toml --gpus 128 --days 30 --mtbf llama3 --seeds 5
    hone cluster simulate --jobs jobs.toml --gpus 16 --days 2 --trace failures.csv --policy cost-aware --json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from hone.errors import HoneError
from hone.heal.cluster_report import format_text, write_outputs
from hone.heal.failures import parse_mtbf
from hone.heal.jobs import load_jobs
from hone.heal.simulate import simulate as run

cluster_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Simulate training jobs sharing a cluster that fails.")

POLICY_HELP = ("checkpoint-restart, naive-elastic, cost-aware; repeat or comma-separate (default: all three).")


@cluster_app.command()
def simulate(jobs: Path = typer.Option(..., "--jobs",
                                       help="JOBS.toml: [[job]] tables (name, model, seq, global_batch, weight, "
                                            "tokens|hours, min_gpus, max_gpus)."),
             gpus: int = typer.Option(..., "--gpus", help="GPUs in the cluster (a multiple of --gpus-per-node)."),
             days: float = typer.Option(30.0, "--days", help="Simulated days."),
             trace: Optional[Path] = typer.Option(None, "--trace",
                                                  help="Failures from a CSV / JSON-lines file: time_h, node or gpu, "
                                                       "kind, repair_h."),
             mtbf: Optional[str] = typer.Option(None, "--mtbf",
                                                help="Generate failures at this per-GPU MTBF in hours, or 'llama3' "
                                                     "(~50,676 h: 419 failures in 54 days on 16,384 GPUs). With "
                                                     "--trace: the MTBF the policies assume."),
             policy: Optional[List[str]] = typer.Option(None, "--policy", help=POLICY_HELP),
             seed: int = typer.Option(0, "--seed", help="First seed."),
             seeds: int = typer.Option(1, "--seeds",
                                       help="Number of seeds (seed, seed+1, ...): failures differ per seed, policies "
                                            "share them."),
             out: Path = typer.Option(Path("cluster-sim"), "--out",
                                      help="Directory for simulation.json, summary.json and cluster_sim.png."),
             as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
             gpu: str = typer.Option("H100", "--gpu", help="GPU type of the planner's presets (H100, A100-80GB, ...)."),
             gpus_per_node: int = typer.Option(8, "--gpus-per-node",
                                               help="GPUs per node: the unit of allocation and of hardware faults."),
             repair: str = typer.Option("lognormal:4,1", "--repair",
                                        help="Hardware repair time in hours: const:H, exp:MEAN or "
                                             "lognormal:MEDIAN,SIGMA."),
             hardware_fraction: float = typer.Option(0.78, "--hardware-fraction",
                                                     help="Share of generated failures that take a node down (Llama 3: "
                                                          "~78%); the rest restart in place.")):
    """Compare recovery policies: weighted FLOPs, lost GPU-hours by cause, reconfigurations, a plot."""
    if trace is None and mtbf is None:
        raise HoneError("give --trace FILE or --mtbf HOURS (per-GPU MTBF in hours, or 'llama3')")
    if seeds < 1:
        raise HoneError(f"--seeds must be at least 1 (got {seeds})")
    policies = [p.strip() for item in (policy or ["checkpoint-restart,naive-elastic,cost-aware"])
                for p in item.split(",") if p.strip()]
    job_list = load_jobs(jobs)
    res = run(job_list, n_gpus=gpus, days=days, policies=list(dict.fromkeys(policies)),
              seeds=list(range(seed, seed + seeds)), gpus_per_node=gpus_per_node, gpu=gpu,
              mtbf_h=parse_mtbf(mtbf) if mtbf is not None else None, trace=trace, repair=repair,
              hardware_fraction=hardware_fraction, where=str(jobs))
    paths = write_outputs(res, out)
    if as_json:
        print(json.dumps({"config": res["config"], "ideal_weighted_flops": res["ideal_weighted_flops"],
                          "summary": res["summary"], "outputs": {k: str(v) for k, v in paths.items()}}, indent=2))
    else:
        print(format_text(res))
        print(f"wrote {paths['simulation']}, {paths['summary']}, {paths['plot']}")
