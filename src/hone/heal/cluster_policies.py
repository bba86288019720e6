"""Recovery policies of the cluster simulator, and the dynamic program behind the cost-aware one.

Every policy answers one question at every event (a failure, a repair, a job finishing):
how many nodes should each job have now? The simulator turns the answer into node moves,
stops and restarts (``Simulation.apply``).

- ``checkpoint-restart``: a job hit by a failure restarts from its last checkpoint at its full
  size: at once on a free healthy node if there is one, else it waits (holding its nodes) for
  the repair. What torchrun plus checkpoints gives you.
- ``naive-elastic``: the hit job shrinks to the largest valid shape on the nodes it still has
  (plus free ones), and grows back to its original size when nodes return; no job ever gives
  nodes to another.
- ``cost-aware`` (Unicron, Wu et al. 2024): maximize sum_j w_j * FLOP/s_j(n_j) over the time to
  the next expected failure, minus each job's transition cost, by dynamic programming over
  jobs x node counts restricted to each job's valid parallel shapes.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Callable

import numpy as np

POLICIES = ("checkpoint-restart", "naive-elastic", "cost-aware")


def best_allocation(values: list[dict[int, float]], capacity: int, current: list[int]) -> tuple[float, list[int]]:
    """Knapsack DP: choose n_j in values[j] (0 is always allowed, worth 0) with sum n_j <= capacity,
    maximizing sum values[j][n_j]. Ties go to the allocation that keeps more jobs at ``current``
    (a move costs something the values may not see). O(jobs * capacity * choices), vectorized
    over capacity so that a 2048-node cluster re-plans in milliseconds."""
    best = np.zeros(capacity + 1)  # best[c]: value with at most c nodes used by the jobs so far
    kept = np.zeros(capacity + 1, dtype=np.int64)  # jobs left at their current count (tie-break)
    picks = []
    for j, vals in enumerate(values):
        new, new_kept = np.full(capacity + 1, -np.inf), np.zeros(capacity + 1, dtype=np.int64)
        pick = np.zeros(capacity + 1, dtype=np.int64)
        for n, v in _undominated(vals, current[j]):
            if n > capacity:
                break
            cand = np.full(capacity + 1, -np.inf)
            cand[n:] = best[:capacity + 1 - n] + v
            ck = np.zeros(capacity + 1, dtype=np.int64)
            ck[n:] = kept[:capacity + 1 - n] + (n == current[j])
            better = (cand > new) | ((cand == new) & (ck > new_kept))
            new, new_kept, pick = np.where(better, cand, new), np.where(better, ck, new_kept), np.where(better, n, pick)
        best, kept = new, new_kept
        picks.append(pick)
    alloc, c = [0] * len(values), capacity
    for j in range(len(values) - 1, -1, -1):
        alloc[j] = int(picks[j][c])
        c -= alloc[j]
    return float(best[capacity]), alloc


def _undominated(vals: dict[int, float], keep: int) -> list[tuple[int, float]]:
    """(n, value) choices worth more than every smaller count, plus 0 and the current count:
    a count no better than a smaller one only leaves nodes idle that another job could use."""
    out, top = [(0, 0.0)], 0.0
    for n in sorted(vals):
        v = vals[n]
        if v > top or n == keep:
            out.append((n, v))
        top = max(top, v)
    return out


def brute_force(values: list[dict[int, float]], capacity: int) -> tuple[float, list[int]]:
    """Every combination: the reference the DP is tested against (small cases only)."""
    best = (-math.inf, [])
    for combo in product(*[[0] + sorted(v) for v in values]):
        if sum(combo) <= capacity:
            val = sum(values[j].get(n, 0.0) for j, n in enumerate(combo))
            if val > best[0]:
                best = (val, list(combo))
    return best


# ---- the three policies ---------------------------------------------------------------------------

def checkpoint_restart(sim, t: float) -> dict[int, int]:
    return {j.idx: j.size for j in sim.alive()}


def naive_elastic(sim, t: float) -> dict[int, int]:
    """Largest valid shape on the job's own healthy nodes plus free ones, never above its
    original size; jobs whose nodes just came back are served first."""
    free = sim.free_nodes()
    out = {}
    for j in sorted(sim.alive(), key=lambda j: (-sim.returned.get(j.idx, 0), j.idx)):
        avail = min(j.size, len(j.nodes) + free)
        n = max((c for c in j.curve if c <= avail), default=0)
        if n == 0:
            out[j.idx] = j.size  # nothing valid fits: wait for the repair like checkpoint-restart
            continue
        out[j.idx] = n
        free -= max(0, n - len(j.nodes))
        free += max(0, len(j.nodes) - n)
    return out


def cost_aware(sim, t: float) -> dict[int, int]:
    """Unicron's plan: value_j(n) = w_j * FLOP/token_j * min(tokens/s_j(n) * (H - D_j(n)), tokens left),
    H = expected time to the next failure (capped at the end), D_j(n) = the stop it costs: 0 to
    keep a healthy job as it is, restart for a job that must restart anyway, checkpoint + restart
    for a healthy job that is resized."""
    jobs = sim.alive()
    horizon = sim.horizon_s(t)
    values, current = [], []
    for j in jobs:
        left = sim.tokens_left(j, t)
        vals = {}
        for n, tps in j.curve.items():
            d = sim.transition_s(j, n)
            vals[n] = j.job.weight * j.job.flops_per_token * min(tps * max(0.0, horizon - d), left)
        values.append(vals)
        current.append(j.running_nodes() or j.last_nodes)  # a stopped job: prefer its last size on ties
    _, alloc = best_allocation(values, sim.healthy_nodes(), current)
    return {j.idx: n for j, n in zip(jobs, alloc)}


POLICY_FUNCS: dict[str, Callable] = {"checkpoint-restart": checkpoint_restart, "naive-elastic": naive_elastic,
                                     "cost-aware": cost_aware}
