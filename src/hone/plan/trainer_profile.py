"""How Hone's own trainer runs one model shape on a device: the table `hone plan calibrate`
measures (:func:`hone.train.calibrate.measure`) and the planner reads, so that its step time
and memory are those of `hone train`. Pure functions of the table: no torch here.

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
