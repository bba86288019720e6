"""`hone recipe check | fields`: validate a recipe and the paths it names; list every field."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import typer

from hone.cli.common import WORKDIR, load_recipe_and_workdir as _load, log as _log
from hone.recipe import describe_fields

# `recipe check` resolves every path a run would read (the pipeline: torch, the corpus readers);
# `recipe fields` needs none of that, so the pipeline is loaded by name when a check runs.
PIPELINE = "hone.pipeline"
recipe_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Check recipe files and list their fields.")


@recipe_app.command("check")
def recipe_check(recipe: Path = typer.Argument(..., help="Recipe TOML file."), workdir: Optional[Path] = WORKDIR):
    """Validate a recipe and every path it names; print what the run will do, or the error naming the bad field."""
    r, wd = _load(recipe, workdir)
    for line in importlib.import_module(PIPELINE).check_recipe(r, wd):
        _log(f"  {line}")
    _log(f"{recipe}: ok")


@recipe_app.command("fields")
def recipe_fields():
    """List every recipe field with its default and one-line doc."""
    for line in describe_fields():
        _log(line)
