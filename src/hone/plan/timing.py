"""Step time: compute at a calibrated efficiency, TP / PP / DP / FSDP communication on the
slowest link of each group, the pipeline bubble and the overlap of the gradient reduce.

    t_mb   = compute + TP collectives + PP sends, per micro-batch on the slowest stage
    step   = (m + (p-1)/v) * t_mb + exposed DP reduce + optimizer update
    MFU    = model FLOPs per step / step / GPUs / dense peak
"""

from __future__ import annotations

from dataclasses import dataclass

from hone.plan import trainer_profile
from hone.plan.config import Config, Constants
from hone.plan.hardware import Cluster
from hone.plan.memory import op_recompute_flops, stage_layout, stage_params
from hone.plan.shapes import ModelShape, flops_per_token


@dataclass
class Timing:
    step_time_s: float
    compute_s: float
    tp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float
    dp_exposed_s: float
    bubble_s: float
    optimizer_s: float
    efficiency: float
    tokens_per_s: float
    tflops_per_gpu: float
    mfu: float

    def breakdown(self) -> dict:
        r = lambda x: round(x, 6)  # noqa: E731
        return {"compute_s": r(self.compute_s), "tp_comm_s": r(self.tp_comm_s), "pp_comm_s": r(self.pp_comm_s),
                "dp_comm_s": r(self.dp_comm_s), "dp_exposed_s": r(self.dp_exposed_s), "bubble_s": r(self.bubble_s),
                "optimizer_s": r(self.optimizer_s), "gemm_efficiency": round(self.efficiency, 4)}


def efficiency(m: ModelShape, c: Config, k: Constants, cluster: Cluster) -> float:
    """Achieved fraction of peak: narrow per-GPU GEMMs (small h/t) run further from peak."""
    if cluster.efficiency is not None:
        return float(cluster.efficiency)
    w = m.hidden / c.tp
    return k.eff_max * w / (w + k.eff_half_width)


def ring_time(bytes_: float, n: int, bw_gbps: float, lat: float, factor: float) -> float:
    """A ring collective over n ranks moving ``factor*(n-1)/n*bytes`` per rank."""
    if n <= 1:
        return 0.0
    return factor * (n - 1) / n * bytes_ / (bw_gbps * 1e9) + factor * (n - 1) * lat


def step_time(m: ModelShape, c: Config, seq: int, global_batch: int, cluster: Cluster, k: Constants) -> Timing:
    t, p, d, b, v = c.tp, c.pp, c.dp, c.micro_batch, c.vpp
    mbs = global_batch // (d * b)
    eff = efficiency(m, c, k, cluster)
    rate = cluster.gpu.peak_tflops * 1e12 * eff
    tokens_mb = b * seq
    # Hardware FLOPs per token of one layer: matmuls 6 per weight, attention 12 h s; recompute adds a forward
    # of what it recomputes: everything (full), the attention core (selective), every second matmul (op;
    # also the attention core when it is not a flash kernel, whose output op keeps).
    matmul = 6.0 * (2 * m.hidden * (m.hidden + m.kv_dim) + (3 if m.arch == "llama" else 2) * m.hidden * m.ffn)
    attn = 12.0 * m.q_dim * seq
    if c.recompute == "full":
        layer_flops = (matmul + attn) * 8 / 6
    elif c.recompute == "selective":
        layer_flops = matmul + attn * 4 / 3
    elif c.recompute == "op":
        layer_flops = matmul + op_recompute_flops(m) + attn * (1 if k.flash_attention else 4 / 3)
    else:
        layer_flops = matmul + attn
    head_flops = 6.0 * m.vocab * m.hidden
    layout = stage_layout(m, c)
    measured = trainer_profile.applies(cluster.trainer, m, t)
    if measured:  # Hone's own layer and loss, timed on this device by `hone plan calibrate`
        layer_s = trainer_profile.layer_time(cluster.trainer, tokens_mb, seq, c.recompute)
        head_layers = trainer_profile.head_time(cluster.trainer, tokens_mb) / layer_s
    else:
        head_layers = head_flops / layer_flops
    # The slowest stage sets the pace: the last one carries the LM head, a middle one may hold more layers.
    busiest = max(max(layout[:-1], default=0), layout[-1] + head_layers)
    if measured:
        compute_mb = busiest * layer_s
        eff = tokens_mb * busiest * layer_flops / compute_mb / (cluster.gpu.peak_tflops * 1e12)  # implied
    else:
        compute_mb = tokens_mb * busiest * layer_flops / t / rate

    tp_bw, tp_lat = cluster.group_link(1, t)
    # 4 all-reduce equivalents per layer (with SP: all-gather + reduce-scatter, half each); full recompute
    # repeats the forward's 2; op keeps reduce-scatter outputs but repeats the all-gathers (1), or, without
    # SP, the all-reduces (2): only reduce-scatters are on its save list.
    n_ar = {"full": 6, "op": 5 if c.sequence_parallel and t > 1 else 6}.get(c.recompute, 4)
    tp_mb = (1 - k.tp_overlap) * max(layout) * n_ar * ring_time(2.0 * tokens_mb * m.hidden, t, tp_bw, tp_lat, 2.0)

    pp_mb = 0.0
    if p > 1:
        pp_bw, pp_lat = cluster.group_link(t * d, p)
        send = 2.0 * tokens_mb * m.hidden / (t if c.sequence_parallel else 1)  # scatter-gather over the TP group
        pp_mb = 2 * v * (send / (pp_bw * 1e9) + pp_lat)

    n_local = stage_params(m, c, "last")  # parameters per GPU
    dp_bw, dp_lat = cluster.group_link(t, d)
    grad_bytes = k.dp_comm_bytes * n_local
    dp_comm = dp_exposed = 0.0
    if c.zero >= 3 and d > 1:
        per_mb = ring_time(grad_bytes, d, dp_bw, dp_lat, 3.0)  # all-gather fwd + bwd, reduce-scatter
        dp_comm = per_mb * mbs
        extra = max(0.0, per_mb - k.fsdp_overlap * compute_mb)
        pp_mb += extra  # exposed per micro-batch
        dp_exposed = extra * mbs
    t_mb = compute_mb + tp_mb + pp_mb
    pipeline = (mbs + (p - 1) / v) * t_mb
    bubble = (p - 1) / v * t_mb
    if c.zero < 3 and d > 1:
        dp_comm = ring_time(grad_bytes, d, dp_bw, dp_lat, 2.0)  # all-reduce, or reduce-scatter + all-gather
        dp_exposed = max(0.0, dp_comm - k.dp_overlap * compute_mb * 2 / 3)
    opt_bytes = n_local * (k.weight_bytes + k.grad_bytes + 2 * k.optim_bytes) / (d if c.zero >= 1 else 1)
    optimizer = opt_bytes / (cluster.gpu.hbm_gbps * 1e9)
    if measured:
        optimizer = cluster.trainer["optimizer_s_per_param"] * n_local / (d if c.zero >= 1 else 1)
    step = pipeline + (dp_exposed if c.zero < 3 else 0.0) + optimizer

    tokens = global_batch * seq
    model_flops = tokens * flops_per_token(m, seq)
    n_gpu = t * p * d
    tflops = model_flops / step / n_gpu / 1e12
    return Timing(step, compute_mb * mbs, tp_mb * mbs, pp_mb * mbs, dp_comm, dp_exposed, bubble, optimizer, eff,
                  tokens / step, tflops, tflops / cluster.gpu.peak_tflops)
