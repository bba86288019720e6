"""Curate: read → filter → dedup → domain retrieval → Parquet corpus + manifest.

Entry points live in their submodules: ``hone.corpus.pipeline.curate`` (the stage) and
``hone.corpus.sources`` (``build_demo_pool``, ``data_dir``, ``fetch_debian_data``: the
packaged demo corpora). Submodules are separate kinds of step (read, filters, dedup,
retrieve, write) sharing one contract: a generator over ``{"id", "text", "source", "meta"}``
records, where a step keeps a document or drops it with a reason (``runner``: the one
keep/drop loop and step manifest).

The package imports nothing itself: ``hone data ...`` imports it just to reach its
subcommands, and should not pay for numpy, pyarrow and pydantic before it needs them.
"""
