"""`hone data ...`: the data commands (pool, curate, and the curation steps one by one)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hone.cli_common import WORKDIR, load_recipe_and_workdir as _load, log as _log

data_app = typer.Typer(no_args_is_help=True, help="Build and curate the data pool.")


@data_app.command("pool")
def data_pool(recipe: Path = typer.Argument(..., help="Recipe TOML file."), workdir: Optional[Path] = WORKDIR):
    """Build the mixed pool and held-out sets from the packaged corpora (data.packaged)."""
    from hone.pipeline import prepare_workdir, stage_pool

    r, wd = _load(recipe, workdir)
    prepare_workdir(r, wd, False, _log)
    inputs, sets = stage_pool(r, wd, _log)
    _log(f"pool: {', '.join(map(str, inputs))}; eval sets: {', '.join(map(str, sets.values()))}")


@data_app.command("curate")
def data_curate(recipe: Path = typer.Argument(..., help="Recipe TOML file."), workdir: Optional[Path] = WORKDIR):
    """Filter, deduplicate and find the domain documents; writes corpus/ and its manifest."""
    from hone.pipeline import prepare_workdir, stage_curate, stage_pool

    r, wd = _load(recipe, workdir)
    prepare_workdir(r, wd, False, _log)
    inputs, _ = stage_pool(r, wd, _log)
    stage_curate(r, wd, inputs, _log)
