"""`hone data ...`: the data commands (pool, curate, and the curation steps one by one)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from pydantic import ValidationError

from hone.cli.common import (
    INPUTS,
    OUTDIR,
    TEXT_FIELD,
    WORKDIR,
    finish_step,
    load_recipe_and_workdir as _load,
    log as _log,
)
from hone.cli.select import register as register_select
from hone.corpus.build_config import load_build, run_build
from hone.corpus.executor import get_executor
from hone.corpus.read import load_examples
from hone.corpus.steps.dedup import dedup_step
from hone.corpus.steps.retrieve import retrieve_step
from hone.errors import HoneError
from hone.pipeline import stage_curate, stage_pool, stage_sources
from hone.recipe import DedupStep, RetrieveStep, format_error
from hone.train.workdir import prepare_workdir

data_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Build and curate the data pool.")


@data_app.command("pool")
def data_pool(recipe: Path = typer.Argument(..., help="Recipe TOML file."), workdir: Optional[Path] = WORKDIR):
    """Build the mixed pool and held-out sets from the packaged corpora (data.packaged)."""
    r, wd = _load(recipe, workdir)
    prepare_workdir(r, wd, False, _log)
    inputs, sets = stage_pool(r, wd, _log)
    _log(f"pool: {', '.join(map(str, inputs)) or 'none'}; eval sets: {', '.join(map(str, sets.paths.values()))}")


@data_app.command("curate")
def data_curate(recipe: Path = typer.Argument(..., help="Recipe TOML file."), workdir: Optional[Path] = WORKDIR):
    """Filter, deduplicate and find the domain documents in the pool (corpus/), and curate each data source
    (sources/NAME/, heldout/NAME.jsonl)."""
    r, wd = _load(recipe, workdir)
    prepare_workdir(r, wd, False, _log)
    inputs, sets = stage_pool(r, wd, _log)
    stage_curate(r, wd, inputs, _log)
    stage_sources(r, wd, sets, _log)


# --- the curation steps one by one ---------------------------------------------------------

EXECUTOR = typer.Option("local", "--executor", help="Where shard tasks run: local (processes) or ray.")
WORKERS = typer.Option(None, "--workers", help="Worker processes (default: all cores).")


@data_app.command("dedup")
def data_dedup(inputs: List[Path] = INPUTS, output: Path = OUTDIR,
               threshold: float = typer.Option(0.8, "--threshold",
                                               help="Shingle Jaccard at or above which docs are duplicates."),
               ngram: int = typer.Option(5, "--ngram", help="Shingle length in words (or bytes with --unit char)."),
               num_perm: int = typer.Option(128, "--num-perm", help="MinHash permutations."),
               unit: str = typer.Option("word", "--unit", help="Shingles of words or chars (bytes)."),
               bands: Optional[int] = typer.Option(None, "--bands",
                                                   help="LSH bands (with --rows; default: from --threshold)."),
               rows: Optional[int] = typer.Option(None, "--rows", help="LSH rows per band (with --bands)."),
               cluster_column: bool = typer.Option(False, "--cluster-column", help="Add a dup_cluster column."),
               mark_only: bool = typer.Option(False, "--mark-only", help="Keep every document, only add dup_cluster."),
               write_dropped: bool = typer.Option(False, "--write-dropped",
                                                  help="Write removed docs to .hone/dropped/dropped.jsonl."),
               text_field: str = TEXT_FIELD, executor: str = EXECUTOR, workers: Optional[int] = WORKERS):
    """Remove near-duplicates: MinHash LSH, candidates verified on true shingle Jaccard, one survivor per cluster."""
    step = _validated(DedupStep, type="dedup", threshold=threshold, ngram=ngram, num_perm=num_perm, unit=unit,
                      bands=bands, rows=rows, cluster_column=cluster_column, mark_only=mark_only,
                      write_dropped=write_dropped)
    params = step.model_dump()
    params.pop("type")
    m = dedup_step(inputs, output, text_field=text_field, executor=get_executor(executor, workers), **params)
    finish_step("dedup", m, output)


@data_app.command("retrieve")
def data_retrieve(inputs: List[Path] = INPUTS, output: Path = OUTDIR,
                  query: Optional[List[str]] = typer.Option(None, "--query",
                                                            help="Seed keywords or a question (repeatable)."),
                  examples: Optional[Path] = typer.Option(None, "--examples",
                                                          help="Example documents (.txt: one per paragraph; or "
                                                               "jsonl/parquet)."),
                  top_k: int = typer.Option(1000, "--top-k", help="Documents to retrieve."),
                  expand: str = typer.Option("prf", "--expand",
                                             help="Query expansion: none, prf (pseudo-relevance feedback) or llm "
                                                  "(HONE_LLM_URL)."),
                  name: str = typer.Option("domain", "--name", help="Domain label of the retrieved documents."),
                  keep_rest: bool = typer.Option(False, "--keep-rest",
                                                 help="Keep the other documents as domain 'general'."),
                  text_field: str = TEXT_FIELD):
    """Find the domain: BM25 over the inputs from seed queries or example documents, with query expansion."""
    _validated(RetrieveStep, type="retrieve", query=query or [], examples=str(examples) if examples else None,
               top_k=top_k, expand=expand, name=name, keep_rest=keep_rest)
    ex = load_examples(examples, text_field) if examples else []
    m = retrieve_step(inputs, output, text_field=text_field, query=query or [], examples=ex, top_k=top_k,
                      expand=expand, name=name, keep_rest=keep_rest)
    finish_step("retrieve", m, output)


@data_app.command("build")
def data_build(recipe: Path = typer.Argument(..., help="Build recipe TOML: [build] inputs/output and [[steps]].")):
    """Run a sequence of curation steps from a TOML recipe (filter, dedup, retrieve, dsir, rate, select).

    OUTPUT/part-*.parquet holds the last step's documents; each step's output is OUTPUT/.hone/steps/NN-type/."""
    r = load_build(recipe)
    m = run_build(r, log=_log)
    finish_step("build", m, Path(r.build.output))


def _validated(model, **fields):
    """Build a step model from CLI options; a bad value is one line naming the option."""

    try:
        return model(**fields)
    except ValidationError as e:
        raise HoneError(format_error("option", e).replace(f"option: {model.__name__}.", "option: ")) from None


# The selection commands (dsir, rate, select).
register_select(data_app)
