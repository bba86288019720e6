"""Issue 17's CPU-side ratios, side by side in one process (CPU only; the GPU figures come from
benchmarks/gpu_trainer.py):

* the chunked linear + cross-entropy, compiled (Inductor) vs eager: forward + backward time;
* the training loop, overlapped (``train.overlap_steps``, no host sync per step) vs one step at
  a time: median ``step_s`` of metrics.jsonl (on a CPU there is no sync to save: ~1.0 expected).

    PYTHONPATH=src python benchmarks/trainer_cpu_ratios.py   # prints JSON
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hone.model.llama import Llama, LlamaConfig  # noqa: E402
from hone.model.loss import fused_linear_cross_entropy  # noqa: E402
from hone.recipe import TrainConfig  # noqa: E402
from hone.train.data import MixtureLoader, TokenStream  # noqa: E402
from hone.train.loop import train  # noqa: E402


def loss_ratio(n=4096, hidden=256, vocab=16384, chunk=1024, reps=7) -> dict:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=g)

    def once(compile_):
        t0 = time.perf_counter()
        loss, _ = fused_linear_cross_entropy(h, w, y, token_weight=1 / n, chunk=chunk, compile=compile_)
        loss.backward()
        h.grad = w.grad = None
        return time.perf_counter() - t0
    once(True), once(False)  # compile and warm up
    times = {True: [], False: []}
    for _ in range(reps):  # alternate, so drifts in machine load hit both alike
        for c in (True, False):
            times[c].append(once(c))
    eager, compiled = statistics.median(times[False]), statistics.median(times[True])
    return {"tokens": n, "hidden": hidden, "vocab": vocab, "chunk": chunk, "eager_s": eager, "compiled_s": compiled,
            "eager_over_compiled": eager / compiled}


def loop_ratio(steps=12, reps=2) -> dict:
    c = dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4)
    seq, mb = 128, 4

    def run(overlap):
        rng = np.random.default_rng(0)
        streams = {k: TokenStream(rng.integers(0, 2048, steps * mb * seq * 2, dtype=np.int64), seq) for k in "dg"}
        loader = MixtureLoader(streams, domain="d", general="g", batch_size=mb, ratio=0.5)
        cfg = TrainConfig(seq_len=seq, batch_size=mb, lr=1e-3, warmup_steps=1, log_every=1, doc_mask=False,
                          overlap_steps=overlap)
        model = Llama(LlamaConfig(**c, max_position_embeddings=seq)).init_weights(seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            train(model, loader, cfg, Path(tmp), total_steps=steps, log=lambda m: None)
            lines = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        return statistics.median(m["step_s"] for m in lines[2:]), lines[-1]["loss"]
    times, losses = {True: [], False: []}, {}
    for _ in range(reps):
        for overlap in (True, False):
            t, losses[overlap] = run(overlap)
            times[overlap].append(t)
    old, new = statistics.median(times[False]), statistics.median(times[True])
    return {"steps": steps, "stepwise_step_s": old, "overlapped_step_s": new, "stepwise_over_overlapped": old / new,
            "same_final_loss": losses[True] == losses[False]}


if __name__ == "__main__":
    print(json.dumps({"machine": f"cpu, {torch.get_num_threads()} threads", "torch": torch.__version__,
                      "loss": loss_ratio(), "loop": loop_ratio()}, indent=1))
