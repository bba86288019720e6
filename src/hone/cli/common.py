"""Pieces shared by the CLI modules of every stage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hone.corpus.runner import quarantine_file, summary_line
from hone.recipe import load_recipe

WORKDIR = typer.Option(None, "--workdir", help="Run directory (default: the recipe's run.workdir).")
# The curation commands' common arguments (hone data ...).
INPUTS = typer.Argument(...,
                        help="Input files or directories: .jsonl[.gz|.zst], .parquet, .arrow, .txt, HF save_to_disk "
                             "dirs.")
OUTDIR = typer.Option(..., "-o", "--output",
                      help="Output directory: part-*.parquet (reads with pandas / pyarrow / datasets); "
                           ".hone/: manifest.json, quarantine/, dropped/, work files.")
TEXT_FIELD = typer.Option("text", "--text-field", help="Name of the text field / column in the inputs.")


def log(msg: str) -> None:
    print(msg, flush=True)


def load_recipe_and_workdir(recipe: Path, workdir: Optional[Path]):
    r = load_recipe(recipe)
    return r, Path(workdir or r.run.workdir)


def finish_step(name: str, manifest: dict, out: Path) -> None:
    """Print the one-line summary; exit 1 only when nothing usable was read."""
    log(summary_line(name, manifest, out))
    t = manifest["totals"]
    if t["docs_in"] == t["quarantined"]:
        log(f"error: no usable document in the inputs (see {quarantine_file(out)})")
        raise typer.Exit(1)
