"""Failures for the cluster simulator: generated at a per-GPU MTBF (Llama 3 by default) or read
from a trace file; each is transient (restart in place) or hardware (the node is down until repaired).

Llama 3 405B (Dubey et al. 2024): 419 unexpected interruptions in 54 days on 16,384 H100s,
one every ~3.1 h; ~78% attributed to confirmed or suspected hardware (faulty GPU 30.1%, HBM3
17.2%, network 8.4%, ...), the rest software, NCCL timeouts and the like, which a restart fixes.

A trace is CSV (with a header) or JSON lines, one failure per row::

    time_h,node,kind,repair_h          # or gpu instead of node; kind and repair_h optional
    12.5,3,hardware,6.0
    40.0,7,transient,
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hone.errors import HoneError

LLAMA3_INTERRUPTIONS, LLAMA3_DAYS, LLAMA3_GPUS = 419, 54, 16384
LLAMA3_CLUSTER_MTBF_H = LLAMA3_DAYS * 24 / LLAMA3_INTERRUPTIONS  # ~3.09 h
LLAMA3_GPU_MTBF_H = LLAMA3_CLUSTER_MTBF_H * LLAMA3_GPUS  # ~50,676 h: cluster MTBF = per-GPU MTBF / GPUs
LLAMA3_HARDWARE_FRACTION = 0.78
DEFAULT_REPAIR = "lognormal:4,1"  # hours: median 4 h, sigma 1 (mean ~6.6 h); an assumption, not from Llama 3


@dataclass(frozen=True)
class FailureEvent:
    time_s: float
    node: int
    kind: str  # "hardware" (node down for repair_s) or "transient" (restart in place)
    repair_s: float
    gpu: Optional[int] = None

    def to_json(self) -> dict:
        return {"time_h": round(self.time_s / 3600, 6), "node": self.node, "gpu": self.gpu, "kind": self.kind,
                "repair_h": round(self.repair_s / 3600, 6)}


def parse_mtbf(spec: str) -> float:
    """Per-GPU MTBF in hours: a number, or ``llama3`` (the calibrated default)."""
    if str(spec).strip().lower() == "llama3":
        return LLAMA3_GPU_MTBF_H
    try:
        v = float(spec)
    except ValueError:
        raise HoneError(f"--mtbf {spec!r}: expected hours per GPU (a number) or 'llama3'") from None
    if not v > 0 or not math.isfinite(v):
        raise HoneError(f"--mtbf must be a positive number of hours (got {spec!r})")
    return v


class RepairTime:
    """``const:H``, ``exp:MEAN_H`` or ``lognormal:MEDIAN_H,SIGMA`` (hours)."""

    def __init__(self, spec: str):
        self.spec = spec
        kind, _, args = spec.partition(":")
        try:
            nums = [float(x) for x in args.split(",")] if args else []
        except ValueError:
            nums = None
        shapes = {"const": 1, "exp": 1, "lognormal": 2}
        if kind not in shapes or nums is None or len(nums) != shapes[kind] or any(x < 0 for x in nums):
            raise HoneError(f"--repair {spec!r}: expected const:H, exp:MEAN_H or lognormal:MEDIAN_H,SIGMA "
                            "(hours, non-negative)")
        self.kind, self.args = kind, nums

    def mean_h(self) -> float:
        if self.kind == "lognormal":
            return self.args[0] * math.exp(self.args[1] ** 2 / 2)
        return self.args[0]

    def draw_s(self, rng: random.Random) -> float:
        if self.kind == "const":
            return self.args[0] * 3600
        if self.kind == "exp":
            return rng.expovariate(1 / self.args[0]) * 3600 if self.args[0] > 0 else 0.0
        return rng.lognormvariate(math.log(max(self.args[0], 1e-9)), self.args[1]) * 3600


def generate(n_gpus: int, gpus_per_node: int, days: float, gpu_mtbf_h: float, seed: int, repair: RepairTime,
             hardware_fraction: float = LLAMA3_HARDWARE_FRACTION) -> list[FailureEvent]:
    """Poisson failures at n_gpus / gpu_mtbf_h per hour over the whole cluster, each on a uniform
    GPU. The list does not depend on the policy (same failures for every policy of a seed); a
    failure that lands on a node already down is dropped by the simulator."""
    rng = random.Random(seed)
    rate = n_gpus / (gpu_mtbf_h * 3600)
    t, end, out = 0.0, days * 86400, []
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return out
        gpu = rng.randrange(n_gpus)
        hw = rng.random() < hardware_fraction
        rep = repair.draw_s(rng) if hw else 0.0
        out.append(FailureEvent(t, gpu // gpus_per_node, "hardware" if hw else "transient", rep, gpu))


def load_trace(path: Path, n_gpus: int, gpus_per_node: int, days: float, repair: RepairTime,
               seed: int) -> list[FailureEvent]:
    """Failures from a CSV / JSON-lines trace; a row without repair_h draws one (seeded)."""
    path = Path(path)
    if not path.exists():
        raise HoneError(f"{path}: file not found")
    rows = _read_rows(path)
    rng = random.Random(seed)
    out = []
    for line, row in rows:
        f = _failure(row, f"{path}:{line}", n_gpus, gpus_per_node, repair, rng)
        if f.time_s < days * 86400:
            out.append(f)
    out.sort(key=lambda f: f.time_s)
    return out


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HoneError(f"{path}: cannot read trace ({e})") from None
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for i, ln in enumerate(text.splitlines(), 1):
            if not ln.strip():
                continue
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as e:
                raise HoneError(f"{path}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise HoneError(f"{path}:{i}: expected a JSON object per line")
            rows.append((i, obj))
        return rows
    kept = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip() and not ln.lstrip().startswith("#")]
    reader = csv.DictReader(ln for _, ln in kept)
    if not reader.fieldnames:
        return []
    # reader.line_num counts the kept lines read so far: map it back to the file's line number.
    return [(kept[reader.line_num - 1][0],
             {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items() if k})
            for r in reader]


TRACE_FIELDS = {"time_h", "time_s", "node", "gpu", "kind", "repair_h"}


def _failure(row: dict, at: str, n_gpus: int, gpn: int, repair: RepairTime, rng: random.Random) -> FailureEvent:
    extra = set(row) - TRACE_FIELDS
    if extra:
        raise HoneError(f"{at}: {sorted(extra)[0]}: unknown field (fields: {', '.join(sorted(TRACE_FIELDS))})")
    if "time_h" in row and row["time_h"] not in ("", None):
        t = _num(row["time_h"], at, "time_h") * 3600
    elif "time_s" in row and row["time_s"] not in ("", None):
        t = _num(row["time_s"], at, "time_s")
    else:
        raise HoneError(f"{at}: time_h: required (hours since the start; or time_s)")
    gpu = node = None
    if row.get("gpu") not in ("", None):
        gpu = int(_num(row["gpu"], at, "gpu", integer=True))
        if gpu >= n_gpus:
            raise HoneError(f"{at}: gpu: {gpu} is not below the cluster's {n_gpus} GPUs")
        node = gpu // gpn
    elif row.get("node") not in ("", None):
        node = int(_num(row["node"], at, "node", integer=True))
        if node >= n_gpus // gpn:
            raise HoneError(f"{at}: node: {node} is not below the cluster's {n_gpus // gpn} nodes")
    else:
        raise HoneError(f"{at}: node: required (or gpu)")
    kind = row.get("kind") or "hardware"
    if kind not in ("hardware", "transient"):
        raise HoneError(f"{at}: kind: must be hardware or transient (got {kind!r})")
    if kind == "transient":
        rep = 0.0
    elif row.get("repair_h") not in ("", None):
        rep = _num(row["repair_h"], at, "repair_h") * 3600
    else:
        rep = repair.draw_s(rng)
    return FailureEvent(t, node, kind, rep, gpu)


def _num(v, at: str, field: str, integer: bool = False) -> float:
    try:
        x = float(v) if not isinstance(v, bool) else None
    except (TypeError, ValueError):
        x = None
    if x is None or not math.isfinite(x) or x < 0 or (integer and x != int(x)):
        what = "a non-negative integer" if integer else "a non-negative number"
        raise HoneError(f"{at}: {field}: must be {what} (got {v!r})")
    return x


def estimated_gpu_mtbf_h(failures: list[FailureEvent], n_gpus: int, days: float) -> float:
    """Per-GPU MTBF a trace implies (GPU-hours per failure); inf for an empty trace."""
    return n_gpus * days * 24 / len(failures) if failures else math.inf
