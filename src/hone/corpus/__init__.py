"""Curate: read → filter → dedup → domain retrieval → Parquet corpus + manifest.

Public entry points: ``curate`` (the stage), ``build_demo_pool`` and ``fetch_debian_data``
(the packaged demo corpora). Submodules are separate kinds of step (read, filters, dedup,
retrieve, write) sharing one contract: a generator over ``{"id", "text", "source", "meta"}``
records, where a step keeps a document or drops it with a reason.
"""

from hone.corpus.pipeline import curate
from hone.corpus.sources import build_demo_pool, data_dir, fetch_debian_data

__all__ = ["curate", "build_demo_pool", "data_dir", "fetch_debian_data"]
