"""`hone plan calibrate`: measure this machine into a hardware profile the planner reads.

GEMM FLOP/s at the model's shapes (QKV, MLP up, MLP down for b*s tokens), memory bandwidth
(a large copy), device-to-device copy bandwidth between every pair of visible GPUs (the
link matrix), and Hone's own training layer, loss and optimizer at the model's shape
(:mod:`hone.plan.trainer_profile`: what makes the planner's step time and memory those of
`hone train`). Without a GPU it measures the CPU, so the command never needs one.
"""

from __future__ import annotations

import platform
import time

from hone.plan.hardware import GPUS, gpu_for_device_name
from hone.plan.shapes import load_model


def time_call(fn, sync, repeats: int) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def run_calibration(model: str, seq: int = 2048, device: str = "auto", quick: bool = False) -> dict:
    import torch

    m = load_model(model)
    cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = min(seq, 256) if quick or not cuda else seq
    h = min(m.hidden, 512) if quick or not cuda else m.hidden
    f = min(m.ffn, 1024) if quick or not cuda else m.ffn
    repeats = 3 if quick or not cuda else 20
    gemms = {}
    flops = secs = 0.0
    for name, (k_, n_) in {"qkv": (h, h + 2 * m.kv_dim * h // m.hidden), "mlp_up": (h, f), "mlp_down": (f, h)}.items():
        a = torch.randn(rows, k_, device=dev, dtype=dtype)
        b = torch.randn(k_, n_, device=dev, dtype=dtype)
        t = time_call(lambda: a @ b, sync, repeats)
        gemms[name] = {"shape": [rows, k_, n_], "tflops": 2 * rows * k_ * n_ / t / 1e12}
        flops += 2 * rows * k_ * n_
        secs += t
    gemm_tflops = flops / secs / 1e12
    nbytes = (1 << 28) if cuda and not quick else (1 << 24)
    x = torch.empty(nbytes // 4, device=dev, dtype=torch.float32)
    y = torch.empty_like(x)
    mem_gbps = 2 * nbytes / time_call(lambda: y.copy_(x), sync, repeats) / 1e9
    n = torch.cuda.device_count() if cuda else 1
    matrix = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                src = torch.empty(nbytes // 4, device=f"cuda:{i}")
                matrix[i][j] = nbytes / time_call(lambda: src.to(f"cuda:{j}"), lambda: [torch.cuda.synchronize(d) for d in (i, j)], 3) / 1e9
    if cuda:
        name = torch.cuda.get_device_name(0)
        known = gpu_for_device_name(name)
        peak = known.peak_tflops if known else gemm_tflops
        mem_gib = torch.cuda.get_device_properties(0).total_memory / (1 << 30)
    else:
        name, peak, mem_gib = f"cpu ({platform.processor() or platform.machine()})", gemm_tflops, GPUS["cpu"].memory_gib
    intra = min((matrix[i][j] for i in range(n) for j in range(n) if i != j), default=mem_gbps / 2)
    cluster = {"name": f"calibrated {name}", "gpu": {"name": name, "peak_tflops": peak, "memory_gib": round(mem_gib, 2),
                                                      "hbm_gbps": mem_gbps},
               "nodes": 1, "gpus_per_node": n, "intra_gbps": intra, "inter_gbps": intra,
               "efficiency": min(1.0, gemm_tflops / peak)}
    if n > 1:
        cluster["matrix"] = [[v if i != j else 0.0 for j, v in enumerate(r)] for i, r in enumerate(matrix)]
    from hone.plan.trainer_profile import measure

    cluster["trainer"] = measure(m, dev, quick=quick)  # Hone's own layer, loss and optimizer at this shape
    return {"cluster": cluster, "measured": {"device": str(dev), "dtype": str(dtype), "model": m.name,
                                             "gemm_tflops": gemm_tflops, "gemms": gemms, "memory_gbps": mem_gbps,
                                             "link_matrix_gbps": matrix}}
