"""Training throughput: Hone's Llama vs transformers' LlamaForCausalLM with a plain loop.

Same shapes, same tokens per step, bf16 autocast over fp32 master weights, fused AdamW,
SDPA attention, in one process, eager and torch.compile'd. Prints one JSON object:
tokens/s, MFU against the device's dense bf16 peak (the planner's GPU table, as the trainer's
MFU) with Hone's FLOPs count (``hone.plan.shapes.flops_per_token``, causal attention in full),
peak memory per variant, and the ratios the training issue asks for.

    python benchmarks/train_throughput.py                 # on a GPU: 125M and 1B shapes
    python benchmarks/train_throughput.py --dry-run       # tiny shape on the CPU (a smoke test)

Only ``hone.model`` and the pure ``hone.plan`` modules are imported, so ``PYTHONPATH=src``
without installing Hone's other dependencies is enough.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hone.model.llama import Llama, LlamaConfig  # noqa: E402
from hone.model.shape import shape_of  # noqa: E402
from hone.plan.hardware import gpu_for_device_name  # noqa: E402
from hone.plan.shapes import flops_per_token as shape_flops  # noqa: E402

SHAPES = {
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 intermediate_size=2048, vocab_size=32000),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=688, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=172, vocab_size=1000),
}
def flops_per_token(c: dict, seq: int) -> float:
    """Model FLOPs per token, Hone's one convention (causal attention counted in full)."""
    return shape_flops(shape_of(LlamaConfig(**c)), seq)


def peak_flops(device) -> float | None:
    """The device's dense bf16 peak from the planner's GPU table (what the trainer's MFU uses)."""
    gpu = gpu_for_device_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return gpu.peak_tflops * 1e12 if gpu else None


def hone_model(c: dict, seq: int, compile_mode: str | None, device):
    cfg = LlamaConfig(**c, max_position_embeddings=seq, tie_word_embeddings=False)
    model = Llama(cfg).init_weights(seed=0).to(device)
    if compile_mode == "layers":
        for layer in model.model.layers:
            layer.compile()
    elif compile_mode == "model":
        model.model.compile()

    def step(x, y):
        loss, _ = model(x, y)
        return loss
    return model, step


def hf_model(c: dict, seq: int, compile_mode: str | None, device):
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    cfg = HFConfig(**c, max_position_embeddings=seq, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device)
    fwd = torch.compile(model) if compile_mode else model

    def step(x, y):
        return fwd(input_ids=x, labels=y).loss
    return model, step


def measure(build, c, seq, mb, compile_mode, steps, warmup, device) -> dict:
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = step = opt = None
    try:
        model, step = build(c, seq, compile_mode, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        x = torch.randint(0, c["vocab_size"], (mb, seq), device=device)
        times = []
        for i in range(warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = step(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        times.sort()
        t = times[len(times) // 2]
        tps = mb * seq / t
        out = {"step_s": t, "tokens_per_s": tps, "loss": float(loss),
               "mfu": tps * flops_per_token(c, seq) / peak if (peak := peak_flops(device)) else None,
               "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    except torch.OutOfMemoryError:
        out = {"oom": True}
    finally:
        del model, step, opt
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU, 2 steps")
    p.add_argument("--shapes", default="125m,1b")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--cpu", action="store_true", help="eager only, on the CPU, sequence 512 (ratios only)")
    p.add_argument("--hone-mbs", help="comma-separated micro-batches for Hone (default per shape: 125m 8,16; 1b 4,8)")
    p.add_argument("--only", help="comma-separated run tags to measure, e.g. hone_compiled-layers (prefix match)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not (args.dry_run or args.cpu) else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    seq = 128 if args.dry_run else 512 if args.cpu else 2048
    plan = {  # shape -> (micro-batches to try for the baseline, and for Hone)
        "125m": ([8], [8, 16]),
        "1b": ([4], [4, 8]),
        "small": ([4], [4]),
        "tiny": ([2], [2, 4]),
    }
    shapes = ["tiny"] if args.dry_run else args.shapes.split(",")
    steps, warmup = (2, 1) if args.dry_run else (args.steps, args.warmup)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "seq": seq, "shapes": {}}
    for shape in shapes:
        c = SHAPES[shape]
        hf_mbs, hone_mbs = plan[shape]
        if args.hone_mbs:
            hone_mbs = [int(x) for x in args.hone_mbs.split(",")]
        rows = {}
        hf_modes, hone_modes = ([None], [None]) if args.cpu else ([None, "full"], [None, "layers", "model"])
        runs = [("hf", hf_model, mode, mb) for mode in hf_modes for mb in hf_mbs]
        runs += [("hone", hone_model, mode, mb) for mode in hone_modes for mb in hone_mbs]
        for who, build, mode, mb in runs:
            tag = f"{who}_{'compiled-' + mode if mode else 'eager'}_mb{mb}"
            if args.only and not any(tag.startswith(x) for x in args.only.split(",")):
                continue
            rows[tag] = measure(build, c, seq, mb, mode, steps, warmup, device)
            print(json.dumps({shape: {tag: rows[tag]}}), file=sys.stderr, flush=True)
        best = lambda prefix: max((r["tokens_per_s"], k) for k, r in rows.items()  # noqa: E731
                                  if k.startswith(prefix) and "tokens_per_s" in r)
        summary = {}
        try:
            hf_c, hone_best = best("hf_eager" if args.cpu else "hf_compiled"), best("hone_")
            summary = {"hone_best": hone_best[1], "hf_compiled_best": hf_c[1],
                       "speedup_vs_hf_compiled": hone_best[0] / hf_c[0],
                       "hone_best_mfu": rows[hone_best[1]]["mfu"]}
        except ValueError:
            pass
        results["shapes"][shape] = {"flops_per_token": flops_per_token(c, seq), "runs": rows, "summary": summary}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
