"""`hone plan calibrate`: measure this machine into a hardware profile the planner reads.

GEMM FLOP/s at the model's shapes (QKV, MLP up, MLP down for b*s tokens), memory bandwidth
(a large copy), device-to-device copy bandwidth between every pair of visible GPUs (the
link matrix), and Hone's own training layer, loss and optimizer at the model's shape
(:func:`measure`, the table :mod:`hone.plan.trainer_profile` reads: what makes the planner's step time and
memory those of
`hone train`). Without a GPU it measures the CPU, so the command never needs one.
"""

from __future__ import annotations

import contextlib
import platform
import time

import torch

from hone.model.llama import DecoderLayer, rope_inv_freq, rope_tables
from hone.model.loss import fused_linear_cross_entropy
from hone.model.shape import config_of
from hone.plan.hardware import GPUS, gpu_for_device_name
from hone.plan.shapes import ModelShape, load_shape
from hone.plan.trainer_profile import STACK, refit, shape_key


def time_call(fn, sync, repeats: int) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def run_calibration(model: str, seq: int = 2048, device: str = "auto", quick: bool = False,
                    compile: bool | None = None) -> dict:
    """``compile``: time the layer torch.compile'd, as ``train.compile`` runs it (None: on with CUDA,
    the trainer's default)."""
    m = load_shape(model)
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
                matrix[i][j] = nbytes / time_call(lambda: src.to(f"cuda:{j}"),
                                                  lambda: [torch.cuda.synchronize(d) for d in (i, j)], 3) / 1e9
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

    # Hone's own layer, loss and optimizer at this shape
    cluster["trainer"] = measure(m, dev, quick=quick, compile=cuda if compile is None else compile)
    return {"cluster": cluster, "measured": {"device": str(dev), "dtype": str(dtype), "model": m.name,
                                             "gemm_tflops": gemm_tflops, "gemms": gemms, "memory_gbps": mem_gbps,
                                             "link_matrix_gbps": matrix}}


def measure(m: ModelShape, device, quick: bool = False, compile: bool = False) -> dict:
    """Measure the table on ``device`` (seconds on a GPU; ``quick`` keeps a CPU run short). ``compile``:
    the layer as the trainer runs it on CUDA, torch.compile'd with fused projections (a warm-up call
    per point compiles before the timing)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    repeats = 1 if quick else 2 if not cuda else 5
    seqs = (32, 64) if quick else (512, 2048)
    points = [(1, seqs[1]), (4, seqs[1]), (4, seqs[0])] + ([] if quick else [(1, seqs[0]), (8, seqs[1]), (16, seqs[1])])
    cfg = config_of(m, num_hidden_layers=STACK, max_position_embeddings=max(seqs))
    with torch.device(device):
        layer = DecoderLayer(cfg)
        head = torch.nn.Linear(m.hidden, m.vocab, bias=False)
    if compile:
        layer.self_attn.fused = layer.mlp.fused = cuda  # the trainer's default (hone.train.speed)
        layer.compile()
    cos_all, sin_all = (t.to(device) for t in rope_tables(rope_inv_freq(cfg).to(device), max(seqs)))
    # As `hone train` runs: bf16 autocast on a GPU; fp32 on a CPU (bf16 matmuls are slow there).
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def run_layers(x, cos, sin, checkpoint: bool):
        for _ in range(STACK):
            if checkpoint:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return x

    def timed(fn) -> float:
        return time_call(fn, sync, repeats)

    fb_pts, fwd_pts, ckpt_pts = [], [], []
    for b, s in points:
        x = torch.randn(b, s, m.hidden, device=device, requires_grad=True)
        cos, sin = cos_all[:s], sin_all[:s]

        def fwd_bwd(checkpoint: bool = False):
            with autocast:
                y = run_layers(x, cos, sin, checkpoint)
            y.float().sum().backward()
            layer.zero_grad(set_to_none=True)
            x.grad = None

        def fwd_only():
            with torch.no_grad(), autocast:
                run_layers(x, cos, sin, False)

        fb_pts.append((b * s, s, timed(fwd_bwd) / STACK))
        fwd_pts.append((b * s, s, timed(fwd_only) / STACK))
        ckpt_pts.append((b * s, s, timed(lambda: fwd_bwd(True)) / STACK))

    # Kept bytes per token: the slope between two token counts of what the layers save for
    # their backward (the constant part, e.g. autocast's bf16 weight copies, is counted with
    # the weights by the planner).
    s, batches = seqs[1], (1, 4)
    tokens_apart = (batches[1] - batches[0]) * s
    kept, transient = {}, {}
    for ckpt in (False, True):
        sizes, peaks = [], []
        for b in batches:
            x = torch.randn(b, s, m.hidden, device=device, requires_grad=True)
            saved, peak = _saved_and_backward_bytes(lambda: run_layers(x, cos_all[:s], sin_all[:s], ckpt), autocast,
                                                    device)
            sizes.append(saved)
            peaks.append(peak)
            layer.zero_grad(set_to_none=True)
        kept[ckpt] = (sizes[1] - sizes[0]) / (tokens_apart * STACK)
        transient[ckpt] = max(0.0, (peaks[1] - peaks[0]) / tokens_apart)  # one layer's backward at a time
    head_pts = []
    head_tokens = (64, 128) if quick else (2048, 8192, 16384, 32768)
    for tokens in head_tokens:
        h = torch.randn(tokens, m.hidden, device=device, requires_grad=True)
        tgt = torch.randint(0, m.vocab, (tokens,), device=device)

        def head_step():
            with autocast:
                loss, _ = fused_linear_cross_entropy(h, head.weight, tgt, token_weight=1.0 / tokens)
            loss.backward()
            head.zero_grad(set_to_none=True)
            h.grad = None

        head_pts.append((tokens, 0, timed(head_step)))
    params = [p for p in layer.parameters()] + [head.weight]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True if cuda else None)

    def opt_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    n = sum(p.numel() for p in params)
    per_param = timed(opt_step) / n
    table = {"shape": shape_key(m), "device": str(device), "stack": STACK, "compiled": compile,
             "points": [list(p) for p in points],
             "head_tokens": list(head_tokens),
             "act_bytes_per_token": kept[False], "ckpt_bytes_per_token": kept[True],
             # Extra bytes at the peak of the backward (gradients of activations, a recomputed
             # layer's activations), per token; CUDA's peak counter only (0 on a CPU).
             "backward_bytes_per_token": transient[False], "recompute_backward_bytes_per_token": transient[True],
             "optimizer_s_per_param": per_param,
             "measured": {"layer_fwd_bwd_s": [v for _, _, v in fb_pts], "layer_fwd_s": [v for _, _, v in fwd_pts],
                          "layer_fwd_bwd_recompute_s": [v for _, _, v in ckpt_pts],
                          "head_fwd_bwd_s": [v for _, _, v in head_pts]}}
    return refit(table)  # the fits, from the raw points


def _saved_and_backward_bytes(forward, autocast, device) -> tuple[float, float]:
    """(bytes of the distinct storages the autograd graph saves during ``forward()``, the peak
    extra bytes allocated during its backward; 0 where the device has no peak counter)."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        y = forward()
    peak = 0.0
    loss = y.float().sum()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        loss.backward()
        torch.cuda.synchronize(device)
        peak = float(torch.cuda.max_memory_allocated(device) - before)
    else:
        loss.backward()
    del y, loss
    return float(sum(seen.values())), peak
