"""GPUs and clusters: presets like ``8xH100`` / ``4x8xA100-80GB``, TOML cluster files with per-node
and per-link bandwidths (optionally a measured N x N matrix), and calibrated JSON profiles.

Bandwidths are GB/s (1e9 bytes/s) per GPU per direction, as a ring collective sees them.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from hone.errors import HoneError


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float  # dense bf16 tensor-core peak (no 2:4 sparsity)
    memory_gib: float
    hbm_gbps: float
    nvlink_gbps: float  # per GPU per direction inside a node
    network_gbps: float  # default per-GPU share of the node's network, per direction


GPUS: dict[str, GPU] = {g.name: g for g in [
    GPU("H100", 989.0, 80, 3350, 450, 50),        # H100 SXM5; 8x400 Gb/s IB per DGX node
    GPU("H100-PCIe", 756.0, 80, 2000, 64, 25),
    GPU("H200", 989.0, 141, 4800, 450, 50),
    GPU("B200", 2250.0, 180, 8000, 900, 50),
    GPU("A100-80GB", 312.0, 80, 2039, 300, 25),   # DGX A100: 8x200 Gb/s HDR per node
    GPU("A100-40GB", 312.0, 40, 1555, 300, 25),
    GPU("L40S", 362.0, 48, 864, 32, 12.5),
    GPU("A10G", 125.0, 24, 600, 32, 12.5),        # PCIe cards: the trainer's MFU knew them before the planner
    GPU("RTX 4090", 165.0, 24, 1008, 32, 12.5),
    GPU("MI300X", 1307.0, 192, 5300, 448, 50),
    GPU("V100", 125.0, 32, 900, 150, 12.5),
    GPU("cpu", 1.0, 16, 20, 10, 1),
]}
_ALIASES = {"H100-SXM": "H100", "H100-80GB": "H100", "A100": "A100-80GB", "A100-SXM": "A100-80GB",
            "H200-SXM": "H200", "V100-32GB": "V100", "4090": "RTX 4090"}


def get_gpu(name: str) -> GPU:
    key = _ALIASES.get(name, name)
    for k, g in GPUS.items():
        if k.lower() == key.lower():
            return g
    raise HoneError(f"unknown GPU {name!r} (known: {', '.join(GPUS)})")


def gpu_for_device_name(name: str) -> Optional[GPU]:
    """The planner's entry for a device name as CUDA reports it ("NVIDIA H100 80GB HBM3"), or None.
    The one peak-FLOPs table of Hone: the planner and the trainer's MFU both read it."""
    return next((g for g in GPUS.values() if g.name != "cpu" and g.name.split("-")[0] in name), None)


