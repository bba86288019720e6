"""Per-domain comparison of every variant `hone branch` produced → ``experts/eval.json``.

Variants: the base model, the seed (after a seed phase), each expert, the parameter
average of the experts, their ensemble, and the joint model trained on the union with the
experts' total token budget. Each comes with its training cost (tokens, seconds of
training steps) and its inference cost (forward passes per token: an ensemble runs every
expert).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from hone.evaluate import evaluate_sets, read_texts
from hone.experts.data import heldout_path, read_done
from hone.experts.ensemble import load_model
from hone.experts.merge import average, ensemble
from hone.model.load import pick_device
from hone.rundir import write_json

Log = Callable[[str], None]
EVAL_FILE = "eval.json"


def _score(model, tok, sets: dict[str, list[str]], recipe) -> tuple[dict, float]:
    e = recipe.eval
    t0 = time.perf_counter()
    res = evaluate_sets(model, tok, sets, max_tokens=e.max_tokens_per_set, seq_len=e.seq_len,
                        batch_size=e.batch_size, log=lambda m: None)
    return {k: {f: v[f] for f in ("ppl", "bpb", "nll", "tokens", "docs")} for k,
            v in res.items()}, time.perf_counter() - t0


def compare_variants(b, seed_dir: Path, log: Log) -> dict:
    """Merge the finished experts, score every variant on every domain, write experts/eval.json."""
    root, cfg = b.root, b.cfg
    names = [s.name for s in cfg.domain if (root / s.name / "expert.json").exists()]
    if not names:
        return {}
    sets = {n: read_texts(heldout_path(root / n, b.specs[n])) for n in names}
    if "general" in b.eval_sets:  # forgetting: text none of the experts specialised in
        sets["general"] = read_texts(b.eval_sets["general"])
    finals = [root / n / "final" for n in names]
    t0 = time.perf_counter()
    average(finals, root / "merged" / "average")
    merge_s = time.perf_counter() - t0
    ensemble(finals, root / "merged" / "ensemble", prefix_cap=cfg.prefix_cap, smoothing=cfg.smoothing)
    seed_cost = read_done(root / "seed" / "expert.json") or {}
    variants: dict[str, tuple[Path | None, dict]] = {"base": (None, {"tokens": 0, "train_s": 0.0, "experts": 1})}
    if cfg.seed_tokens:
        variants["seed"] = (seed_dir, {"tokens": seed_cost.get("tokens", 0), "train_s": seed_cost.get("train_s", 0.0),
                                       "experts": 1})
    expert_costs = {n: read_done(root / n / "expert.json") for n in names}
    for n in names:
        variants[n] = (root / n / "final", {"tokens": expert_costs[n]["tokens"], "train_s": expert_costs[n]["train_s"],
                                            "experts": 1})
    total = {"tokens": sum(c["tokens"] for c in expert_costs.values()),
             "train_s": round(sum(c["train_s"] for c in expert_costs.values()), 3)}
    variants["average"] = (root / "merged" / "average", {**total, "merge_s": round(merge_s, 3), "experts": 1})
    variants["ensemble"] = (root / "merged" / "ensemble", {**total, "experts": len(names)})
    if (joint := read_done(root / "joint" / "expert.json")) is not None:
        variants["joint"] = (root / "joint" / "final",
                             {"tokens": joint["tokens"], "train_s": joint["train_s"], "experts": 1})
    device = pick_device(b.recipe.train.device)
    results, costs = {}, {}
    for name, (path, cost) in variants.items():
        model, tok = (b.base, b.tok) if path is None else load_model(path)
        scores, eval_s = _score(model.to(device), tok, sets, b.recipe)
        results[name] = scores
        # "experts" = forward passes per scored token; the seed's cost is shared by every branched variant.
        passes = cost.pop("experts")
        costs[name] = {**cost, "forward_passes_per_token": passes, "eval_s": round(eval_s, 3)}
        log(f"eval {name:<10} " + " | ".join(f"{s} ppl {r['ppl']:.2f}" for s, r in scores.items()))
    out = {"domains": names, "sets": {s: {"tokens": results["base"][s]["tokens"], "docs": results["base"][s]["docs"]}
                                      for s in sets},
           "seed": {"tokens": seed_cost.get("tokens", 0), "train_s": seed_cost.get("train_s", 0.0),
                    "from": cfg.seed, "seed_tokens": cfg.seed_tokens},
           "models": results, "cost": costs,
           "ensemble": {"prefix_cap": cfg.prefix_cap, "smoothing": cfg.smoothing}}
    write_json(root / EVAL_FILE, out)
    log_table(out, log)
    return out


def log_table(out: dict, log: Log) -> None:
    sets = list(out["sets"])
    log(f"{'model':<12}" + "".join(f"{s[:12]:>13}" for s in sets) + f"{'tokens':>12}{'train s':>10}")
    for name, scores in out["models"].items():
        c = out["cost"][name]
        log(f"{name:<12}" + "".join(f"{scores[s]['ppl']:>13.2f}" for s in sets)
            + f"{c['tokens']:>12,}{c['train_s']:>10.1f}")
