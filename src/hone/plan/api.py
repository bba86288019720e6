"""The planner's public entry point: ``make_plan`` (what `hone plan` runs) and its text form."""

from __future__ import annotations

from typing import Optional

from hone.errors import HoneError
from hone.plan.commands import launch
from hone.plan.config import Constants, parse_fix
from hone.plan.hardware import load_cluster
from hone.plan.placement import place
from hone.plan.search import (
    TRAINERS,
    evaluate_fixed,
    hone_layout_reason,
    nothing_fits_message,
    search,
    search_hone_trainer,
)
from hone.plan.shapes import FLOPS_CONVENTION, flops_per_token, load_shape
from hone.plan.trainer_profile import with_trainer

EXACT = {"tp", "pp", "micro_batch", "recompute", "zero"}
TRAINER_LINES = {
    "hone": "priced for hone train: its layouts (recompute none/full, ddp or fsdp) and memory (fp32 weights, "
            "gradients and AdamW moments; the LM head not split by tp)",
    "megatron": "priced for Megatron-LM: bf16 weights with fp32 master copy, every recompute and ZeRO stage, "
                "vocabulary-parallel head (--trainer hone: what hone train runs)",
}


def make_plan(model: str, cluster: str, *, seq: int, global_batch: int, fix: Optional[str] = None, top: int = 10,
              rank: str = "throughput", tokens: Optional[float] = None, price: float = 2.0, placement: bool = False,
              constants: Optional[dict] = None, trainer: str = "megatron") -> dict:
    """The ranked configurations of ``model`` on ``cluster`` and the best one's launch material.
    ``trainer``: "megatron" searches every configuration with Megatron-LM-like constants; "hone"
    only the layouts `hone train` runs, with its constants (what the decision stage uses)."""
    if trainer not in TRAINERS:
        raise HoneError(f"--trainer must be one of {', '.join(TRAINERS)} (got {trainer!r})")
    m, cl = load_shape(model), load_cluster(cluster)
    base = Constants.hone_trainer() if trainer == "hone" else Constants()
    k = with_trainer(base.with_(**(constants or {})), cl, m)
    fixed = parse_fix(fix) if fix else {}
    if trainer == "hone" and (why := hone_layout_reason(fixed)):
        raise HoneError(f"--fix {fix}: {why} (--trainer megatron plans it)")
    find = search_hone_trainer if trainer == "hone" else search
    if rank not in ("throughput", "cost"):
        raise HoneError(f"--rank must be throughput or cost (got {rank!r})")
    if rank == "cost" and not tokens:
        raise HoneError("--rank cost needs --tokens (the run's token budget)")
    result = {"model": m.summary(), "cluster": cl.to_json(), "trainer": trainer, "seq": seq,
              "global_batch": global_batch, "flops_per_token": flops_per_token(m, seq),
              "flops_convention": FLOPS_CONVENTION, "fixed": fixed}
    if EXACT <= fixed.keys():
        configs = [evaluate_fixed(m, cl, seq, global_batch, fixed, k)]
        result.update(mode="fixed", evaluated=1, rejected={})
    else:
        sizes = [cl.nodes]
        if rank == "cost" and cl.matrix is None and not cl.node_inter_gbps:
            sizes = sorted({n for n in (2 ** i for i in range(20)) if n < cl.nodes} | {cl.nodes})
        configs, rejected, evaluated, last = [], {}, 0, None
        for nodes in sizes:
            sub = cl if nodes == cl.nodes else cl.with_nodes(nodes)
            res = find(m, sub, seq, global_batch, k, fixed=fixed, top=None if rank == "cost" else top)
            configs += res.plans
            evaluated += res.evaluated
            for r, c in res.rejected.items():
                rejected[r] = rejected.get(r, 0) + c
            last = res
        if not configs:
            raise HoneError(nothing_fits_message(m, cl, seq, global_batch, k, last, fixed))
        result.update(mode="search", evaluated=evaluated,
                      rejected=dict(sorted(rejected.items(), key=lambda x: -x[1])[:20]))
    if tokens:
        for c in configs:
            if c.get("tokens_per_s"):
                hours = tokens / c["tokens_per_s"] / 3600
                c.update(days=round(hours / 24, 3), gpu_hours=round(hours * c["gpus"], 1),
                         cost=round(hours * c["gpus"] * price, 2))
    if rank == "cost":
        configs.sort(key=lambda c: c.get("cost") or float("inf"))
        configs = configs[:top]
    result["configs"] = configs
    best = configs[0]
    if best["fits"]:
        result["launch"] = launch(m, cl, best, seq, global_batch)
    if placement:
        result["placement"] = _placement(cl, best)
    return result


