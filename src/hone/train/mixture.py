"""The mixture schedule: a constant domain ratio, optionally raised over the last part of
training (domain upsampling, Blakeney et al. 2024), as stored in ``mixture.json``::

    "schedule": {"ratio": 0.42, "upsample": {"fraction": 0.1, "ratio": 0.8}}

``upsample`` is null for a constant ratio. The trainer's loader turns it into phases of
steps (:func:`hone.train.data.schedule_phases`) once the run's step count is known.
"""

from __future__ import annotations

from pathlib import Path

from hone.errors import HoneError
from hone.rundir import read_json


def make_schedule(ratio: float, upsample_fraction: float = 0.0, upsample_ratio: float | None = None) -> dict:
    if not 0.0 <= ratio <= 1.0:
        raise HoneError(f"schedule ratio {ratio} is outside [0, 1]")
    if not upsample_fraction:
        return {"ratio": ratio, "upsample": None}
    if not 0.0 < upsample_fraction <= 1.0:
        raise HoneError(f"--upsample-fraction {upsample_fraction}: must be in (0, 1]")
    up = min(1.0, 2 * ratio) if upsample_ratio is None else upsample_ratio
    if not 0.0 <= up <= 1.0:
        raise HoneError(f"--upsample-ratio {up}: must be in [0, 1]")
    return {"ratio": ratio, "upsample": {"fraction": upsample_fraction, "ratio": up}}


def load_mixture(path: Path) -> dict:
    """A mixture.json, checked enough to train from."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("schedule"), dict):
        raise HoneError(f"{path}: not a mixture file (no 'schedule'; write one with hone mix fit)")
    mixture_schedule(data, str(path))
    return data


def mixture_schedule(data: dict, source: str = "mixture") -> dict:
    """The validated schedule of a mixture file's content."""
    s = data["schedule"]
    ratio = s.get("ratio")
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise HoneError(f"{source}: schedule.ratio must be a number in [0, 1] (got {ratio!r})")
    up = s.get("upsample")
    if up is not None:
        f, r = up.get("fraction") if isinstance(up, dict) else None, up.get("ratio") if isinstance(up, dict) else None
        if not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise HoneError(f"{source}: schedule.upsample.fraction must be in (0, 1] (got {f!r})")
        if not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise HoneError(f"{source}: schedule.upsample.ratio must be in [0, 1] (got {r!r})")
    return s
