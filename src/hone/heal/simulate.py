"""Event-driven simulation of several training jobs sharing a cluster that fails (`hone cluster simulate`).

    from hone.heal.simulate import simulate
    res = simulate(load_jobs("jobs.toml"), n_gpus=128, days=30, mtbf_h=LLAMA3_GPU_MTBF_H,
                   policies=["checkpoint-restart", "naive-elastic", "cost-aware"], seeds=[0, 1, 2])

Time is continuous; the events are failures, repairs, jobs finishing and the end. Between
events a job's segment (a stretch on a fixed number of nodes) runs: first ``delay`` seconds of
restart (plus, for a voluntary resize, writing a checkpoint first), then cycles of ``tau``
seconds of training and ``C`` seconds writing a checkpoint. A failure inside a segment loses
everything since the last completed checkpoint; a voluntary stop keeps it (it checkpoints on
demand). Every GPU-second of the cluster lands in exactly one bucket: useful, rollback,
restart (restart and transition), checkpoint, idle (healthy but not training) or down.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hone.errors import HoneError
from hone.heal.cluster_policies import POLICY_FUNCS, best_allocation
from hone.heal.failures import (
    DEFAULT_REPAIR,
    LLAMA3_HARDWARE_FRACTION,
    FailureEvent,
    RepairTime,
    estimated_gpu_mtbf_h,
    generate,
    load_trace,
)
from hone.heal.jobs import Job, curve
from hone.plan.reliability import young_daly_s

BUCKETS = ("useful", "rollback", "restart", "checkpoint", "idle", "down")


@dataclass
class Segment:
    start: float
    nodes: int
    rate: float  # tokens/s
    delay: float  # seconds before the first step (restart, or checkpoint save + restart)
    tau: float  # training seconds between checkpoints (inf: never)
    ckpt: float  # seconds to write a checkpoint
    version: int

    def split(self, t: float, failed: bool) -> dict:
        """Seconds of this segment up to t, per bucket (per node-set, not per GPU)."""
        dur = max(0.0, t - self.start)
        restart = min(dur, self.delay)
        e = dur - restart
        if math.isinf(self.tau):  # no failures expected: never checkpoints (0 * inf would be nan)
            return {"restart": restart, "useful": 0.0 if failed else e, "checkpoint": 0.0,
                    "rollback": e if failed else 0.0}
        k = int(e // (self.tau + self.ckpt))
        phase = e - k * (self.tau + self.ckpt)
        if failed:  # the partial cycle (and a checkpoint being written) is lost
            return {"restart": restart, "useful": k * self.tau, "checkpoint": k * self.ckpt, "rollback": phase}
        return {"restart": restart, "useful": k * self.tau + min(phase, self.tau),
                "checkpoint": k * self.ckpt + max(0.0, phase - self.tau), "rollback": 0.0}


@dataclass
class JobRun:
    idx: int
    job: Job
    curve: dict  # {nodes: tokens/s}
    size: int = 0  # initial node count (what the baselines restore)
    budget: float = math.inf  # tokens
    nodes: list = field(default_factory=list)  # healthy nodes held (running or waiting)
    seg: Optional[Segment] = None
    tokens: float = 0.0  # committed
    next_delay: float = 0.0  # delay of the next start: restart, or checkpoint + restart after a voluntary stop
    last_nodes: int = 0
    done_at: Optional[float] = None
    restarts: int = 0
    reconfigurations: int = 0

    def running_nodes(self) -> int:
        return self.seg.nodes if self.seg else 0


class Simulation:
    def __init__(self, runs: list[JobRun], *, n_nodes: int, gpus_per_node: int, failures: list[FailureEvent],
                 policy: str, end_s: float, gpu_mtbf_h: float):
        self.runs, self.n_nodes, self.gpn = runs, n_nodes, gpus_per_node
        self.policy_name, self.decide = policy, POLICY_FUNCS[policy]
        self.end_s, self.gpu_mtbf_s = end_s, gpu_mtbf_h * 3600
        self.failures = failures
        self.down = [False] * n_nodes
        self.holder: list[Optional[int]] = [None] * n_nodes
        self.returned: dict[int, int] = {}  # job -> nodes just repaired that it lost (naive-elastic)
        self.lost_by: dict[int, int] = {}  # down node -> job that held it
        self.gpu_s = dict.fromkeys(BUCKETS, 0.0)
        self.now = 0.0
        self.version = 0
        self.heap: list = []
        self.pushed = 0
        self.events: list[dict] = []
        self.timeline: list = []
        self.counts = {"failures": 0, "masked": 0, "hit_jobs": 0, "hardware": 0, "transient": 0}

    # ---- what policies read ----------------------------------------------------------------
    def alive(self) -> list[JobRun]:
        return [j for j in self.runs if j.done_at is None]

    def free_nodes(self) -> int:
        return sum(1 for k in range(self.n_nodes) if not self.down[k] and self.holder[k] is None)

    def healthy_nodes(self) -> int:
        return self.n_nodes - sum(self.down)

    def horizon_s(self, t: float) -> float:
        """Expected time to the next failure of the healthy GPUs, capped at the end."""
        mtbf = self.gpu_mtbf_s / max(1, self.healthy_nodes() * self.gpn)
        return min(mtbf, self.end_s - t)

    def transition_s(self, j: JobRun, n: int) -> float:
        if j.seg is None:
            return j.next_delay
        return 0.0 if n == j.seg.nodes else j.job.checkpoint_s + j.job.restart_s

    def tokens_left(self, j: JobRun, t: float) -> float:
        done = j.tokens + (j.seg.split(t, False)["useful"] * j.seg.rate if j.seg else 0.0)
        return max(0.0, j.budget - done)

    # ---- segments ----------------------------------------------------------------------------
    def start(self, j: JobRun, t: float, n: int, delay: float) -> None:
        if n != j.last_nodes:
            j.reconfigurations += j.last_nodes > 0 or t > 0
            self.log(t, "resize" if j.last_nodes else "start", j, j.last_nodes, n)
        if delay > 0:
            j.restarts += 1
        ck = j.job.checkpoint_s
        tau = j.job.checkpoint_interval_s or young_daly_s(ck, self.gpu_mtbf_s / (n * self.gpn))
        self.version += 1
        j.seg = Segment(t, n, j.curve[n], delay, tau, ck, self.version)
        j.last_nodes = n
        if j.budget < math.inf:
            need = max(0.0, (j.budget - j.tokens) / j.seg.rate)
            cps = 0 if math.isinf(tau) else max(0, math.ceil(need / tau) - 1)
            self.push(t + delay + need + cps * ck, 2, ("finish", j.idx, self.version))

    def stop(self, j: JobRun, t: float, failed: bool) -> None:
        parts = j.seg.split(t, failed)
        gpus = j.seg.nodes * self.gpn
        for b, s in parts.items():
            self.gpu_s[b] += s * gpus
        j.tokens = min(j.budget, j.tokens + parts["useful"] * j.seg.rate)
        j.seg = None
        j.next_delay = j.job.restart_s if failed else j.job.checkpoint_s + j.job.restart_s

    # ---- moving nodes -----------------------------------------------------------------------
    def apply(self, t: float, targets: dict[int, int]) -> None:
        """Resize jobs to the policy's node counts: release first, then grant; a job that cannot
        get its count from the free nodes waits, holding what it has."""
        for j in self.alive():
            want = targets.get(j.idx, 0)
            if j.seg and want == j.seg.nodes:
                continue
            if j.seg:
                self.stop(j, t, failed=False)
            if want == 0 and j.last_nodes:  # paused (also a job stopped by a failure and given nothing)
                j.reconfigurations += 1
                self.log(t, "pause", j, j.last_nodes, 0)
                j.last_nodes = 0
            while len(j.nodes) > want:
                self.holder[j.nodes.pop()] = None
        free = [k for k in range(self.n_nodes) if not self.down[k] and self.holder[k] is None]
        for j in sorted(self.alive(), key=lambda j: (-j.job.weight, j.idx)):
            want = targets.get(j.idx, 0)
            if j.seg or want == 0 or want - len(j.nodes) > len(free):
                continue
            for k in free[:want - len(j.nodes)]:
                self.holder[k] = j.idx
                j.nodes.append(k)
            free = [k for k in free if self.holder[k] is None]
            j.nodes.sort()
            self.start(j, t, want, j.next_delay)

    # ---- the event loop ---------------------------------------------------------------------
    def push(self, t: float, prio: int, ev: tuple) -> None:
        self.pushed += 1  # ties in time and priority keep insertion order: deterministic
        heapq.heappush(self.heap, (t, prio, self.pushed, ev))

    def log(self, t: float, what: str, j: Optional[JobRun], before: int = 0, after: int = 0, **extra) -> None:
        row = {"t_h": round(t / 3600, 4), "event": what}
        if j is not None:
            row.update(job=j.job.name, nodes_from=before, nodes_to=after)
        row.update(extra)
        self.events.append(row)

    def account(self, t: float) -> None:
        dt = t - self.now
        if dt > 0:
            down = sum(self.down)
            busy = sum(j.running_nodes() for j in self.runs)
            self.gpu_s["down"] += dt * down * self.gpn
            self.gpu_s["idle"] += dt * (self.n_nodes - down - busy) * self.gpn
        self.now = t

    def run(self, initial: list[int]) -> dict:
        for f in self.failures:
            self.push(f.time_s, 0, ("fail", f))
        self.push(self.end_s, 3, ("end",))
        self.apply(0.0, {j.idx: n for j, n in zip(self.runs, initial)})
        self.snapshot(0.0)
        while self.heap:
            t, _, _, ev = heapq.heappop(self.heap)
            self.account(t)
            if ev[0] == "end":
                for j in self.alive():
                    if j.seg:
                        self.stop(j, t, failed=False)
                break
            if not self.handle(t, ev):
                continue
            self.apply(t, self.decide(self, t))
            self.returned = {}
            self.snapshot(t)
        return self.result()

    def handle(self, t: float, ev: tuple) -> bool:
        """Apply one event to the cluster; False if nothing changed (no re-plan needed)."""
        kind = ev[0]
        if kind == "finish":
            j = self.runs[ev[1]]
            if j.seg is None or j.seg.version != ev[2] or j.done_at is not None:
                return False
            self.stop(j, t, failed=False)
            j.tokens, j.done_at = j.budget, t
            for k in j.nodes:
                self.holder[k] = None
            j.nodes = []
            self.log(t, "finish", j, j.last_nodes, 0)
            return True
        if kind == "repair":
            node = ev[1]
            self.down[node] = False
            owner = self.lost_by.pop(node, None)
            if owner is not None:
                self.returned[owner] = self.returned.get(owner, 0) + 1
            self.log(t, "repair", None, node=node)
            return True
        f: FailureEvent = ev[1]
        self.counts["failures"] += 1
        if self.down[f.node]:
            self.counts["masked"] += 1  # the node is already out: this failure changes nothing
            return False
        self.counts[f.kind] += 1
        hid = self.holder[f.node]
        j = self.runs[hid] if hid is not None else None
        if j is not None and j.seg is not None:
            self.stop(j, t, failed=True)
            self.counts["hit_jobs"] += 1
        if f.kind == "hardware":
            self.down[f.node] = True
            self.push(t + f.repair_s, 1, ("repair", f.node))
            if j is not None:
                j.nodes.remove(f.node)
                self.holder[f.node] = None
                self.lost_by[f.node] = j.idx
        self.log(t, f"{f.kind} failure", j, node=f.node, repair_h=round(f.repair_s / 3600, 3))
        return True

    def snapshot(self, t: float) -> None:
        self.timeline.append([round(t / 3600, 4)] + [j.running_nodes() for j in self.runs])

    def result(self) -> dict:
        total = self.n_nodes * self.gpn * self.end_s
        hours = {b: self.gpu_s[b] / 3600 for b in BUCKETS}
        flops = {j.job.name: j.tokens * j.job.flops_per_token for j in self.runs}
        return {
            "policy": self.policy_name,
            "weighted_flops": sum(j.job.weight * flops[j.job.name] for j in self.runs),
            "flops": flops,
            "tokens": {j.job.name: j.tokens for j in self.runs},
            "gpu_hours": {**hours, "lost": sum(v for b, v in hours.items() if b != "useful"), "total": total / 3600},
            "accounting_error": abs(sum(self.gpu_s.values()) - total) / total,
            "reconfigurations": sum(j.reconfigurations for j in self.runs),
            "restarts": sum(j.restarts for j in self.runs),
            "failures": dict(self.counts),
            "finished_h": {j.job.name: round(j.done_at / 3600, 4) for j in self.runs if j.done_at is not None},
            "events": self.events,
            "timeline": self.timeline,
        }


# ---- the whole experiment -------------------------------------------------------------------------

def prepare(jobs: list[Job], *, n_nodes: int, gpus_per_node: int, gpu: str, end_s: float,
            where: str = "jobs") -> tuple[list[dict], list[int], list[float]]:
    """Curves, the initial allocation (the DP on the whole healthy cluster: every policy starts
    from it, so with no failures they all reach the ideal) and token budgets."""
    curves = []
    for i, job in enumerate(jobs):
        c = curve(job, gpu, gpus_per_node, n_nodes)
        if not c:
            limits = (f" within min_gpus {job.min_gpus} / max_gpus {job.max_gpus}"
                      if job.min_gpus or job.max_gpus else "")
            raise HoneError(f"{where}: job[{i}] ({job.name}): no valid parallel shape of {job.model.name} fits on "
                            f"1..{n_nodes} nodes of {gpus_per_node} x {gpu}{limits} (see hone plan --model "
                            f"{job.model.name} --cluster {n_nodes}x{gpus_per_node}x{gpu} --seq {job.seq} "
                            f"--global-batch {job.global_batch})")
        curves.append(c)
    budgets = [job.tokens if job.tokens else math.inf for job in jobs]
    values = [{n: job.weight * job.flops_per_token * min(tps * end_s, budgets[i]) for n, tps in c.items()}
              for i, (job, c) in enumerate(zip(jobs, curves))]
    _, initial = best_allocation(values, n_nodes, [0] * len(jobs))
    for i, job in enumerate(jobs):
        if job.hours:
            budgets[i] = curves[i][initial[i]] * job.hours * 3600 if initial[i] else math.inf
    return curves, initial, budgets


def ideal_weighted_flops(jobs, curves, initial, budgets, end_s) -> float:
    """No failures, no checkpoints: the initial allocation running the whole time."""
    return sum(job.weight * job.flops_per_token * min(curves[i][n] * end_s if n else 0.0, budgets[i])
               for i, (job, n) in enumerate(zip(jobs, initial)))


def run_policy(jobs, curves, initial, budgets, *, policy: str, n_nodes: int, gpus_per_node: int,
               failures: list[FailureEvent], end_s: float, gpu_mtbf_h: float) -> dict:
    runs = [JobRun(i, job, curves[i], size=initial[i], budget=budgets[i]) for i, job in enumerate(jobs)]
    sim = Simulation(runs, n_nodes=n_nodes, gpus_per_node=gpus_per_node, failures=failures, policy=policy,
                     end_s=end_s, gpu_mtbf_h=gpu_mtbf_h)
    return sim.run(initial)


def simulate(jobs: list[Job], *, n_gpus: int, days: float, policies: list[str], seeds: list[int],
             gpus_per_node: int = 8, gpu: str = "H100", mtbf_h: Optional[float] = None,
             trace: Optional[Path] = None, repair: str = "", hardware_fraction: Optional[float] = None,
             where: str = "jobs") -> dict:
    """Every policy on the same failures for each seed; per-run results and a summary."""
    check_args(n_gpus, gpus_per_node, days, policies, seeds, mtbf_h, trace)
    n_nodes, end_s = n_gpus // gpus_per_node, days * 86400
    rep = RepairTime(repair or DEFAULT_REPAIR)
    hw = LLAMA3_HARDWARE_FRACTION if hardware_fraction is None else hardware_fraction
    if not 0 <= hw <= 1:
        raise HoneError(f"--hardware-fraction must be in [0, 1] (got {hw})")
    curves, initial, budgets = prepare(jobs, n_nodes=n_nodes, gpus_per_node=gpus_per_node, gpu=gpu, end_s=end_s,
                                       where=where)
    ideal = ideal_weighted_flops(jobs, curves, initial, budgets, end_s)
    runs = []
    for seed in seeds:
        if trace is not None:
            failures = load_trace(trace, n_gpus, gpus_per_node, days, rep, seed)
            assumed = mtbf_h or estimated_gpu_mtbf_h(failures, n_gpus, days)
        else:
            failures = generate(n_gpus, gpus_per_node, days, mtbf_h, seed, rep, hw)
            assumed = mtbf_h
        for p in policies:
            r = run_policy(jobs, curves, initial, budgets, policy=p, n_nodes=n_nodes, gpus_per_node=gpus_per_node,
                           failures=failures, end_s=end_s, gpu_mtbf_h=assumed)
            r.update(seed=seed, goodput=r["weighted_flops"] / ideal if ideal else 0.0)
            runs.append(r)
    return {
        "config": {"gpus": n_gpus, "gpus_per_node": gpus_per_node, "gpu": gpu, "nodes": n_nodes, "days": days,
                   "policies": list(policies), "seeds": list(seeds), "trace": str(trace) if trace else None,
                   "gpu_mtbf_h": mtbf_h, "cluster_mtbf_h": mtbf_h / n_gpus if mtbf_h else None,
                   "repair": rep.spec, "hardware_fraction": hw},
        "jobs": [{"name": j.name, "model": j.model.name, "params": j.model.params(), "seq": j.seq,
                  "global_batch": j.global_batch, "weight": j.weight, "flops_per_token": j.flops_per_token,
                  "budget_tokens": None if math.isinf(budgets[i]) else budgets[i], "initial_nodes": initial[i],
                  "curve_tokens_per_s": {str(n): round(v, 3) for n, v in curves[i].items()}}
                 for i, j in enumerate(jobs)],
        "ideal_weighted_flops": ideal,
        "runs": runs,
        "summary": summarize(runs, policies),
    }


def check_args(n_gpus, gpn, days, policies, seeds, mtbf_h, trace) -> None:
    if gpn < 1 or n_gpus < gpn or n_gpus % gpn:
        raise HoneError(f"--gpus {n_gpus} must be a positive multiple of --gpus-per-node {gpn}")
    if not days > 0:
        raise HoneError(f"--days must be positive (got {days})")
    if not policies:
        raise HoneError("--policy: give at least one of " + ", ".join(POLICY_FUNCS))
    for p in policies:
        if p not in POLICY_FUNCS:
            raise HoneError(f"--policy {p!r}: unknown policy (known: {', '.join(POLICY_FUNCS)})")
    if not seeds:
        raise HoneError("--seeds must be at least 1")
    if trace is None and mtbf_h is None:
        raise HoneError("give --trace FILE or --mtbf HOURS (per-GPU MTBF; 'llama3' for the Llama 3 rate)")


def summarize(runs: list[dict], policies: list[str]) -> dict:
    """Per policy: mean / min / max over seeds; cost-aware's ratio to each other policy per seed."""
    out = {}
    for p in policies:
        rs = [r for r in runs if r["policy"] == p]
        agg = lambda xs: {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs)}  # noqa: E731
        out[p] = {"weighted_flops": agg([r["weighted_flops"] for r in rs]), "goodput": agg([r["goodput"] for r in rs]),
                  "lost_gpu_hours": {b: sum(r["gpu_hours"][b] for r in rs) / len(rs) for b in (*BUCKETS[1:], "lost")},
                  "useful_tokens": {name: sum(r["tokens"][name] for r in rs) / len(rs) for name in rs[0]["tokens"]},
                  "reconfigurations": sum(r["reconfigurations"] for r in rs) / len(rs),
                  "failures": sum(r["failures"]["failures"] for r in rs) / len(rs)}
    if "cost-aware" in policies:
        ca = {r["seed"]: r["weighted_flops"] for r in runs if r["policy"] == "cost-aware"}
        for p in policies:
            if p == "cost-aware":
                continue
            ratios = [ca[r["seed"]] / r["weighted_flops"] for r in runs if r["policy"] == p and r["weighted_flops"] > 0]
            if ratios:
                out[p]["cost_aware_ratio"] = {"mean": sum(ratios) / len(ratios), "min": min(ratios), "max": max(ratios)}
    return out
