"""Mixture laws on real proxy runs (issue 6): sweep the tiny recipe over domain ratios and
token budgets, fit the CMR and D-CPT laws, then confirm the chosen ratio with fresh runs
(other data orders) and check the predicted losses against the observed spread.

    nice python benchmarks/mix_sweep.py --workdir /tmp/hone-mix-bench     # ~10 min on 2 CPU cores
    nice python benchmarks/mix_sweep.py --workdir /tmp/hone-mix-k3 --set mix.orders=3   # each point a mean of 3 orders

The confirmation runs use data orders the sweep never saw: window seeds 1000 + i, while the
sweep's orders are 0 (streams from their start) and 1 .. mix.orders - 1 (mix.orders <= 64).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from hone.mix.laws import fit_mixture, load_runs, mean_r2, predict
from hone.mix.sweep import _base_model, order_seed, proxy_run
from hone.pipeline import prepare, sweep_mixture
from hone.recipe import load_recipe, shipped_recipe

OVERRIDES = {"mix.ratios": [0.0, 0.25, 0.5, 0.75, 1.0], "mix.tokens": [10240, 20480, 40960],
             "mix.base_tokens": 102400, "train.threads": 2}
CONFIRM_SEED = 1000  # first window seed of the confirmation runs (the sweep's orders use 1 .. 63)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/hone-mix-bench")
    ap.add_argument("--seeds", type=int, default=3, help="confirmation runs (data orders) at the chosen ratio")
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--check-ratios", type=float, nargs="*", default=[0.6],
                    help="off-grid ratios also run (seed 0) to compare predicted and observed losses")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="extra recipe override, e.g. --set mix.lr=1e-3 (repeat)")
    args = ap.parse_args()
    overrides = dict(OVERRIDES)
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    torch.set_num_threads(2)
    workdir = Path(args.workdir)
    recipe = load_recipe(shipped_recipe("tiny-cpu"), overrides)
    quiet = lambda m: None  # noqa: E731
    t0 = time.perf_counter()
    runs = sweep_mixture(recipe, workdir, log=print)
    t_sweep = time.perf_counter() - t0
    points = load_runs(runs)
    target = max(recipe.mix.tokens)
    mixture = fit_mixture(points, law="both", tolerance=args.tolerance, target_tokens=target, source=str(runs))
    chosen = mixture["chosen"]
    data = prepare(recipe, workdir, quiet)
    model, tok, eval_sets = data.model, data.tokenizer, data.eval_sets
    base = _base_model(recipe, workdir, model, quiet)
    t1 = time.perf_counter()
    confirm_seeds = [CONFIRM_SEED + i for i in range(args.seeds)]
    assert not set(confirm_seeds) & {order_seed(k) for k in range(recipe.mix.orders)}  # unseen orders only
    observed = []
    for seed in range(args.seeds):
        rows = proxy_run(recipe, workdir, base, tok, eval_sets, chosen["ratio"], [target],
                         workdir / "mix" / "confirm" / f"r{chosen['ratio']:.4f}-s{seed}",
                         offset_seed=confirm_seeds[seed], log=print)
        if not rows:  # finished before: read it back
            rows = [json.loads((workdir / "mix" / "confirm" / f"seed{seed}.json").read_text())]
        (workdir / "mix" / "confirm" / f"seed{seed}.json").write_text(json.dumps(rows[-1]))
        observed.append(rows[-1])
    t_confirm = time.perf_counter() - t1
    result = {"bench": "mix_sweep", "overrides": overrides,
              "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
              "points": len(points), "sweep_s": round(t_sweep, 1), "confirm_s": round(t_confirm, 1),
              "target_tokens": target, "tolerance": args.tolerance, "orders": recipe.mix.orders,
              "confirm_offset_seeds": confirm_seeds,
              "loss_before": mixture["loss_before"], "chosen": chosen, "laws": {}}
    for name, law in mixture["laws"].items():
        pred = predict(mixture, chosen["ratio"], target, law=name)
        entry = {"mean_r2": round(mean_r2(law), 4), "choice": law["choice"]["ratio"], "predicted_at_chosen": pred}
        if name == "cmr":
            entry["r2"] = {f"{s['tokens']:.0f}": {k: round(s[k]["r2"], 4) for k in ("general_loss", "domain_loss")}
                           for s in law["by_tokens"]}
        else:
            entry["r2"] = {k: round(law[k]["r2"], 4) for k in ("general_loss", "domain_loss")}
        result["laws"][name] = entry
    for key in ("general_loss", "domain_loss"):
        vals = np.array([o[key] for o in observed])
        spread = {"min": float(vals.min()), "max": float(vals.max()), "mean": float(vals.mean()),
                  "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        for name in result["laws"]:
            p = result["laws"][name]["predicted_at_chosen"][key]
            result["laws"][name].setdefault("within_spread", {})[key] = bool(spread["min"] <= p <= spread["max"])
            result["laws"][name].setdefault("error", {})[key] = round(p - spread["mean"], 4)
            if spread["std"] > 0:
                result["laws"][name].setdefault("error_in_sd", {})[key] = round((p - spread["mean"]) / spread["std"], 2)
        result.setdefault("observed", {})[key] = spread
    on_grid = [p for p in points if p["tokens"] == target and abs(p["ratio"] - chosen["ratio"]) < 1e-6]
    if on_grid:  # the sweep's own (mean) point at the chosen ratio, against the confirmation runs
        raw = [json.loads(line) for line in runs.read_text().splitlines()]
        row = next(r for r in raw if r["tokens"] == target and abs(r["ratio"] - chosen["ratio"]) < 1e-6)
        result["sweep_point_at_chosen"] = {k: row[k] for k in row if k not in ("model_params", "ratio", "tokens")}
    result["checks"] = []
    for ratio in args.check_ratios:
        rows = proxy_run(recipe, workdir, base, tok, eval_sets, ratio, [target],
                         workdir / "mix" / "confirm" / f"r{ratio:.4f}-s0", offset_seed=CONFIRM_SEED, log=print)
        check = {"ratio": ratio, "observed": {k: rows[-1][k] for k in ("general_loss", "domain_loss")}}
        for name in mixture["laws"]:
            pred = predict(mixture, ratio, target, law=name)
            check[name] = {k: round(pred[k] - rows[-1][k], 4) for k in pred}
        result["checks"].append(check)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
