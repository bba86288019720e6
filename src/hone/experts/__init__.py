"""Domain experts (Branch-Train-Merge): branch a seed per domain, train each expert as an
independent job, then merge them by parameter averaging or ensemble them by domain posterior.

    hone branch recipes/tiny-experts.toml            # experts/NAME/ per [[experts.domain]]
    hone merge experts/bio/final experts/code/final -o merged --weights 2,1
    hone merge experts/*/final -o ens --method ensemble && hone eval ens --data bio=bio.jsonl
"""

from __future__ import annotations

import importlib

# Public entry points, imported on first use so `hone --help` does not load torch.
_EXPORTS = {"EnsembleLM": "ensemble", "load_ensemble": "ensemble", "load_model": "ensemble",
            "average": "merge", "ensemble": "merge", "run_branch": "branch"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hone.experts' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hone.experts.{_EXPORTS[name]}"), name)
