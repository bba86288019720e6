"""How Hone's own trainer runs one model shape on this device: the part of `hone plan
calibrate` that makes the planner's step time and memory those of `hone train`.

GEMM FLOP/s alone predict a Megatron-style step with fused kernels. Hone's eager Llama also
spends time in element-wise kernels (RMSNorm in fp32, RoPE, SiLU, casts), in kernel launches
and in the chunked loss, and keeps more activations (fp32 norm inputs): on an H200 the
GEMM-only model was 62-81% too fast and 22-31% short on memory (BENCHMARKS.md). So this
measures, at the model's shapes, what the planner otherwise derives from FLOPs:

* one decoder layer, forward + backward and forward only, run ``STACK`` times back to back
  (so launch overhead overlaps with GPU work as it does in a real step), at several
  (micro-batch, sequence) points; fitted as ``max(a, b * tokens + c * tokens * seq)`` per
  layer: the host's launch floor, or the device's work (the last term is attention);
* the bytes a layer keeps for its backward per token, with and without whole-layer
  activation checkpointing, and the extra bytes at the peak of its backward (on CUDA);
* the LM head with the chunked cross-entropy, forward + backward, as ``max(a, b * tokens)``;
* one fused AdamW step with gradient clipping, per parameter.

The result goes into the profile's ``cluster.trainer`` table, keyed by the shape it was
measured at; the planner uses it for plans with tp = 1 of a model with that shape
(:func:`applies`) and falls back to the FLOP model otherwise.
"""

from __future__ import annotations

import contextlib

import numpy as np

from hone.plan.shapes import ModelShape

STACK = 3          # layers run back to back per measurement
GPU_BOUND = 1.3    # a point this many times above the fastest one is device-bound
SHAPE_KEYS = ("hidden", "ffn", "heads", "kv_heads", "vocab")


def shape_key(m: ModelShape) -> dict:
    return {k: getattr(m, k) for k in SHAPE_KEYS}


def applies(trainer: dict | None, m: ModelShape, tp: int) -> bool:
    """The measured table describes this model's layers on one device (no tensor parallelism)."""
    return bool(trainer) and tp == 1 and trainer.get("shape") == shape_key(m)


def with_trainer(k, cluster, m: ModelShape):
    """The planner constants with this cluster's measured activation bytes, when its trainer
    table was measured at this model's shape (memory applies them to tp = 1 plans only)."""
    t = getattr(cluster, "trainer", None)
    if not t or t.get("shape") != shape_key(m):
        return k
    return k.with_(act_bytes_per_token=float(t["act_bytes_per_token"]),
                   ckpt_bytes_per_token=float(t["ckpt_bytes_per_token"]),
                   backward_bytes_per_token=float(t.get("backward_bytes_per_token", 0.0)),
                   recompute_backward_bytes_per_token=float(t.get("recompute_backward_bytes_per_token", 0.0)))


def layer_time(trainer: dict, tokens: float, seq: int, recompute: str) -> float:
    """Seconds for one layer's forward + backward on ``tokens`` tokens of sequence ``seq``;
    whole-layer recompute runs the forward again; selective recompute its attention part."""
    fb, fwd = trainer["layer_fwd_bwd"], trainer["layer_fwd"]
    if recompute == "full":
        # The device runs the forward twice; the host's floor is the checkpointed layer's (its
        # own device-time fit came out 32-36% short on an H200: it never left the floor).
        device = (fb["b"] + fwd["b"]) * tokens + (fb["c"] + fwd["c"]) * tokens * seq
        return max(trainer.get("recompute_floor_s", fb["a"] + fwd["a"]), device)
    t = _eval(fb, tokens, seq)
    if recompute == "selective":
        t += fwd["c"] * tokens * seq
    elif recompute == "op":  # half the matmuls and the element-wise work again: half a forward
        t += 0.5 * _eval(fwd, tokens, seq)
    return t


