"""Tracking overhead per training step: no backend against W&B (offline) and MLflow (a local
file store), side by side in this process.

A tiny Llama (2 layers, hidden 64) trains ``--steps`` steps of 8 x 64 tokens on synthetic token
streams, once per backend per repeat, the backends in a rotating order; the figure per run is
the median ``step_s`` of metrics.jsonl over steps 3.. (``step_s`` of a step includes sending the
previous step's scalars), and the ratio is a backend's median over the repeats against no
backend's. A tiny model makes the per-step cost of tracking as large a share as it can be.
``log_step_ms``: the time of one step's sending alone (``Trackers.log_step``, 200 calls per backend).

    python benchmarks/tracking_overhead.py --steps 40 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hone.model.llama import Llama, LlamaConfig
from hone.recipe import TrainConfig
from hone.rundir import write_json
from hone.tokens import load_tokens
from hone.train.data import MixtureLoader, TokenStream
from hone.train.loop import train
from hone.train.tracking import Tracking, open_tracking

CFG = TrainConfig(seq_len=64, batch_size=8, lr=3e-3, warmup_steps=2, log_every=1000)


def token_dir(root: Path, name: str, lo: int) -> Path:
    d = root / name
    d.mkdir(parents=True)
    toks = (lo + (np.arange(50_000) * 7) % 97).astype("<u2")
    toks[::200] = 0
    toks.tofile(d / "shard-00000.bin")
    write_json(d / "index.json", {"dtype": "<u2", "shards": [{"file": "shard-00000.bin", "tokens": len(toks),
                                                               "docs": 250}],
                                  "tokens": len(toks), "docs": 250, "doc_offsets": [], "eos_id": 0,
                                  "tokenizer_hash": "x"})
    return d


def one_run(root: Path, backends: tuple[str, ...] | None, steps: int, tag: str) -> float:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                              tie_word_embeddings=True, bos_token_id=0, eos_token_id=0))
    model.init_weights(seed=0)
    streams = {n: TokenStream(load_tokens(root / "tokens" / n), CFG.seq_len) for n in ("a", "b")}
    loader = MixtureLoader(streams, domain="a", general="b", batch_size=8, ratio=0.5)
    workdir = root / tag
    tracking = Tracking(backends=backends or (), project="bench", run_name=tag)
    train(model, loader, CFG, workdir, total_steps=steps, log=lambda m: None, tracking=tracking)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_s"] for r in rows[2:])


def send_ms(root: Path, backend: str, calls: int) -> float:
    """Milliseconds per ``log_step`` of one metrics.jsonl line (rank 0's whole per-step cost)."""
    trackers = open_tracking(Tracking(backends=(backend,), project="bench", run_name="send"), root / f"send-{backend}",
                             lambda m: None)
    row = {"step": 0, "loss": 5.0, "loss_by_domain": {"a": 5.1, "b": 4.9}, "lr": 1e-3, "grad_norm": 0.5,
           "tokens": 0, "tokens_per_s": 1e4, "step_s": 0.1, "mfu": None, "mem_gib": 0.6, "elapsed_s": 1.0,
           "batch": "abc", "world": 1}
    t0 = time.perf_counter()
    for step in range(1, calls + 1):
        trackers.log_step({**row, "step": step, "tokens": step * 512})
    ms = (time.perf_counter() - t0) / calls * 1e3
    trackers.close()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(1)
    kinds = {"none": None, "wandb": ("wandb",), "mlflow": ("mlflow",)}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        token_dir(root / "tokens", "a", 1)
        token_dir(root / "tokens", "b", 200)
        order = list(kinds)
        for r in range(args.repeats):
            for kind in order[r % len(order):] + order[:r % len(order)]:
                times[kind].append(one_run(root, kinds[kind], args.steps, f"{kind}-{r}"))
        sends = {k: round(send_ms(root, k, 200), 3) for k in ("wandb", "mlflow")}
    base = statistics.median(times["none"])
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "steps": args.steps, "repeats": args.repeats,
                      "median_step_s": {k: statistics.median(v) for k, v in times.items()},
                      "ratio_vs_none": {k: round(statistics.median(v) / base, 3) for k, v in times.items()},
                      "log_step_ms": sends,
                      "runs_step_s": times}, indent=2))


if __name__ == "__main__":
    main()
