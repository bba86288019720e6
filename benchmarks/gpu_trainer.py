"""Issue 17 on one GPU, in one process: Hone's trainer against a compiled HF LlamaForCausalLM loop.

Rows (each with its peak memory):

* ``hf_compiled``: ``torch.compile(LlamaForCausalLM)`` (SDPA), labels loss, fused AdamW, bf16 autocast;
* ``hone_bare``: Hone's Llama as the trainer builds it on CUDA (fused q/k/v and gate/up, per-layer
  compile, compiled chunked loss, SDPA order pinned), same optimizer and precision, a bare step loop;
* ``hone_loop``: ``hone.train.loop.train`` itself (metrics.jsonl and progress line every step,
  TensorBoard when installed, no periodic checkpoints), its median ``step_s`` after warm-up;
* ``hone_float8`` (1B only): ``hone_bare`` with ``train.float8`` (torchao, decoder layers).

Shapes: 125M (hidden 768, 12 layers, 12 heads, FFN 2048, vocab 32000): the tokens/s ratio
against HF; 1B (hidden 2048, 16 layers, 32 heads / 8 KV, FFN 8192, vocab 128256): MFU against
989 TFLOP/s with attention counted in full (6 N + 12 L h s FLOPs per token, N the non-embedding
parameters with the head) and, beside it, causal-halved (6 N + 6 L h s). Sequence 2048.
Budget: under 8 minutes on an H200 (rows past ``--budget-s`` are reported as skipped).

    python benchmarks/gpu_trainer.py              # on a GPU; prints one JSON object
    python benchmarks/gpu_trainer.py --smoke      # tiny shapes on the CPU in seconds (tests run this)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hone.errors import HoneError  # noqa: E402
from hone.model.llama import Llama, LlamaConfig  # noqa: E402
from hone.model.sdpa import pin_sdpa_backend  # noqa: E402

PEAK = 989e12  # H100 / H200 SXM dense bf16, the reference
SHAPES = {
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 intermediate_size=2048, vocab_size=32000),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512),
}
MICRO = {"125m": 16, "1b": 8, "tiny": 2}  # sequences per step, the same for every row of a shape


def flops(c: dict, seq: int) -> dict:
    """FLOPs per token: attention in full (12 L h s) and causal-halved (6 L h s)."""
    cfg = LlamaConfig(**c)
    n = cfg.num_parameters() - c["vocab_size"] * c["hidden_size"]  # without the embedding, with the head
    attn = c["num_hidden_layers"] * c["hidden_size"] * seq
    return {"full": 6 * n + 12 * attn, "causal": 6 * n + 6 * attn}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def _reset(device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def hf_step(c: dict, seq: int, device, compile_: bool):
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    cfg = HFConfig(**c, max_position_embeddings=seq, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device)
    fwd = torch.compile(model) if compile_ else model
    return model, lambda x, y: fwd(input_ids=x, labels=y).loss


def hone_step(c: dict, seq: int, device, compile_: bool, float8: bool = False):
    cfg = LlamaConfig(**c, max_position_embeddings=seq, tie_word_embeddings=False)
    model = Llama(cfg, fused_projections=device.type == "cuda").init_weights(seed=0).to(device)
    if float8:
        from hone.recipe import TrainConfig
        from hone.train.speed import apply_float8

        apply_float8(model, TrainConfig(float8=True), device)
    if compile_:
        for layer in model.model.layers:
            layer.compile()
    return model, lambda x, y: model(x, y)[0]


def bare(build, c: dict, seq: int, mb: int, steps: int, warmup: int, device, **kw) -> dict:
    """Median-free steady state: ``steps`` steps between two syncs, after ``warmup`` (compiles)."""
    _reset(device)
    model = opt = None
    try:
        model, step = build(c, seq, device, device.type == "cuda", **kw)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        x = torch.randint(0, c["vocab_size"], (mb, seq), device=device)

        def one():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = step(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        for _ in range(warmup):
            one()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = one()
        _sync(device)
        step_s = (time.perf_counter() - t0) / steps
        return {"step_s": step_s, "tokens_per_s": mb * seq / step_s, "loss": float(loss), "peak_gib": _peak_gib(device),
                "compiled": device.type == "cuda"}
    except torch.OutOfMemoryError:
        return {"oom": True}
    except HoneError as e:
        return {"skipped": str(e)}
    finally:
        model = opt = step = None  # free the memory before the next row
        _reset(device)


def real_loop(c: dict, seq: int, mb: int, steps: int, warmup: int, device) -> dict:
    """``hone.train.loop.train`` on random tokens: logging every step, checkpoints only at the end
    (outside the timed steps); tokens/s from the median ``step_s`` of metrics.jsonl after warm-up."""
    from hone.recipe import TrainConfig
    from hone.train.data import MixtureLoader, TokenStream
    from hone.train.loop import train

    _reset(device)
    model = None
    try:
        cuda = device.type == "cuda"
        cfg = TrainConfig(seq_len=seq, batch_size=mb, micro_batch=mb, lr=1e-4, warmup_steps=1, checkpoint_every=0,
                          log_every=1, doc_mask=False, compile=cuda, mixed_precision="bf16", device=device.type)
        rng = np.random.default_rng(0)
        n = (steps + warmup + 1) * mb * seq + seq + 1
        streams = {k: TokenStream(rng.integers(0, c["vocab_size"], n, dtype=np.int64), seq) for k in ("d", "g")}
        loader = MixtureLoader(streams, domain="d", general="g", batch_size=mb, ratio=0.5)
        cfg_m = LlamaConfig(**c, max_position_embeddings=seq, tie_word_embeddings=False)
        model = Llama(cfg_m).init_weights(seed=0).to(device)
        if cuda:  # as hone.train.parallelize does with train.compile
            for layer in model.model.layers:
                layer.compile()
        with tempfile.TemporaryDirectory() as tmp:
            lines = []
            train(model, loader, cfg, Path(tmp), total_steps=steps + warmup, log=lines.append)
            metrics = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        step_s = statistics.median(m["step_s"] for m in metrics[warmup:])
        return {"step_s": step_s, "tokens_per_s": mb * seq / step_s, "loss": metrics[-1]["loss"],
                "peak_gib": _peak_gib(device), "start_line": next((x for x in lines if "fused projections" in x), None)}
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        model = None
        _reset(device)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, a few steps (seconds)")
    p.add_argument("--shapes", default="125m,1b")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=420.0, help="rows starting later are skipped")
    p.add_argument("--only", help="comma-separated row names to run (hf_compiled, hone_bare, hone_loop, hone_float8)")
    args = p.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_trainer: no CUDA GPU here; nothing measured (run it on a GPU, or --smoke for the CPU check)",
              file=sys.stderr)
        print(json.dumps({"skipped": "no CUDA GPU"}))
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    sdpa = pin_sdpa_backend(device)
    seq = 64 if args.smoke else 2048
    shapes = ["tiny"] if args.smoke else args.shapes.split(",")
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    have_hf = importlib.util.find_spec("transformers") is not None
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "seq": seq, "sdpa": sdpa, "peak_tflops": PEAK / 1e12, "shapes": {}}
    t_start = time.perf_counter()
    for shape in shapes:
        c, mb = SHAPES[shape], MICRO[shape]
        f = flops(c, seq)
        rows = {"hf_compiled": lambda: bare(hf_step, c, seq, mb, steps, warmup, device) if have_hf
                else {"skipped": "transformers not installed"},
                "hone_bare": lambda: bare(hone_step, c, seq, mb, steps, warmup, device),
                "hone_loop": lambda: real_loop(c, seq, mb, steps, warmup, device)}
        if shape in ("1b", "tiny"):
            rows["hone_float8"] = lambda: bare(hone_step, c, seq, mb, steps, warmup, device, float8=True)
        res = {}
        for name, run in rows.items():
            if args.only and name not in args.only.split(","):
                continue
            if time.perf_counter() - t_start > args.budget_s:
                res[name] = {"skipped": f"past the {args.budget_s:.0f} s budget"}
                continue
            res[name] = run()
            if "tokens_per_s" in res[name]:
                res[name]["mfu_full"] = res[name]["tokens_per_s"] * f["full"] / PEAK
                res[name]["mfu_causal"] = res[name]["tokens_per_s"] * f["causal"] / PEAK
            print(json.dumps({shape: {name: res[name]}}), file=sys.stderr, flush=True)
        tps = {k: r["tokens_per_s"] for k, r in res.items() if "tokens_per_s" in r}
        summary = {}
        if "hf_compiled" in tps:
            summary.update({f"{k}_vs_hf_compiled": v / tps["hf_compiled"] for k, v in tps.items()
                            if k != "hf_compiled"})
        if "hone_bare" in tps and "hone_loop" in tps:
            summary["loop_vs_bare"] = tps["hone_loop"] / tps["hone_bare"]
        out["shapes"][shape] = {"micro_batch": mb, "flops_per_token": f, "rows": res, "summary": summary}
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
