"""Task scoring on Hone's Llama: questions batched with their choices in one forward (the
evaluation's path) against one question at a time through a KV cache its choices share (the
path before), side by side in one process, on a run's packaged Gene Ontology task. Prints JSON.

    PYTHONPATH=src python benchmarks/task_batching.py --model runs/demo/base --workdir runs/demo [--items 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hone.cli.eval import load_scored_model
from hone.evaluate_tasks import _shared_context_scores, _tree_scores, encode_pair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="HF model directory (e.g. WORKDIR/base)")
    ap.add_argument("--workdir", type=Path, required=True, help="run directory with tasks/hone_go_term.jsonl")
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="questions per forward (eval's batch_size)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model, tok, conv = load_scored_model(str(args.model))
    model.eval()
    rows = [json.loads(line) for line in (args.workdir / "tasks" / "hone_go_term.jsonl").open()][:args.items]
    items = []
    for row in rows:
        pairs = [encode_pair(tok, f"Definition: {row['question']}\nGene Ontology term:", " " + c)
                 for c in row["choices"]]
        items.append((conv.context() + pairs[0][0], [p[1] for p in pairs]))
    out = []
    with torch.no_grad():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            one = [_shared_context_scores(model, ctx, conts, conv.pad) for ctx, conts in items]
            t1 = time.perf_counter()
            batched = [s for i in range(0, len(items), args.batch)
                       for s in _tree_scores(model, items[i:i + args.batch], conv.pad)]
            t2 = time.perf_counter()
            diff = max(abs(a[0] - b[0]) for x, y in zip(one, batched) for a, b in zip(x, y))
            out.append({"one_question_kv_s": round(t1 - t0, 2), "batched_s": round(t2 - t1, 2),
                        "ratio": round((t1 - t0) / (t2 - t1), 2), "max_abs_loglik_diff": diff,
                        "same_choice": [max(range(4), key=lambda k: x[k][0]) for x in one]
                        == [max(range(4), key=lambda k: y[k][0]) for y in batched]})
    print(json.dumps({"model": str(args.model), "items": len(items), "batch": args.batch,
                      "threads": torch.get_num_threads(), "runs": out}, indent=1))


if __name__ == "__main__":
    main()
