"""Jobs of the cluster simulator: the JOBS.toml file and each job's throughput-vs-nodes curve.

A JOBS.toml file::

    [defaults]                 # optional; every job may override these
    checkpoint_s = 60          # time to write one checkpoint (blocking), seconds
    restart_s = 600            # rendezvous + load checkpoint + warm-up after a stop, seconds

    [[job]]
    name = "pretrain-70b"
    model = "llama3-70b"       # planner preset, inline "layers=..,hidden=..", or a table {layers = 80, ...}
    seq = 8192
    global_batch = 512         # sequences; kept fixed when the job is resized
    weight = 4                 # priority: the cluster maximizes sum(weight * FLOP/s)
    tokens = 2e11              # optional token budget (or hours = H: H hours at its initial size)
    min_gpus = 32              # optional: never run on fewer (the job pauses instead)
    max_gpus = 128             # optional

Jobs get whole nodes: a node is what a hardware fault takes out (its GPUs are drained
together, as in practice), so allocation, failures and repairs all count nodes.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

from hone.errors import HoneError
from hone.plan.hardware import parse_preset
from hone.plan.search import search
from hone.plan.shapes import flops_per_token, load_shape

JOB_FIELDS = {"name", "model", "seq", "global_batch", "weight", "tokens", "hours", "min_gpus", "max_gpus",
              "checkpoint_s", "restart_s", "checkpoint_interval_s"}
DEFAULT_FIELDS = {"checkpoint_s", "restart_s"}
DEFAULTS = {"checkpoint_s": 60.0, "restart_s": 600.0}


@dataclass(frozen=True)
class Job:
    name: str
    model: object  # hone.plan.shapes.ModelShape
    seq: int
    global_batch: int
    weight: float = 1.0
    tokens: Optional[float] = None  # budget; None = runs to the end of the simulation
    hours: Optional[float] = None   # budget as hours at the initial allocation (turned into tokens)
    min_gpus: int = 0
    max_gpus: Optional[int] = None
    checkpoint_s: float = 60.0
    restart_s: float = 600.0
    checkpoint_interval_s: Optional[float] = None  # None = Young/Daly from the assumed MTBF

    @property
    def flops_per_token(self) -> float:
        return flops_per_token(self.model, self.seq)


def load_jobs(path: Path) -> list[Job]:
    path = Path(path)
    if not path.exists():
        raise HoneError(f"{path}: file not found")
    try:
        cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise HoneError(f"{path}: {e}") from None
    return jobs_from_dict(cfg, str(path), path.parent)


def jobs_from_dict(cfg: dict, where: str, base: Path = Path(".")) -> list[Job]:
    extra = set(cfg) - {"job", "defaults"}
    if extra:
        raise HoneError(f"{where}: unknown table {sorted(extra)[0]!r} (expected [[job]] and optional [defaults])")
    defaults = dict(DEFAULTS)
    d = cfg.get("defaults", {})
    if not isinstance(d, dict):
        raise HoneError(f"{where}: defaults must be a table")
    for k, v in d.items():
        if k not in DEFAULT_FIELDS:
            raise HoneError(f"{where}: defaults.{k}: unknown field (fields: {', '.join(sorted(DEFAULT_FIELDS))})")
        defaults[k] = _number(v, f"{where}: defaults.{k}", minimum=0.0, strict=k == "checkpoint_s")
    raw = cfg.get("job")
    if not isinstance(raw, list) or not raw or not all(isinstance(j, dict) for j in raw):
        raise HoneError(f"{where}: no jobs: add at least one [[job]] table")
    jobs = [_job(j, i, where, base, defaults) for i, j in enumerate(raw)]
    seen = set()
    for i, j in enumerate(jobs):
        if j.name in seen:
            raise HoneError(f"{where}: job[{i}].name: duplicate job name {j.name!r}")
        seen.add(j.name)
    return jobs


def _job(j: dict, i: int, where: str, base: Path, defaults: dict) -> Job:
    at = f"{where}: job[{i}]"
    if "name" not in j:
        raise HoneError(f"{at}.name: required field missing")
    name = j["name"]
    if not isinstance(name, str) or not name.strip():
        raise HoneError(f"{at}.name: must be a non-empty string (got {name!r})")
    at = f"{where}: job[{i}] ({name})"  # the name helps find the table in a long file
    extra = set(j) - JOB_FIELDS
    if extra:
        raise HoneError(f"{at}.{sorted(extra)[0]}: unknown field (fields: {', '.join(sorted(JOB_FIELDS))})")
    for req in ("model", "seq", "global_batch"):
        if req not in j:
            raise HoneError(f"{at}.{req}: required field missing")
    if "tokens" in j and "hours" in j:
        raise HoneError(f"{at}.hours: give tokens or hours, not both")
    min_g = _int(j.get("min_gpus", 0), f"{at}.min_gpus", 0)
    max_g = _int(j["max_gpus"], f"{at}.max_gpus", 1) if "max_gpus" in j else None
    if max_g is not None and max_g < min_g:
        raise HoneError(f"{at}.max_gpus: {max_g} is below min_gpus {min_g}")
    opt = lambda k, **kw: _number(j[k], f"{at}.{k}", **kw) if k in j else None  # noqa: E731
    return Job(name=name, model=_model(j["model"], f"{at}.model", base), seq=_int(j["seq"], f"{at}.seq", 1),
               global_batch=_int(j["global_batch"], f"{at}.global_batch", 1),
               weight=_number(j.get("weight", 1.0), f"{at}.weight", minimum=0.0, strict=True),
               tokens=opt("tokens", minimum=0.0, strict=True), hours=opt("hours", minimum=0.0, strict=True),
               min_gpus=min_g, max_gpus=max_g,
               checkpoint_s=_number(j.get("checkpoint_s", defaults["checkpoint_s"]), f"{at}.checkpoint_s", minimum=0.0,
                                    strict=True),
               restart_s=_number(j.get("restart_s", defaults["restart_s"]), f"{at}.restart_s", minimum=0.0),
               checkpoint_interval_s=opt("checkpoint_interval_s", minimum=0.0, strict=True))


def _model(spec, field: str, base: Path):
    if isinstance(spec, dict):
        spec = ",".join(f"{k}={v}" for k, v in spec.items())
    if not isinstance(spec, str):
        raise HoneError(f"{field}: must be a preset name, an inline spec or a table (got {spec!r})")
    if spec.endswith(".json") and not Path(spec).is_absolute():
        spec = str(base / spec)
    try:
        return load_shape(spec)
    except HoneError as e:
        raise HoneError(f"{field}: {e}") from None


def _int(v, field: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise HoneError(f"{field}: must be an integer (got {v!r})")
    if v < minimum:
        raise HoneError(f"{field}: must be at least {minimum} (got {v})")
    return v


def _number(v, field: str, minimum: float, strict: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise HoneError(f"{field}: must be a number (got {v!r})")
    if v < minimum or (strict and v == minimum):
        raise HoneError(f"{field}: must be {'greater than' if strict else 'at least'} {minimum:g} (got {v!r})")
    return float(v)


# ---- throughput curves from the planner ---------------------------------------------------------

def node_counts(max_nodes: int) -> list[int]:
    """Node counts a job may get. Every count up to 32; above, 16 evenly spaced counts per
    doubling (a 2048-node curve would otherwise cost 2048 planner searches)."""
    out = []
    for n in range(1, max_nodes + 1):
        step = 1 if n <= 32 else 2 ** (int(math.log2(n)) - 4)
        if n % step == 0:
            out.append(n)
    return out


@lru_cache(maxsize=4096)
def best_tokens_per_s(model, seq: int, global_batch: int, gpu: str, gpus_per_node: int, nodes: int) -> float:
    """Tokens/s of the planner's fastest fitting configuration on ``nodes`` whole nodes, 0 if none."""
    cluster = parse_preset(f"{nodes}x{gpus_per_node}x{gpu}")
    res = search(model, cluster, seq, global_batch, top=1)
    return float(res.plans[0]["tokens_per_s"]) if res.plans else 0.0


def curve(job: Job, gpu: str, gpus_per_node: int, nodes: int) -> dict[int, float]:
    """{node count: tokens/s} over the counts the job may use (min/max GPUs, a fitting shape).
    Every count in it is a valid parallel shape: the planner found tp*pp*dp == its GPUs."""
    lo = max(1, math.ceil(job.min_gpus / gpus_per_node))
    hi = nodes if job.max_gpus is None else min(nodes, job.max_gpus // gpus_per_node)
    out = {}
    for n in node_counts(hi):
        if n >= lo:
            tps = best_tokens_per_s(job.model, job.seq, job.global_batch, gpu, gpus_per_node, n)
            if tps > 0:
                out[n] = tps
    return out
