"""Pieces shared by the CLI modules of every stage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hone.recipe import load_recipe

WORKDIR = typer.Option(None, "--workdir", help="Run directory (default: the recipe's run.workdir).")


def log(msg: str) -> None:
    print(msg, flush=True)


def load_recipe_and_workdir(recipe: Path, workdir: Optional[Path]):
    r = load_recipe(recipe)
    return r, Path(workdir or r.run.workdir)