def _placement(cl, rec: dict) -> dict:
    if cl.matrix is None and not cl.node_inter_gbps:
        raise HoneError("--placement needs a cluster file with a link matrix or per-node bandwidths")
    return place(cl, rec)


def format_text(r: dict) -> str:
    m, c = r["model"], r["cluster"]
    lines = [f"model {m['name']}: {m['params'] / 1e9:.3f}B params ({m['nonembedding_params'] / 1e9:.3f}B "
             "non-embedding), "
             f"{r['flops_per_token'] / 1e9:.1f} GFLOP/token at seq {r['seq']} [{r['flops_convention']}]",
             f"cluster {c['name']}: {c['nodes']} x {c['gpus_per_node']} {c['gpu']} ({c['memory_gib']:g} GiB, "
             f"{c['peak_tflops']:g} TFLOP/s dense bf16); global batch {r['global_batch']} x {r['seq']} tokens",
             TRAINER_LINES[r.get("trainer", "megatron")]]
    if r["mode"] == "search":
        lines.append(f"{r['evaluated']} configurations evaluated")
    cost = any("cost" in x for x in r["configs"])
    head = (f"{'#':>3} {'gpus':>5} {'tp':>3} {'pp':>3} {'dp':>5} {'mb':>3} {'vpp':>3} {'recompute':>9} {'zero':>4} "
            f"{'GiB/GPU':>8} {'step s':>8} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6}")
    lines += ["", head + ("  {:>8} {:>10}".format("days", "cost") if cost else "")]
    for i, x in enumerate(r["configs"], 1):
        if x["memory_gib_per_gpu"] is None:
            lines.append(f"{i:>3} {x['gpus']:>5} {x['tp']:>3} {x['pp']:>3} {x['dp']:>5} {x['micro_batch']:>3} "
                         f"{x['vpp']:>3} "
                         f"{x['recompute']:>9} {x['zero']:>4}  invalid: {x['reason']}")
            continue
        row = (f"{i:>3} {x['gpus']:>5} {x['tp']:>3} {x['pp']:>3} {x['dp']:>5} {x['micro_batch']:>3} {x['vpp']:>3} "
               f"{x['recompute']:>9} "
               f"{x['zero']:>4} {x['memory_gib_per_gpu']:>8.1f} {x['step_time_s']:>8.3f} {x['tokens_per_s']:>11,.0f} "
               f"{x['tflops_per_gpu']:>8.1f} {x['mfu']:>6.1%}")
        if cost and "cost" in x:
            row += f"  {x['days']:>8.2f} {x['cost']:>10,.0f}"
        if not x["fits"]:
            row += f"  DOES NOT FIT: {x['reason']}"
        lines.append(row)
    best = r["configs"][0]
    if best["memory_breakdown"]:
        mb = best["memory_breakdown"]
        lines += ["",
                  f"memory of #1 per GPU ({mb['stage']} pipeline stage, {mb['inflight_microbatches']:g} micro-batches "
                  "in flight), GiB: "
                  + ", ".join(f"{k} {mb[k]:.2f}" for k in ("weights", "grads", "optimizer", "activations", "logits",
                                                           "zero3_buffers", "overhead"))
                  + f" = {best['memory_gib_per_gpu']:.2f}"]
        tb = best["time_breakdown"]
        lines.append("step of #1, s: " + ", ".join(f"{k[:-2]} {tb[k]:.4f}" for k in ("compute_s", "tp_comm_s",
                                                                                     "pp_comm_s", "bubble_s",
                                                                                     "dp_exposed_s", "optimizer_s"))
                     + f" (DP reduce {tb['dp_comm_s']:.4f} s, partly hidden; GEMM efficiency "
                       f"{tb['gemm_efficiency']:.2f})")
    if r.get("rejected"):
        lines += ["", "rejected: " + "; ".join(f"{k} ({v})" for k, v in list(r["rejected"].items())[:6])]
    if "launch" in r:
        L = r["launch"]
        lines += ["", "hone train settings: " + ", ".join(f"{k}={v}" for k, v in L["hone_train"].items())]
        lines += [f"  note: {n}" for n in L["hone_train_notes"]]
        lines += [("run: " if L["nodes"] == 1 else "torchrun (every node): ") + L["torchrun"],
                  "Megatron-LM: " + L["megatron_args"], "(Slurm script in the plan file)"]
    if "placement" in r:
        p = r["placement"]
        lines += ["",
                  f"placement: predicted communication {p['comm_time_s']:.4f} s/step vs "
                  f"{p['rank_order_comm_time_s']:.4f} s in rank order "
                  f"({p['gain']:+.1%}); rank -> GPU: "
                  f"{p['rank_to_gpu'][:16]}{' ...' if len(p['rank_to_gpu']) > 16 else ''}"]
    return "\n".join(lines)
