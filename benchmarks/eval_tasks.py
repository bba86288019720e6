"""Cost and agreement of the task evaluation (eval.tasks) on a run's model, side by side.

    PYTHONPATH=src python benchmarks/eval_tasks.py --model /tmp/tasks-demo/base --workdir /tmp/tasks-demo \
        [--limit 60] [--hflm]

In one process, on the run's packaged tasks (WORKDIR/tasks/) and held-out sets (WORKDIR/heldout/):

- ``hone``: ``run_tasks`` through Hone's lm-eval ``LM`` on Hone's Llama (8 questions per forward,
  each read once with its four choices in the same row; benchmarks/task_batching.py compares that
  with one question at a time);
- ``full_logits``: the same ``LM`` on the same weights through the generic path (every
  question + choice read whole, the model's whole logits, as for a transformers-backend model):
  accuracy must be equal;
- ``perplexity``: the perplexity evaluation of the ``domain`` and ``general`` sets (their first
  ``--limit`` documents), the cost the run already pays before and after training (the
  baseline the tasks add to);
- ``hflm`` (``--hflm``): lm-eval's own HFLM on the HF directory (transformers), the reference
  implementation; its log-likelihoods lack Hone's end-of-text prefix, so its accuracy may differ
  by a few items.

Prints JSON: seconds and accuracy of each, and the ratios to ``hone``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from hone.cli.eval import load_scored_model
from hone.evaluate import evaluate_sets, read_texts
from hone.evaluate_tasks import run_tasks

TASKS = ["hone_go_term", "hone_wiki_title"]


class Generic(torch.nn.Module):
    """The model behind a module that is not Hone's Llama: run_tasks takes its full-logits path."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(ids)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 2)


def accuracies(results: dict) -> dict:
    return {k: {m: round(v[m], 4) for m in ("acc", "acc_norm") if m in v} | {"n": v["n"]} for k, v in results.items()}


def hflm_results(model_dir: Path, include: list[Path], limit: int | None) -> dict:
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model_dir), device="cpu", batch_size=8, dtype="float32")
    tm = TaskManager(include_path=[str(p) for p in include], include_defaults=False)
    out = lm_eval.evaluator.evaluate(lm, tm.load(TASKS), limit=limit, log_samples=False, verbosity="ERROR")
    return {k: {"acc": v["acc,none"], "acc_norm": v.get("acc_norm,none"), "n": int(out["n-samples"][k]["effective"])}
            for k, v in out["results"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="HF model directory (e.g. WORKDIR/base)")
    ap.add_argument("--workdir", type=Path, required=True, help="run directory with tasks/ and heldout/")
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    ap.add_argument("--hflm", action="store_true", help="also lm-eval's HFLM on the HF directory")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    model, tok, conv = load_scored_model(str(args.model))
    model.eval()
    include = [args.workdir / "tasks"]
    quiet = dict(include=include, limit=args.limit, max_len=512, batch_size=8, log=lambda m: None)
    hone, t_hone = timed(lambda: run_tasks(model, tok, conv, TASKS, **quiet))
    full, t_full = timed(lambda: run_tasks(Generic(model), tok, conv, TASKS, **quiet))
    # the perplexity baseline scores as many held-out documents as the tasks have items
    sets = {n: read_texts(args.workdir / "heldout" / f"{n}.jsonl")[:args.limit] for n in ("domain", "general")}
    _, t_ppl = timed(lambda: evaluate_sets(model, tok, sets, seq_len=512, batch_size=4, conventions=conv,
                                           log=lambda m: None))
    out = {"model": str(args.model), "limit": args.limit, "threads": torch.get_num_threads(),
           "hone": {"s": t_hone, "tasks": accuracies(hone)},
           "full_logits": {"s": t_full, "tasks": accuracies(full),
                           "same_as_hone": accuracies(full) == accuracies(hone)},
           "perplexity_domain_general": {"s": t_ppl},
           "ratio_full_logits_to_hone": round(t_full / t_hone, 3),
           "ratio_tasks_to_perplexity": round(t_hone / t_ppl, 3)}
    if args.hflm:
        ref, t_ref = timed(lambda: hflm_results(args.model, include, args.limit))
        out["hflm"] = {"s": t_ref, "tasks": accuracies(ref)}
        out["ratio_hflm_to_hone"] = round(t_ref / t_hone, 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
