"""Loss with and without document masks on the demo recipe (``train.doc_mask`` true, then false).

Both runs share one run directory: the second keeps the data stages and the "before" evaluation
and trains again from the base (``fresh_training``), so only the attention differs.

    PYTHONPATH=src python benchmarks/doc_mask.py --workdir /tmp/docmask-bench [--max-tokens 5120 --eval-tokens 2048]

``--max-tokens`` / ``--eval-tokens`` shorten the run (train.max_tokens, eval.max_tokens_per_set) and
skip the before/after completions, for a busy machine.

Prints JSON: for each setting the final train loss (and the mean of the last 5 steps), the median
step's tokens/s, wall seconds, and the eval table (domain / general perplexity before and after).

``--step-only`` times one training step (forward + backward) of a SmolLM2-135M-shaped model cut to
``--layers`` layers on demo-like packed rows instead, masks on and off alternating, the fastest
of ``--repeats`` each: the attention's cost, steadier than whole runs on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hone.model.documents import set_doc_eos_id
from hone.model.llama import Llama, LlamaConfig
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


def step_times(layers: int, repeats: int, seq: int = 256, batch: int = 4, doc_len: int = 48) -> dict:
    """Fastest forward + backward of each setting on rows packed with ``doc_len``-token documents
    (the demo's held-out documents average ~48 tokens)."""
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0)
    model = Llama(cfg).init_weights(seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, cfg.vocab_size, (batch, seq + 1), generator=g)
    ids[:, doc_len - 1::doc_len] = 0  # EOS every doc_len tokens
    x, y = ids[:, :-1], ids[:, 1:]
    best = {True: float("inf"), False: float("inf")}
    for _ in range(repeats):
        for on in (True, False):
            set_doc_eos_id(model, 0 if on else None)
            t0 = time.perf_counter()
            model(x, y)[0].backward()
            best[on] = min(best[on], time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    tokens = batch * seq
    return {"layers": layers, "tokens_per_step": tokens, "threads": torch.get_num_threads(),
            "tokens_per_s_on": round(tokens / best[True], 1), "tokens_per_s_off": round(tokens / best[False], 1),
            "ratio_on_over_off": round(best[False] / best[True], 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/docmask-bench"))
    p.add_argument("--max-tokens", type=int, default=None, help="train.max_tokens (default: the recipe's)")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="eval.max_tokens_per_set, and no completions (default: the recipe's, every document)")
    p.add_argument("--step-only", action="store_true", help="time training steps only (see the docstring)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if args.step_only:
        print(json.dumps(step_times(args.layers, args.repeats), indent=1))
        return
    runs = [one_run(args.workdir, True, args.max_tokens, args.eval_tokens, fresh=True),
            one_run(args.workdir, False, args.max_tokens, args.eval_tokens, fresh=False)]
    on, off = runs
    print(json.dumps({"runs": runs, "tokens_per_s_ratio_on_over_off":
                      round(on["median_tokens_per_s"] / off["median_tokens_per_s"], 3)}, indent=1))


if __name__ == "__main__":
    main()
