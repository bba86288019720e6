"""How good are the decision's predictions? Several budget runs of recipes/budget-cpu.toml on this
CPU (different token budgets and tolerances, hence ratios), each decided, trained and measured;
prints every run's relative errors and, per prediction, the mean, spread (sd) and largest |error|.

    PYTHONPATH=src python benchmarks/decision_error.py --workdir /tmp/decision-bench

One run directory: the data stages and the sweep's points are made once and reused; each run
decides again (a new budget) and trains from the start (--fresh training).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hone.pipeline import run_recipe  # noqa: E402
from hone.recipe import load_recipe  # noqa: E402
from hone.rundir import read_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("step_time_s", "tokens_per_s", "memory_gib_per_gpu", "hours", "domain_loss", "general_loss")


def runs(quick: bool) -> list[dict]:
    """(budget, tolerance) pairs: two token budgets x two tolerances over the best ratio."""
    tokens = [16384, 49152] if not quick else [8192]
    tolerances = [0.02, 0.5] if not quick else [0.5]
    return [{"budget.tokens": t, "budget.gpu_hours": None, "budget.general_tolerance": tol,
             "budget.general_tolerance_reference": "best"} for t in tokens for tol in tolerances]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/decision-bench")
    ap.add_argument("--quick", action="store_true", help="one run")
    args = ap.parse_args()
    rows = []
    base = {"mix.tokens": [2048, 4096, 8192], "run.workdir": args.workdir}
    for i, over in enumerate(runs(args.quick)):
        recipe = load_recipe(ROOT / "recipes" / "budget-cpu.toml", {**base, **over})
        t0 = time.perf_counter()
        run_recipe(recipe, fresh_training=i > 0, log=lambda m: None)
        d = read_json(Path(args.workdir) / "plan" / "decision.json")
        rows.append({"tokens": d["tokens"], "ratio": d["ratio"], "tolerance": over["budget.general_tolerance"],
                     "wall_s": round(time.perf_counter() - t0, 1),
                     "predicted": {k: d["predicted"][k] for k in KEYS},
                     "measured": {k: d["measured"][k] for k in KEYS},
                     "error": {k: d["error"][k] for k in KEYS}})
        print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for k in KEYS:
        errs = [r["error"][k] for r in rows if r["error"][k] is not None]
        if errs:
            summary[k] = {"mean": statistics.mean(errs), "sd": statistics.stdev(errs) if len(errs) > 1 else 0.0,
                          "max_abs": max(abs(e) for e in errs), "n": len(errs)}
    print(json.dumps({"runs": len(rows), "relative_error": summary}, indent=1))


if __name__ == "__main__":
    main()
