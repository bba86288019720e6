"""Mix stage: proxy sweeps over domain ratios and token budgets, the CMR and D-CPT laws
fitted to them, the chosen ratio and its schedule (``mixture.json``)."""

from hone.mix.laws import fit_mixture, load_runs, predict
from hone.mix.schedule import load_mixture, mixture_schedule

__all__ = ["fit_mixture", "load_runs", "predict", "load_mixture", "mixture_schedule"]