def head_time(trainer: dict, tokens: float) -> float:
    return _eval(trainer["head_fwd_bwd"], tokens, 0)


def _fit(points: list[tuple[float, float, float]], with_seq: bool) -> dict:
    """time = max(a, b * tokens (+ c * tokens * seq)): ``a`` is the host's floor (Python and
    kernel launches: an eager layer cannot go faster however few its tokens), the rest the
    device's work, fitted (non-negative, through the origin) on the points clearly above the
    floor, or on the slowest point when none is."""
    from scipy.optimize import nnls

    fastest = min(v for _, _, v in points)
    floor = float(np.median([v for _, _, v in points if v < GPU_BOUND * fastest]))
    busy = [p for p in points if p[2] >= GPU_BOUND * fastest] or [max(points, key=lambda p: p[2])]
    rows = np.array([[t, t * s] if with_seq else [t] for t, s, _ in busy])
    y = np.array([v for _, _, v in busy])
    scale = rows.max(axis=0)
    coef, _ = nnls(rows / scale, y)
    coef = coef / scale
    fit = {"a": float(floor), "b": float(coef[0]), "c": float(coef[1]) if with_seq else 0.0}
    pred = np.array([_eval(fit, t, s) for t, s, _ in points])
    actual = np.array([v for _, _, v in points])
    fit["max_rel_residual"] = float(np.max(np.abs(pred - actual) / actual))
    return fit


def _eval(fit: dict, tokens: float, seq: float) -> float:
    return max(fit["a"], fit["b"] * tokens + fit["c"] * tokens * seq)


def refit(trainer: dict) -> dict:
    """The table's fits from its raw measured points (``measure`` ends here; an older table
    is refitted with this module's model)."""
    pts = [tuple(p) for p in trainer["points"]]
    meas = trainer["measured"]
    out = dict(trainer)
    out["layer_fwd_bwd"] = _fit([(b * s, s, v) for (b, s), v in zip(pts, meas["layer_fwd_bwd_s"])], True)
    out["layer_fwd"] = _fit([(b * s, s, v) for (b, s), v in zip(pts, meas["layer_fwd_s"])], True)
    heads = trainer.get("head_tokens") or [2048, 8192, 16384]  # tables written before head_tokens was kept
    out["head_fwd_bwd"] = _fit([(t, 0, v) for t, v in zip(heads, meas["head_fwd_bwd_s"])], False)
    if "layer_fwd_bwd_recompute_s" in meas:
        out["recompute_floor_s"] = _fit([(b * s, s, v) for (b, s), v in zip(pts, meas["layer_fwd_bwd_recompute_s"])],
                                        True)["a"]
    return out


def measure(m: ModelShape, device, quick: bool = False) -> dict:
    """Measure the table on ``device`` (seconds on a GPU; ``quick`` keeps a CPU run short)."""
    import torch

    from hone.plan.calibrate import time_call
    from hone.model.loss import fused_linear_cross_entropy
    from hone.model.llama import DecoderLayer, LlamaConfig, _rope_tables, rope_inv_freq

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    repeats = 1 if quick else 2 if not cuda else 5
    seqs = (32, 64) if quick else (512, 2048)
    points = [(1, seqs[1]), (4, seqs[1]), (4, seqs[0])] + ([] if quick else [(1, seqs[0]), (8, seqs[1]), (16, seqs[1])])
    cfg = LlamaConfig(vocab_size=m.vocab, hidden_size=m.hidden, intermediate_size=m.ffn, num_hidden_layers=STACK,
                      num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
                      max_position_embeddings=max(seqs))
    with torch.device(device):
        layer = DecoderLayer(cfg)
        head = torch.nn.Linear(m.hidden, m.vocab, bias=False)
    cos_all, sin_all = (t.to(device) for t in _rope_tables(rope_inv_freq(cfg).to(device), max(seqs)))
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
    table = {"shape": shape_key(m), "device": str(device), "stack": STACK, "points": [list(p) for p in points],
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
    import torch

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
