"""Rank -> GPU placement from a link-bandwidth matrix (Pipette's idea).

Ranks follow Megatron's order (tp fastest, then dp, then pp). The cost of a placement is the
communication time per step: for each kind of group (TP rings, DP rings, PP neighbours) the
bytes it moves divided by the slowest link of the slowest group of that kind. A greedy pass
puts TP groups on the fastest mutual links, then pairwise swaps lower the cost until none helps.
"""

from __future__ import annotations

import time

import numpy as np

from hone.errors import HoneError
from hone.plan.hardware import Cluster


def link_matrix(cl: Cluster) -> np.ndarray:
    n = cl.n_gpus
    if cl.matrix is not None:
        bw = np.array(cl.matrix, dtype=float)
    else:
        bw = np.array([[cl.link_gbps(i, j) for j in range(n)] for i in range(n)], dtype=float)
    np.fill_diagonal(bw, np.inf)
    return bw


class Layout:
    """Evaluates placements for one (tp, dp, pp) shape and per-kind traffic (GB per step)."""

    def __init__(self, bw: np.ndarray, tp: int, dp: int, pp: int, traffic: dict):
        self.inv = 1.0 / np.maximum(bw, 1e-9)
        self.shape = (pp, dp, tp)
        self.traffic = traffic

    def kind_times(self, perm: np.ndarray) -> dict:
        r = perm.reshape(self.shape)
        out = {}
        for kind, axis in (("tp", 2), ("dp", 1)):
            if r.shape[axis] > 1 and self.traffic.get(kind):
                worst = self.inv[r, np.roll(r, -1, axis=axis)].max(axis=axis)  # slowest ring link per group
                out[kind] = float(self.traffic[kind] * (worst.max() + 1e-3 * worst.mean()))
        if r.shape[0] > 1 and self.traffic.get("pp"):
            worst = self.inv[r[:-1], r[1:]]
            out["pp"] = float(self.traffic["pp"] * (worst.max() + 1e-3 * worst.mean()))
        return out

    def cost(self, perm: np.ndarray) -> float:
        return float(sum(self.kind_times(perm).values()))


def greedy_tp_groups(bw: np.ndarray, tp: int) -> np.ndarray:
    """GPUs grouped tp at a time, each group grown by the GPU with the best worst link to it."""
    free = list(range(bw.shape[0]))
    order = []
    while free:
        group = [free.pop(0)]
        while len(group) < tp:
            best = max(free, key=lambda g: min(bw[g, x] for x in group))
            free.remove(best)
            group.append(best)
        order += group
    return np.array(order)


def optimize(layout: Layout, start: np.ndarray, budget_s: float = 3.0, seed: int = 0) -> np.ndarray:
    """First-improvement pairwise swaps until a full pass finds nothing (or the time budget ends)."""
    perm, best = start.copy(), layout.cost(start)
    n, t0 = len(perm), time.perf_counter()
    rng = np.random.default_rng(seed)
    improved = True
    while improved and time.perf_counter() - t0 < budget_s:
        improved = False
        for i in rng.permutation(n):
            for j in range(n):
                if j == i:
                    continue
                perm[i], perm[j] = perm[j], perm[i]
                c = layout.cost(perm)
                if c < best - 1e-12:
                    best, improved = c, True
                else:
                    perm[i], perm[j] = perm[j], perm[i]
            if time.perf_counter() - t0 > budget_s:
                break
    return perm


def traffic_of(rec: dict, cl: Cluster) -> dict:
    """GB per step per kind, recovered from the plan's times at rank-order bandwidths."""
    tb = rec["time_breakdown"] or {}
    t, d = rec["tp"], rec["dp"]
    out = {}
    for kind, key, (stride, size) in (("tp", "tp_comm_s", (1, t)), ("dp", "dp_comm_s", (t, d)),
                                      ("pp", "pp_comm_s", (t * d, rec["pp"]))):
        bw, _ = cl.group_link(stride, size)
        out[kind] = tb.get(key, 0.0) * (bw if bw != float("inf") else 0.0)
    return out


def place(cl: Cluster, rec: dict, budget_s: float = 3.0) -> dict:
    if rec["gpus"] != cl.n_gpus:
        raise HoneError(f"placement: the plan uses {rec['gpus']} GPUs, the cluster has {cl.n_gpus}")
    bw = link_matrix(cl)
    return place_matrix(bw, rec["tp"], rec["dp"], rec["pp"], traffic_of(rec, cl), budget_s)


def place_matrix(bw: np.ndarray, tp: int, dp: int, pp: int, traffic: dict, budget_s: float = 3.0) -> dict:
    n = bw.shape[0]
    if tp * dp * pp != n:
        raise HoneError(f"placement: tp*dp*pp = {tp * dp * pp} != {n} GPUs in the link matrix")
    layout = Layout(bw, tp, dp, pp, traffic)
    ident = np.arange(n)
    start = greedy_tp_groups(bw, tp) if tp > 1 else ident
    if layout.cost(ident) < layout.cost(start):
        start = ident
    perm = optimize(layout, start, budget_s)
    base, opt = layout.kind_times(ident), layout.kind_times(perm)
    base_t, opt_t = sum(base.values()), sum(opt.values())
    return {"rank_to_gpu": [int(x) for x in perm], "comm_time_s": round(opt_t, 6),
            "rank_order_comm_time_s": round(base_t, 6),
            "gain": round(base_t / opt_t - 1, 4) if opt_t > 0 else 0.0,
            "per_kind_s": {k: round(v, 6) for k, v in opt.items()},
            "rank_order_per_kind_s": {k: round(v, 6) for k, v in base.items()}}
