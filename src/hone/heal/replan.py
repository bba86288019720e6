"""The supervisor's re-planning: which world sizes the job can continue on, with what
parallel plan, and how fast, from :mod:`hone.plan`.

A shrink or grow changes the data-parallel degree at a fixed global batch, so each rank
holds more (or fewer) sequences per step. The planner's memory model says whether that
still fits the device, and if not, which micro-batch (gradient accumulation) makes it fit;
its timing model says how the step time changes (compute per rank, the data-parallel
collectives over the new ring, the optimizer). The supervisor anchors that model on what it
measured: the step time at an unmeasured world size is the measured time at the nearest
measured size times the planner's ratio between the two. Without a model shape (the
workers have not written ``heal/model.json`` yet) it falls back to data-parallel scaling
(time ~ 1 / world), and says so in the decision's ``plan``.

The hardware is ``heal.hardware``: ``auto`` (the workers' device: the planner's entry for the
GPU, or its ``cpu`` entry), a preset such as ``8xH100``, a cluster TOML, or a profile from
``hone plan calibrate``.
"""

from __future__ import annotations

import dataclasses

from hone.errors import HoneError
from hone.plan.config import Config, Constants
from hone.plan.hardware import GPUS, Cluster, gpu_for_device_name, load_cluster
from hone.plan.layout import fixed_fields
from hone.plan.search import plan_record
from hone.plan.shapes import shape_from_dict
from hone.train.run import plan_from_recipe


def hardware_for(spec: str, info: dict | None, devices: int) -> Cluster:
    """One node of ``devices`` devices: the recipe's ``heal.hardware`` or, for ``auto``, the device
    the workers reported (a GPU the planner knows by name, else its generic ``cpu`` entry)."""
    if spec != "auto":
        cl = load_cluster(spec)
        if cl.n_gpus < devices:
            raise HoneError(f"heal.hardware {spec!r} has {cl.n_gpus} devices, fewer than the {devices} workers")
        return cl
    gpu = GPUS["cpu"]
    if info and info.get("device") == "cuda":
        name = info.get("device_name", "")
        gpu = gpu_for_device_name(name) or GPUS["H100"]
    return Cluster(gpu, 1, devices, gpu.nvlink_gbps, gpu.network_gbps, name=f"{devices}x{gpu.name} (auto)")


def _subset(cl: Cluster, world: int) -> Cluster:
    """The first ``world`` devices of ``cl`` (rank-order placement), as a cluster of their own."""
    if cl.matrix is not None:
        rows = tuple(tuple(r[:world]) for r in cl.matrix[:world])
        return dataclasses.replace(cl, nodes=1, gpus_per_node=world, matrix=rows, node_inter_gbps=(), _cache={})
    nodes = -(-world // cl.gpus_per_node)
    if world % cl.gpus_per_node == 0 or nodes == 1:
        per = cl.gpus_per_node if world % cl.gpus_per_node == 0 else world
        return dataclasses.replace(cl, nodes=nodes, gpus_per_node=per,
                                   node_inter_gbps=cl.node_inter_gbps[:nodes] if cl.node_inter_gbps else (), _cache={})
    # A partial last node: model it as whole nodes of equal share (the slow inter-node links dominate anyway).
    return dataclasses.replace(cl, nodes=world, gpus_per_node=1, node_inter_gbps=(), _cache={})


class Replanner:
    """Valid world sizes, their plans and modeled step times for one training recipe."""

    def __init__(self, train, hardware: str, info: dict | None, devices: int):
        self.t = train
        self.info = info
        self.shape = shape_from_dict(info) if info else None
        self.cluster = hardware_for(hardware, info, devices)
        self.k = Constants()
        self._plans: dict[int, dict] = {}

    def valid_worlds(self, limit: int) -> list[int]:
        """World sizes up to ``limit``, largest first, whose parallel plan is valid (tp divides
        the world and the model's heads, kv heads and FFN; dp divides the global batch) and, with
        a model shape, fits the device's memory with some micro-batch."""
        return [w for w in range(limit, 0, -1) if self.plan(w)["fits"]]

    def plan(self, world: int) -> dict:
        if world not in self._plans:
            self._plans[world] = self._plan(world)
        return self._plans[world]

    def _plan(self, world: int) -> dict:
        t = self.t
        width = t.tp * t.pp
        base = {"world": world, "tp": t.tp, "dp": world // width if world % width == 0 else None,
                "global_batch": t.batch_size}
        try:
            p = plan_from_recipe(t, world)
            if self.shape is not None:
                p.validate(world, heads=self.shape.heads, kv_heads=self.shape.kv_heads, ffn=self.shape.ffn,
                           batch_size=t.batch_size, layers=self.shape.layers, micro_batch=t.micro_batch)
            elif t.batch_size % p.dp:
                raise HoneError(f"train.batch_size ({t.batch_size}) is not divisible by dp ({p.dp})")
        except HoneError as e:
            return {**base, "fits": False, "reason": str(e)}
        rows = t.batch_size // p.dp
        base["rows_per_rank"] = rows
        # The recipe's micro-batch where it divides the rank's rows, else the whole share.
        wanted = t.micro_batch if t.micro_batch and rows % t.micro_batch == 0 else rows
        if self.shape is None:
            return {**base, "micro_batch": wanted, "fits": True,
                    "source": "data-parallel scaling (no model shape from the workers yet)"}
        # That micro-batch if it fits the device, else the largest divisor of the rank's rows that does.
        candidates = [wanted] + [b for b in range(min(wanted, rows) - 1, 0, -1) if rows % b == 0]
        cluster = _subset(self.cluster, world)
        fixed = fixed_fields(p)
        rec = None
        for b in candidates:
            c = Config(**fixed, micro_batch=b)
            rec = plan_record(self.shape, c, t.seq_len, t.batch_size, cluster, self.k)
            if rec["fits"]:
                break
        out = {**base, "micro_batch": rec["micro_batch"], "fits": rec["fits"],
               "modeled_step_s": rec["step_time_s"], "memory_gib": rec["memory_gib_per_gpu"],
               "device_memory_gib": cluster.gpu.memory_gib, "source": f"hone.plan on {self.cluster.name}"}
        if not rec["fits"]:
            out["reason"] = rec.get("reason", "does not fit")
        return out

    def modeled(self, worlds) -> dict[int, float]:
        """The planner's step time for each of ``worlds`` that has a plan with a timing."""
        out = {}
        for w in worlds:
            p = self.plan(w)
            if p["fits"] and p.get("modeled_step_s"):
                out[w] = p["modeled_step_s"]
        return out

    def micro_batch_override(self, world: int) -> int | None:
        """The micro-batch the workers must use on ``world`` when the plan changed it."""
        p = self.plan(world)
        rows = p.get("rows_per_rank")
        if not p["fits"] or rows is None:
            return None
        if p["micro_batch"] == (self.t.micro_batch or rows):
            return None
        return p["micro_batch"]