@dataclass(frozen=True)
class Cluster:
    """``nodes`` x ``gpus_per_node`` GPUs. A link's bandwidth is ``matrix[i][j]`` when a measured
    matrix is given, else ``intra_gbps`` inside a node and the slower node's ``inter_gbps`` across."""

    gpu: GPU
    nodes: int
    gpus_per_node: int
    intra_gbps: float
    inter_gbps: float
    intra_latency_us: float = 5.0
    inter_latency_us: float = 12.0
    node_inter_gbps: tuple = ()  # per-node override of inter_gbps (a slow NIC, a far rack)
    matrix: Optional[tuple] = None  # N x N GB/s, rank-order GPU ids
    name: str = ""
    efficiency: Optional[float] = None  # calibrated GEMM efficiency (achieved / peak), if measured
    # Hone's own layer measured on this device at one model shape (hone.plan.trainer_profile).
    trainer: Optional[dict] = field(default=None, compare=False, hash=False, repr=False)
    _cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def n_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, gpu: int) -> int:
        return gpu // self.gpus_per_node

    def link_gbps(self, i: int, j: int) -> float:
        if self.matrix is not None:
            return self.matrix[i][j]
        ni, nj = self.node_of(i), self.node_of(j)
        if ni == nj:
            return self.intra_gbps
        if self.node_inter_gbps:
            return min(self.node_inter_gbps[ni], self.node_inter_gbps[nj])
        return self.inter_gbps

    def group_link(self, stride: int, size: int) -> tuple[float, float]:
        """(bandwidth GB/s, latency s) of the slowest link over every group of ``size`` ranks
        spaced ``stride`` apart under rank-order placement (Megatron's tp-dp-pp order)."""
        key = (stride, size)
        if key not in self._cache:
            self._cache[key] = self._group_link(stride, size)
        return self._cache[key]

    def _group_link(self, stride: int, size: int) -> tuple[float, float]:
        if size <= 1:
            return float("inf"), 0.0
        span = stride * size
        crosses = self.nodes > 1 and (span > self.gpus_per_node or self.gpus_per_node % span != 0)
        lat = (self.inter_latency_us if crosses else self.intra_latency_us) * 1e-6
        if self.matrix is None and not self.node_inter_gbps:
            return (self.inter_gbps if crosses else self.intra_gbps), lat
        return self._scan_groups(stride, size), lat

    def _scan_groups(self, stride: int, size: int) -> float:
        """Slowest ring link over all groups (exact, for measured or per-node bandwidths)."""
        n, span, worst = self.n_gpus, stride * size, float("inf")
        for base in range(0, n, span):
            for off in range(stride):
                members = [base + off + k * stride for k in range(size)]
                for a, b in zip(members, members[1:] + members[:1]):
                    worst = min(worst, self.link_gbps(a, b))
        return worst

    def describe(self) -> str:
        return (f"{self.nodes}x{self.gpus_per_node}x{self.gpu.name} ({self.n_gpus} GPUs, {self.gpu.memory_gib:g} GiB, "
                f"{self.gpu.peak_tflops:g} TFLOP/s bf16, links {self.intra_gbps:g}/{self.inter_gbps:g} GB/s)")

    def with_nodes(self, nodes: int) -> "Cluster":
        if self.matrix is not None or self.node_inter_gbps:
            raise HoneError("cannot resize a cluster with a measured link matrix")
        return replace(self, nodes=nodes, _cache={})

    def to_json(self) -> dict:
        return {"name": self.name, "gpu": self.gpu.name, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
                "peak_tflops": self.gpu.peak_tflops, "memory_gib": self.gpu.memory_gib,
                "intra_gbps": self.intra_gbps, "inter_gbps": self.inter_gbps,
                "measured_matrix": self.matrix is not None, "trainer_calibrated": self.trainer is not None}


_PRESET = re.compile(r"^(?:(\d+)x)?(\d+)x([A-Za-z0-9.\-]+)$")


def parse_preset(spec: str) -> Cluster:
    """``8xH100`` (one node of 8) or ``4x8xA100-80GB`` (4 nodes x 8 GPUs)."""
    m = _PRESET.match(spec)
    if not m:
        raise HoneError(f"cluster {spec!r}: expected GPUSxTYPE or NODESxGPUSxTYPE, e.g. 8xH100 or 4x8xA100-80GB, "
                        "or a .toml / .json file")
    nodes, gpn = int(m.group(1) or 1), int(m.group(2))
    if nodes < 1 or gpn < 1:
        raise HoneError(f"cluster {spec!r}: node and GPU counts must be at least 1")
    gpu = get_gpu(m.group(3))
    return Cluster(gpu, nodes, gpn, gpu.nvlink_gbps, gpu.network_gbps, name=spec)


def load_cluster(spec: str) -> Cluster:
    p = Path(spec)
    if p.suffix in (".toml", ".json"):
        if not p.exists():
            raise HoneError(f"{p}: file not found")
        return load_toml(p) if p.suffix == ".toml" else load_profile(p)
    return parse_preset(spec)


def load_toml(path: Path) -> Cluster:
    """A cluster file::

        gpu = "H100"              # or a [gpu] table: name, peak_tflops, memory_gib, hbm_gbps
        nodes = 4
        gpus_per_node = 8
        intra_gbps = 450          # NVLink, per GPU per direction
        inter_gbps = 50           # network share per GPU
        node_inter_gbps = [50, 50, 25, 50]   # optional, per node
        matrix = [[...], ...]     # optional measured N x N GB/s (or matrix_file = "links.csv")
    """
    try:
        cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise HoneError(f"{path}: {e}") from None
    return cluster_from_dict(cfg, str(path), path.parent)


