"""Loss with and without document masks on the demo recipe (``train.doc_mask`` true, then false).

Both runs share one run directory: the second keeps the data stages and the "before" evaluation
and trains again from the base (``fresh_training``), so only the attention differs.

    PYTHONPATH=src python benchmarks/doc_mask.py --workdir /tmp/docmask-bench [--max-tokens 5120 --eval-tokens 2048]

``--max-tokens`` / ``--eval-tokens`` shorten the run (train.max_tokens, eval.max_tokens_per_set) and
skip the before/after completions, for a busy machine.

Prints JSON: for each setting the final train loss (and the mean of the last 5 steps), the median
step's tokens/s, wall seconds, and the eval table (domain / general perplexity before and after).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from hone.pipeline import run_recipe
from hone.recipe import load_recipe, shipped_recipe
from hone.rundir import read_json


def one_run(workdir: Path, doc_mask: bool, max_tokens: int | None, eval_tokens: int | None, fresh: bool) -> dict:
    overrides = {"train.doc_mask": doc_mask, **({"train.max_tokens": max_tokens} if max_tokens else {})}
    if eval_tokens:
        overrides.update({"eval.max_tokens_per_set": eval_tokens, "eval.prompts": []})
    recipe = load_recipe(shipped_recipe("demo-biomed"), overrides)
    t0 = time.perf_counter()
    table = run_recipe(recipe, workdir, fresh=fresh, fresh_training=not fresh, log=lambda m: print(m, flush=True))
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows]
    return {"doc_mask": doc_mask, "steps": len(rows), "final_loss": losses[-1],
            "last5_loss": statistics.mean(losses[-5:]),
            "median_tokens_per_s": round(statistics.median(r["tokens"] / r["step"] / r["step_s"] for r in rows), 1),
            "wall_s": round(wall, 1), "eval": table or read_json(workdir / "eval.json")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/docmask-bench"))
    p.add_argument("--max-tokens", type=int, default=None, help="train.max_tokens (default: the recipe's)")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="eval.max_tokens_per_set, and no completions (default: the recipe's, every document)")
    args = p.parse_args()
    runs = [one_run(args.workdir, True, args.max_tokens, args.eval_tokens, fresh=True),
            one_run(args.workdir, False, args.max_tokens, args.eval_tokens, fresh=False)]
    on, off = runs
    print(json.dumps({"runs": runs, "tokens_per_s_ratio_on_over_off":
                      round(on["median_tokens_per_s"] / off["median_tokens_per_s"], 3)}, indent=1))


if __name__ == "__main__":
    main()
