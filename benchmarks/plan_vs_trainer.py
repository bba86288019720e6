"""The planner against our own trainer on one GPU: step time and peak memory, predicted vs measured.

For each configuration of a small grid (125M-class and ~350M Llama shapes, micro-batch 4/8/16,
sequence 1024/2048, recompute none/full) this runs the training step `hone train` runs
(``hone.model.llama.Llama`` with the chunked linear + cross-entropy, bf16 autocast over fp32
weights, fused AdamW from ``hone.train.loop.make_optimizer``, gradient clipping, whole-layer
activation checkpointing as ``hone.train.parallelize`` applies it), times ``--steps`` steps after
``--warmup``, and reads ``torch.cuda.max_memory_allocated``. The planner predicts the same
configuration (tp=pp=dp=1, no accumulation, ZeRO-0) on a hardware profile that
``hone plan calibrate`` measures first at each model's shapes (or ``--profile PATH``), with
Hone's memory accounting (``HONE_SINGLE_GPU`` below). One JSON object on stdout.

    python benchmarks/plan_vs_trainer.py                  # on a GPU: the grid, about a minute on an H100
    python benchmarks/plan_vs_trainer.py --dry-run        # tiny shapes on the CPU (a smoke test, seconds)
    python benchmarks/plan_vs_trainer.py --profile hw-profile.json --out plan_vs_trainer.json

A configuration that runs out of memory is recorded as ``{"oom": true}`` and the grid goes on.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hone.model.llama import Llama  # noqa: E402
from hone.model.shape import config_of  # noqa: E402
from hone.plan.config import Constants  # noqa: E402
from hone.plan.hardware import cluster_from_dict  # noqa: E402
from hone.plan.search import evaluate_fixed  # noqa: E402
from hone.plan.shapes import ModelShape  # noqa: E402
from hone.train.calibrate import run_calibration  # noqa: E402
from hone.train.parallelize import apply_activation_checkpointing  # noqa: E402

SHAPES = {  # (layers, hidden, heads, kv_heads, ffn, vocab)
    "125m": (12, 768, 12, 12, 2048, 32000),      # the training issue's 125M-class benchmark shape
    "350m": (24, 1024, 16, 16, 2816, 32000),     # ~374M parameters
    "tiny": (2, 64, 4, 2, 128, 256),
}
GRID = [  # shape, micro-batch, sequence, recompute
    ("125m", 4, 1024, "none"), ("125m", 8, 2048, "none"), ("125m", 16, 1024, "none"), ("125m", 16, 2048, "full"),
    ("350m", 4, 2048, "none"), ("350m", 8, 1024, "full"), ("350m", 8, 2048, "none"), ("350m", 16, 2048, "full"),
]
DRY_GRID = [("tiny", 2, 64, "none"), ("tiny", 4, 128, "full")]
CE_CHUNK = 4096  # tokens per chunk of hone.model.loss.fused_linear_cross_entropy

# Hone's single-GPU accounting: fp32 weights + their bf16 autocast copies held for the backward (6 B),
# fp32 gradients (4 B), fused AdamW m and v (8 B); max_memory_allocated has no CUDA context and no
# allocator slack, so no overhead or fragmentation.
HONE_SINGLE_GPU = {"weight_bytes": 6.0, "grad_bytes": 4.0, "optim_bytes": 8.0, "overhead_gib": 0.0,
                   "fragmentation": 0.0}


def model_shape(name: str) -> ModelShape:
    layers, h, a, kv, f, v = SHAPES[name]
    return ModelShape(f"hone-{name}", layers, h, a, kv, f, v, "llama", False)


def hone_constants(shape: ModelShape, micro_batch: int, seq: int) -> Constants:
    """Per-configuration: the chunked loss keeps one chunk of fp32 logits + bf16 copies (8 B per
    vocab entry) and the head's fp32 gradient (4 V h) from the forward to the backward; the planner's
    logits term is ``tokens * V * logits_bytes``, so fold both into it."""
    tokens = micro_batch * seq
    per_entry = (8.0 * min(CE_CHUNK, tokens) * shape.vocab + 4.0 * shape.vocab * shape.hidden) / (tokens * shape.vocab)
    return Constants().with_(**HONE_SINGLE_GPU, logits_bytes=per_entry)


def build(shape: ModelShape, seq: int, recompute: str, device: torch.device):
    cfg = config_of(shape, max_position_embeddings=seq)
    with device:
        model = Llama(cfg).init_weights(seed=0)
    if recompute == "full":
        apply_activation_checkpointing(model)
    try:
        from hone.train.loop import clip_grad_norm, make_optimizer

        opt = make_optimizer(model, SimpleNamespace(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1))
    except ImportError:  # the loop's other dependencies missing: the same optimizer by hand
        clip_grad_norm = torch.nn.utils.clip_grad_norm_
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    return model, opt, clip_grad_norm


def measure(shape: ModelShape, mb: int, seq: int, recompute: str, steps: int, warmup: int, device) -> dict:
    cuda = device.type == "cuda"
    model = opt = x = y = None
    base = 0
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # anything still held (calibration): not this step's
    try:
        model, opt, clip = build(shape, seq, recompute, device)
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randint(0, shape.vocab, (mb, seq), generator=gen).to(device)
        y = torch.randint(0, shape.vocab, (mb, seq), generator=gen).to(device)
        model.train()
        times = []
        for i in range(warmup + steps):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss, _ = model(x, y, token_weight=1.0 / (mb * seq))
            loss.backward()
            clip(list(model.parameters()), 1.0)
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        times.sort()
        return {"step_s": times[len(times) // 2], "step_s_min": times[0], "step_s_max": times[-1],
                "peak_mem_gib": (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None,
                "held_before_gib": base / 2**30 if cuda else None, "loss": loss.item()}
    except torch.OutOfMemoryError as e:
        return {"oom": True, "error": str(e).splitlines()[0][:200]}
    except RuntimeError as e:  # some kernels report OOM as a plain RuntimeError
        if "out of memory" not in str(e).lower():
            raise
        return {"oom": True, "error": str(e).splitlines()[0][:200]}
    finally:
        del model, opt, x, y
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def predict(shape: ModelShape, mb: int, seq: int, recompute: str, cluster: dict) -> dict:
    fixed = {"tp": 1, "pp": 1, "dp": 1, "micro_batch": mb, "recompute": recompute, "zero": 0}
    cl = cluster_from_dict(dict(cluster, nodes=1, gpus_per_node=1, matrix=None), "profile")  # one GPU of it
    return evaluate_fixed(shape, cl, seq, mb, fixed, hone_constants(shape, mb, seq))


def profile_for(shape: ModelShape, args, device, cache: dict) -> dict:
    """The calibrated cluster table for this model (measured once per shape), or the --profile file's."""
    if args.profile:
        return json.loads(Path(args.profile).read_text())["cluster"]
    if shape.name not in cache:
        tokens = 256 if args.dry_run else 8192
        cache[shape.name] = run_calibration_for(shape, tokens, device, args.dry_run)
        gc.collect()
    return cache[shape.name]["cluster"]


