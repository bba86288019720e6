"""Checkpoint intervals against failures: Young/Daly and the job's MTBF.

Pure functions shared by the trainer's checkpoint schedule, the self-healing supervisor and
the cluster simulator, so all three use one formula.
"""

from __future__ import annotations

import math


def young_daly_s(checkpoint_s: float, mtbf_s: float) -> float:
    """Young/Daly checkpoint interval: tau = sqrt(2 * C * MTBF)."""
    return math.sqrt(2.0 * max(checkpoint_s, 0.0) * mtbf_s)


def interval_steps(checkpoint_s: float, mtbf_s: float, step_s: float, total_steps: int) -> int:
    """Young/Daly's interval in whole steps, at least 1 and at most the run."""
    tau = young_daly_s(checkpoint_s, mtbf_s)
    return int(min(max(1, round(tau / max(step_s, 1e-9))), max(1, total_steps)))


def job_mtbf_s(worker_mtbf_hours: float, world: int, observed_worker_s: float = 0.0, failures: int = 0) -> float:
    """The job's MTBF: a worker's MTBF over the world size, the configured figure counted as one
    prior failure and blended with what this run observed (worker-seconds run, failures seen)."""
    per_worker = (worker_mtbf_hours * 3600.0 + observed_worker_s) / (1 + failures)
    return per_worker / max(1, world)
