"""Search every valid (tp, pp, dp, micro-batch, recompute, zero, vpp); reject the rest with a reason.

    from hone.plan.search import search
    result = search(load_shape("llama3-70b"), load_cluster("4x8xH100"), seq=8192, global_batch=512)
    result.plans[0]          # the fastest configuration that fits, a dict (see ``plan_record``)
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from hone.errors import HoneError
from hone.plan.config import RECOMPUTE, Config, Constants
from hone.plan.hardware import Cluster
from hone.plan.memory import GIB, memory
from hone.plan.shapes import ModelShape
from hone.plan.timing import step_time
from hone.plan.trainer_profile import with_trainer

MAX_VPP = 8
MAX_MICRO_BATCH = 64


def divisors(n: int) -> list[int]:
    small = [i for i in range(1, int(math.isqrt(n)) + 1) if n % i == 0]
    return sorted(set(small + [n // i for i in small]))


def structural_reason(m: ModelShape, c: Config, seq: int, global_batch: int, n_gpus: int) -> Optional[str]:
    """Why a configuration cannot run at all (shapes, divisibility), or None."""
    if m.heads % c.tp:
        return f"tp={c.tp} does not divide {m.heads} heads"
    if m.kv_heads % c.tp:
        return f"tp={c.tp} does not divide {m.kv_heads} kv heads"
    if m.ffn % c.tp:
        return f"tp={c.tp} does not divide ffn {m.ffn}"
    if c.tp > 1 and c.sequence_parallel and seq % c.tp:
        return f"sequence parallel needs tp={c.tp} to divide seq {seq}"
    if c.pp > m.layers:
        return f"pp={c.pp} exceeds {m.layers} layers"
    if c.tp * c.pp * c.dp != n_gpus:
        return f"dp({c.dp}) * tp({c.tp}) * pp({c.pp}) = {c.tp * c.pp * c.dp} != {n_gpus} GPUs"
    if global_batch % (c.dp * c.micro_batch):
        return f"global batch {global_batch} is not divisible by dp*mb = {c.dp}*{c.micro_batch}"
    if c.vpp > 1:
        if c.pp == 1:
            return f"vpp={c.vpp} needs pp > 1"
        if c.pp * c.vpp > m.layers + 2:  # the embedding and the loss may each fill a chunk (Llama 3)
            return f"pp*vpp = {c.pp}*{c.vpp} exceeds {m.layers} layers + 2 (embedding, loss)"
        mbs = global_batch // (c.dp * c.micro_batch)
        if mbs % c.pp:
            return f"interleaved schedule needs micro-batches ({mbs}) divisible by pp={c.pp}"
    return None


def plan_record(m: ModelShape, c: Config, seq: int, global_batch: int, cluster: Cluster, k: Constants,
                reason: Optional[str] = None) -> dict:
    """Everything about one configuration: the JSON row of ``hone plan --json``."""
    rec = {"tp": c.tp, "pp": c.pp, "dp": c.dp, "micro_batch": c.micro_batch, "recompute": c.recompute, "zero": c.zero,
           "vpp": c.vpp, "sequence_parallel": c.sequence_parallel and c.tp > 1, "gpus": c.tp * c.pp * c.dp,
           "micro_batches": (global_batch // (c.dp * c.micro_batch)
                             if global_batch % (c.dp * c.micro_batch) == 0 else None),
           "fits": False, "memory_gib_per_gpu": None, "memory_breakdown": None, "step_time_s": None,
           "tokens_per_s": None, "tflops_per_gpu": None, "mfu": None, "time_breakdown": None}
    k = with_trainer(k, cluster, m)
    if reason is None:
        reason = structural_reason(m, c, seq, global_batch, cluster.n_gpus)
    if reason is not None:
        rec["reason"] = reason
        return rec
    mem = memory(m, c, seq, global_batch, k)
    tim = step_time(m, c, seq, global_batch, cluster, k)
    total = mem.total / GIB
    rec.update(memory_gib_per_gpu=round(total, 3), memory_breakdown=mem.breakdown(),
               step_time_s=round(tim.step_time_s, 6),
               tokens_per_s=round(tim.tokens_per_s, 3), tflops_per_gpu=round(tim.tflops_per_gpu, 3),
               mfu=round(tim.mfu, 4), time_breakdown=tim.breakdown())
    cap = cluster.gpu.memory_gib
    rec["fits"] = total <= cap
    if not rec["fits"]:
        rec["reason"] = f"needs {total:.1f} GiB > {cap:g} GiB"
    return rec


@dataclass
class SearchResult:
    plans: list  # fitting configurations, best first (dicts from plan_record)
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    evaluated: int = 0
    smallest: Optional[dict] = None  # the configuration with the least memory (also when nothing fits)


def candidates(m: ModelShape, seq: int, global_batch: int, n_gpus: int, fixed: dict, rejected: Counter):
    """Every structurally valid Config on n_gpus honouring ``fixed``; counts what it rejects."""
    def opts(name, values):
        return [fixed[name]] if name in fixed else values

    for tp in opts("tp", divisors(n_gpus)):
        probe = Config(tp, 1, n_gpus // tp, 1, sequence_parallel=fixed.get("sequence_parallel", True))
        why = structural_reason(m, probe, seq, 1, n_gpus) if n_gpus % tp == 0 else None
        if why and "tp=" in why:
            rejected[why] += 1
            continue
        for pp in opts("pp", divisors(n_gpus // tp) if n_gpus % tp == 0 else [1]):
            dp = n_gpus // (tp * pp) if n_gpus % (tp * pp) == 0 else 0
            if "dp" in fixed and fixed["dp"] != dp:
                dp = fixed["dp"]
            base = Config(tp, pp, max(dp, 1), 1, sequence_parallel=fixed.get("sequence_parallel", True))
            why = structural_reason(m, base, seq, global_batch if dp else 1, n_gpus) if dp else \
                f"tp*pp = {tp * pp} does not divide {n_gpus} GPUs"
            if why and not why.startswith("global batch"):
                rejected[why] += 1
                continue
            per_replica = global_batch // dp if global_batch % dp == 0 else 0
            if not per_replica:
                rejected[f"global batch {global_batch} is not divisible by dp={dp}"] += 1
                continue
            mbs_opts = [x for x in divisors(per_replica) if x <= MAX_MICRO_BATCH]
            for mb in opts("micro_batch", mbs_opts):
                mcount = per_replica // mb if per_replica % mb == 0 else 0
                vpps = [1] + [v for v in range(2, MAX_VPP + 1)
                              if pp > 1 and pp * v <= m.layers + 2 and mcount and mcount % pp == 0]
                for vpp in opts("vpp", vpps):
                    for rc in opts("recompute", list(RECOMPUTE)):
                        for z in opts("zero", [0, 1, 2, 3] if dp > 1 else [0]):
                            yield Config(tp, pp, dp, mb, rc, z, vpp, base.sequence_parallel)


def search(m: ModelShape, cluster: Cluster, seq: int, global_batch: int, k: Constants = Constants(),
           fixed: Optional[dict] = None, top: Optional[int] = None) -> SearchResult:
    """All fitting configurations ranked by throughput (tokens/s), best first."""
    check_inputs(m, seq, global_batch)
    k = with_trainer(k, cluster, m)
    fixed = fixed or {}
    res = SearchResult([])
    n = cluster.n_gpus
    cap = cluster.gpu.memory_gib * GIB
    best_mem = None
    for c in candidates(m, seq, global_batch, n, fixed, res.rejected):
        why = structural_reason(m, c, seq, global_batch, n)
        if why:
            res.rejected[why] += 1
            continue
        res.evaluated += 1
        mem = memory(m, c, seq, global_batch, k).total
        if best_mem is None or mem < best_mem[0]:
            best_mem = (mem, c)
        if mem > cap:
            res.rejected["does not fit in memory"] += 1
            continue
        t = step_time(m, c, seq, global_batch, cluster, k)
        res.plans.append((t.tokens_per_s, -mem, c))
    res.plans.sort(key=lambda x: (x[0], x[1]), reverse=True)
    keep = res.plans[:top] if top else res.plans
    res.plans = [plan_record(m, c, seq, global_batch, cluster, k) for _, _, c in keep]
    if best_mem is not None:
        res.smallest = plan_record(m, best_mem[1], seq, global_batch, cluster, k)
    return res


# The layouts `hone train` runs as planned (:func:`hone.plan.layout.train_fields` writes them as
# [train]): whole-layer activation checkpointing or none; DDP (ZeRO 0), which has no pipeline, or
# FSDP (ZeRO 3). Selective / per-op recompute and ZeRO 1-2 are other trainers' (Megatron-LM's).
HONE_RECOMPUTE = ("none", "full")
HONE_ZERO = (0, 3)
TRAINERS = ("hone", "megatron")


def hone_layout_reason(fixed: dict) -> Optional[str]:
    """Why fixed configuration fields are not a layout `hone train` runs, or None."""
    if fixed.get("recompute", "none") not in HONE_RECOMPUTE:
        return f"recompute={fixed['recompute']}: hone train recomputes whole layers (full) or nothing (none)"
    if fixed.get("zero", 0) not in HONE_ZERO:
        return f"zero={fixed['zero']}: hone train runs zero=0 (data_parallel = \"ddp\") or zero=3 (\"fsdp\")"
    if fixed.get("zero") == 0 and fixed.get("pp", 1) > 1 and fixed.get("dp", 2) > 1:
        return "zero=0 with pp > 1: under a pipeline hone train's data parallelism is fsdp (zero=3)"
    return None


def search_hone_trainer(m: ModelShape, cluster: Cluster, seq: int, global_batch: int, k: Constants,
                        fixed: Optional[dict] = None, top: Optional[int] = None) -> SearchResult:
    """:func:`search` over the layouts `hone train` runs (recompute none or full; ZeRO 0 without a
    pipeline, or 3), honouring ``fixed``: one ranking by throughput, best first. ``k``: normally
    :meth:`Constants.hone_trainer`. The decision stage and `hone plan --trainer hone` both use it."""
    fixed = fixed or {}
    out = SearchResult([])
    for recompute in HONE_RECOMPUTE:
        for zero in HONE_ZERO:
            want = {"recompute": recompute, "zero": zero}
            if zero == 0 and "pp" not in fixed:
                want["pp"] = 1
            trial = {**want, **fixed}
            if trial["recompute"] != recompute or trial["zero"] != zero or hone_layout_reason(trial):
                continue
            res = search(m, cluster, seq, global_batch, k, fixed=trial, top=top)
            out.plans += res.plans
            out.rejected.update(res.rejected)
            out.evaluated += res.evaluated
            if res.smallest and (out.smallest is None or
                                 res.smallest["memory_gib_per_gpu"] < out.smallest["memory_gib_per_gpu"]):
                out.smallest = res.smallest
    out.plans.sort(key=lambda p: p["tokens_per_s"], reverse=True)  # stable: ties keep the order above
    out.plans = out.plans[:top] if top else out.plans
    return out


def check_inputs(m: ModelShape, seq: int, global_batch: int) -> None:
    if seq < 1:
        raise HoneError(f"--seq must be at least 1 (got {seq})")
    if global_batch < 1:
        raise HoneError(f"--global-batch must be at least 1 (got {global_batch})")


def nothing_fits_message(m: ModelShape, cluster: Cluster, seq: int, global_batch: int, k: Constants,
                         res: SearchResult, fixed: Optional[dict] = None) -> str:
    """One line: why nothing fits and the smallest memory or GPU count that would."""
    if res.smallest is None:
        top = res.rejected.most_common(1)
        why = top[0][0] if top else "no configuration"
        return (f"no valid configuration of {m.name} on {cluster.n_gpus} GPUs with global batch {global_batch}: {why}")
    s = res.smallest
    need = s["memory_gib_per_gpu"]
    msg = (f"nothing fits in {cluster.gpu.memory_gib:g} GiB per GPU: the smallest configuration "
           f"({config_label(s)}) needs {need:.1f} GiB; it fits on GPUs with >= {math.ceil(need)} GiB")
    gpus = smallest_gpu_count(m, cluster, seq, global_batch, k, fixed)
    if gpus:
        msg += (f", or on {gpus} {cluster.gpu.name} GPUs "
                f"({gpus // cluster.gpus_per_node} nodes of {cluster.gpus_per_node})")
    return msg


def smallest_gpu_count(m: ModelShape, cluster: Cluster, seq: int, global_batch: int, k: Constants,
                       fixed: Optional[dict] = None) -> Optional[int]:
    """The fewest whole nodes (doubling, then bisecting) on which some configuration fits."""
    if cluster.matrix is not None or cluster.node_inter_gbps:
        return None
    fixed = {key: v for key, v in (fixed or {}).items() if key != "dp"}

    def fits(nodes: int) -> bool:
        n = nodes * cluster.gpus_per_node
        cap = cluster.gpu.memory_gib * GIB
        for c in candidates(m, seq, global_batch, n, fixed, Counter()):
            if structural_reason(m, c, seq, global_batch, n) is None and memory(m, c, seq, global_batch,
                                                                                k).total <= cap:
                return True
        return False

    lo, hi = cluster.nodes, cluster.nodes * 2
    while not fits(hi):
        lo, hi = hi, hi * 2
        if hi > 65536:
            return None
    while hi - lo > 1:  # the smallest fitting node count; not every count divides the batch
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi * cluster.gpus_per_node


def config_label(rec: dict) -> str:
    """``tp=..,pp=..,dp=..,mb=..,recompute=..,zero=..[,vpp=..]`` of a configuration record."""
    v = f",vpp={rec['vpp']}" if rec.get("vpp", 1) > 1 else ""
    return (f"tp={rec['tp']},pp={rec['pp']},dp={rec['dp']},mb={rec['micro_batch']},recompute={rec['recompute']},"
            f"zero={rec['zero']}{v}")


def evaluate_fixed(m: ModelShape, cluster: Cluster, seq: int, global_batch: int, fixed: dict,
                   k: Constants = Constants()) -> dict:
    """``--fix`` with every field given: exactly that configuration (fits or not, with a reason)."""
    check_inputs(m, seq, global_batch)
    n = cluster.n_gpus
    tp, pp = fixed.get("tp", 1), fixed.get("pp", 1)
    dp = fixed.get("dp", max(1, n // (tp * pp)))
    c = Config(tp, pp, dp, fixed.get("micro_batch", 1), fixed.get("recompute", "selective"),
               fixed.get("zero", 1 if dp > 1 else 0),
               fixed.get("vpp", 1), fixed.get("sequence_parallel", True))
    return plan_record(m, c, seq, global_batch, cluster, k)
