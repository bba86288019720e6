"""Domain experts (issue 8): Branch-Train-Merge on the packaged corpora (biomedical = Gene
Ontology, legal = SPDX licenses, code = Python stdlib) against one jointly trained model
at equal total tokens. Runs `hone branch RECIPE --with-joint` in a fresh directory and reads
experts/eval.json: per-domain perplexity of base, seed, each expert, the parameter average,
the ensemble and the joint model, with training tokens and seconds and evaluation seconds.

    nice python benchmarks/experts_bench.py                          # tiny recipe, ~5 min on 2 cores
    nice python benchmarks/experts_bench.py --recipe smollm2-experts # SmolLM2-135M, ~15 min

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from hone.pipeline import branch_experts
from hone.recipe import load_recipe, shipped_recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="tiny-experts", help="shipped recipe name or a TOML path")
    ap.add_argument("--workdir", default=None, help="default: /tmp/hone-experts-bench-<recipe>")
    ap.add_argument("--keep", action="store_true", help="reuse the work directory (finished experts are skipped)")
    args = ap.parse_args()
    path = Path(args.recipe) if args.recipe.endswith(".toml") else shipped_recipe(args.recipe)
    recipe = load_recipe(path)
    workdir = Path(args.workdir or f"/tmp/hone-experts-bench-{path.stem}")
    if workdir.exists() and not args.keep:
        shutil.rmtree(workdir)
    t0 = time.perf_counter()
    out = branch_experts(recipe, workdir, recipe_path=path, with_joint=True, log=lambda m: print(m, flush=True))
    wall = time.perf_counter() - t0
    table = {m: {s: round(r["ppl"], 3) for s, r in scores.items()} for m, scores in out["models"].items()}
    bpb = {m: {s: round(r["bpb"], 4) for s, r in scores.items()} for m, scores in out["models"].items()}
    domains = out["domains"]
    best_single = {d: min(table[e][d] for e in domains) for d in domains}
    result = {
        "benchmark": "experts", "recipe": path.stem, "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.is_available(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
        "wall_s": round(wall, 1), "sets": out["sets"], "ppl": table, "bpb": bpb, "cost": out["cost"],
        "seed": out["seed"],
        # How each combination fares on the expert's own domain: < 1 beats the matching expert.
        "ppl_vs_own_expert": {m: {d: round(table[m][d] / table[d][d], 3) for d in domains}
                              for m in ("average", "ensemble", "joint") if m in table},
        "best_single_expert": best_single,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