def cluster_from_dict(cfg: dict, where: str, base: Path = Path(".")) -> Cluster:
    known = {"gpu", "nodes", "gpus_per_node", "intra_gbps", "inter_gbps", "node_inter_gbps", "matrix", "matrix_file",
             "intra_latency_us", "inter_latency_us", "name", "efficiency", "measured", "trainer"}
    extra = set(cfg) - known
    if extra:
        raise HoneError(f"{where}: unknown field {sorted(extra)[0]!r} (fields: {', '.join(sorted(known))})")
    g = cfg.get("gpu", "H100")
    gpu = _gpu_from(g, where)
    try:
        nodes, gpn = int(cfg.get("nodes", 1)), int(cfg["gpus_per_node"])
    except KeyError:
        raise HoneError(f"{where}: gpus_per_node is required") from None
    if nodes < 1 or gpn < 1:
        raise HoneError(f"{where}: nodes and gpus_per_node must be at least 1")
    matrix = cfg.get("matrix")
    if "matrix_file" in cfg:
        matrix = _read_matrix(base / cfg["matrix_file"])
    n = nodes * gpn
    if matrix is not None:
        if len(matrix) != n or any(len(r) != n for r in matrix):
            raise HoneError(f"{where}: matrix must be {n} x {n} (nodes * gpus_per_node)")
        matrix = tuple(tuple(float(x) if i != j else float("inf") for j, x in enumerate(r)) for i,
                       r in enumerate(matrix))
    node_bw = tuple(float(x) for x in cfg.get("node_inter_gbps", ()))
    if node_bw and len(node_bw) != nodes:
        raise HoneError(f"{where}: node_inter_gbps has {len(node_bw)} entries for {nodes} nodes")
    return Cluster(gpu, nodes, gpn, float(cfg.get("intra_gbps", gpu.nvlink_gbps)),
                   float(cfg.get("inter_gbps", gpu.network_gbps)),
                   float(cfg.get("intra_latency_us", 5.0)), float(cfg.get("inter_latency_us", 12.0)), node_bw, matrix,
                   cfg.get("name", where), cfg.get("efficiency"), trainer=cfg.get("trainer"))


def _gpu_from(g, where: str) -> GPU:
    if isinstance(g, str):
        return get_gpu(g)
    if isinstance(g, dict):
        base = get_gpu(g["name"]) if g.get("name") in GPUS or g.get("name") in _ALIASES else None
        try:
            return GPU(g.get("name", "custom"),
                       float(g.get("peak_tflops", base.peak_tflops if base else 0) or 0) or _need(where, "peak_tflops"),
                       float(g.get("memory_gib", base.memory_gib if base else 0) or 0) or _need(where, "memory_gib"),
                       float(g.get("hbm_gbps", base.hbm_gbps if base else 1000)),
                       float(g.get("nvlink_gbps", base.nvlink_gbps if base else 100)),
                       float(g.get("network_gbps", base.network_gbps if base else 25)))
        except (TypeError, ValueError) as e:
            raise HoneError(f"{where}: bad gpu table ({e})") from None
    raise HoneError(f"{where}: gpu must be a name or a table")


def _need(where: str, key: str):
    raise HoneError(f"{where}: gpu.{key} is required for a custom GPU")


def _read_matrix(path: Path) -> list:
    try:
        rows = [r for r in path.read_text(encoding="utf-8").splitlines() if r.strip() and not r.startswith("#")]
        return [[float(x) for x in re.split(r"[,\s]+", r.strip())] for r in rows]
    except (OSError, ValueError) as e:
        raise HoneError(f"{path}: cannot read link matrix ({e})") from None


def load_profile(path: Path) -> Cluster:
    """A hardware profile written by ``hone plan calibrate`` (its ``cluster`` table)."""
    try:
        prof = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise HoneError(f"{path}: cannot read hardware profile ({e})") from None
    if "cluster" not in prof:
        raise HoneError(f"{path}: not a hardware profile (no 'cluster' table; write one with `hone plan calibrate`)")
    return cluster_from_dict(prof["cluster"], str(path), path.parent)
