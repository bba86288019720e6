"""Curate: read → filter → dedup → domain retrieval → Parquet corpus + manifest.

Public entry points: ``curate`` (the stage), ``build_demo_pool`` and ``fetch_debian_data``
(the packaged demo corpora). Submodules are separate kinds of step (read, filters, dedup,
retrieve, write) sharing one contract: a generator over ``{"id", "text", "source", "meta"}``
records, where a step keeps a document or drops it with a reason.

The names are imported on first use: ``hone data ...`` imports this package just to reach
its subcommands, and should not pay for numpy, pyarrow and pydantic before it needs them.
"""

from __future__ import annotations

import importlib

__all__ = ["curate", "build_demo_pool", "data_dir", "fetch_debian_data"]
_WHERE = {"curate": "hone.corpus.pipeline", "build_demo_pool": "hone.corpus.sources",
          "data_dir": "hone.corpus.sources", "fetch_debian_data": "hone.corpus.sources"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'hone.corpus' has no attribute {name!r}")