def run_calibration_for(shape: ModelShape, tokens: int, device, quick: bool) -> dict:
    # run_calibration takes a model spec string; an inline spec carries this shape exactly.
    spec = (f"layers={shape.layers},hidden={shape.hidden},heads={shape.heads},kv_heads={shape.kv_heads},"
            f"ffn={shape.ffn},vocab={shape.vocab},name={shape.name}")
    return run_calibration(spec, seq=tokens, device=device.type, quick=quick)


def compare(meas: dict, pred: dict) -> dict:
    out = {"predicted_step_s": pred.get("step_time_s"), "predicted_mem_gib": pred.get("memory_gib_per_gpu"),
           "predicted_memory_breakdown": pred.get("memory_breakdown"),
           "predicted_time_breakdown": pred.get("time_breakdown")}
    if meas.get("step_s") and pred.get("step_time_s"):
        out["step_error"] = round(pred["step_time_s"] / meas["step_s"] - 1, 4)
        tb = pred["time_breakdown"]
        # The GEMM efficiency that would make the prediction exact (compute scales as 1/efficiency).
        compute_measured = max(1e-9, meas["step_s"] - tb["optimizer_s"])
        out["implied_efficiency"] = round(tb["gemm_efficiency"] * tb["compute_s"] / compute_measured, 4)
    if meas.get("peak_mem_gib") and pred.get("memory_gib_per_gpu"):
        out["mem_error"] = round(pred["memory_gib_per_gpu"] / meas["peak_mem_gib"] - 1, 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, 2 timed steps")
    p.add_argument("--profile", help="hardware profile from `hone plan calibrate` (default: calibrate here, per shape)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", help="comma-separated shape names to run (125m, 350m)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    grid = DRY_GRID if args.dry_run else [g for g in GRID if not args.only or g[0] in args.only.split(",")]
    steps, warmup = (2, 1) if args.dry_run else (args.steps, args.warmup)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "steps": steps, "warmup": warmup, "accounting": HONE_SINGLE_GPU, "profiles": {}, "configs": []}
    cache: dict = {}
    t_start = time.perf_counter()
    for name, mb, seq, rc in grid:
        shape = model_shape(name)
        cluster = profile_for(shape, args, device, cache)
        if shape.name in cache:
            result["profiles"][shape.name] = {"efficiency": cluster["efficiency"],
                                              "peak_tflops": cluster["gpu"]["peak_tflops"],
                                              **{k: cache[shape.name]["measured"][k] for k in ("gemm_tflops",
                                                                                               "memory_gbps")},
                                              "trainer": cluster.get("trainer")}
        meas = measure(shape, mb, seq, rc, steps, warmup, device)
        pred = predict(shape, mb, seq, rc, cluster)
        row = {"model": name, "params": shape.params(), "micro_batch": mb, "seq": seq, "recompute": rc,
               "measured": meas, **compare(meas, pred)}
        result["configs"].append(row)
        print(json.dumps({k: row.get(k) for k in ("model", "micro_batch", "seq", "recompute", "step_error",
                                                  "mem_error")}
                         | {"measured_step_s": meas.get("step_s"), "measured_mem_gib": meas.get("peak_mem_gib"),
                            "oom": meas.get("oom", False)}), file=sys.stderr, flush=True)
    errs = lambda key: [abs(r[key]) for r in result["configs"] if r.get(key) is not None]  # noqa: E731
    result["summary"] = {
        f"{key}_mean_abs": round(sum(errs(key)) / len(errs(key)), 4) if errs(key) else None for key in ("step_error",
                                                                                                        "mem_error")
    } | {f"{key}_max_abs": round(max(errs(key)), 4) if errs(key) else None for key in ("step_error", "mem_error")} \
      | {"within_10pct_step": sum(e <= 0.10 for e in errs("step_error")),
         "within_10pct_mem": sum(e <= 0.10 for e in errs("mem_error")),
         "configs": len(result["configs"]), "oom": sum(bool(r["measured"].get("oom")) for r in result["configs"]),
         "wall_s": round(time.perf_counter() - t_start, 1)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
