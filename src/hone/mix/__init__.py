"""Mix stage: proxy sweeps over domain ratios and token budgets, the CMR and D-CPT laws
fitted to them, the chosen ratio and its schedule (``mixture.json``).

Public entry points (imported lazily: scipy and torch stay out of the CLI's start-up):
``fit_mixture``, ``load_runs``, ``predict`` (:mod:`hone.mix.laws`), ``run_sweep``
(:mod:`hone.mix.sweep`), ``load_mixture``, ``make_schedule`` (:mod:`hone.train.mixture`).
"""

from __future__ import annotations

import importlib

_WHERE = {"fit_mixture": "laws", "load_runs": "laws", "predict": "laws", "run_sweep": "sweep",
          "load_mixture": "schedule", "make_schedule": "schedule", "mixture_schedule": "schedule"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"hone.mix.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'hone.mix' has no attribute {name!r}")
