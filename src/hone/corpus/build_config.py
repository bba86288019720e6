"""The ``hone data build`` recipe: where to read and write, then a list of ``[[steps]]``.

    [build]
    inputs = ["data/web/*.jsonl.zst", "data/papers.parquet"]
    output = "runs/corpus"
    text_field = "text"
    executor = "local"          # or "ray"

    [[steps]]
    type = "filter"
    min_words = 20

    [[steps]]
    type = "dedup"
    threshold = 0.8

    [[steps]]
    type = "retrieve"
    query = ["protein folding", "enzyme kinetics"]
    top_k = 5000

Steps run in order, each reading the previous step's Parquet output. Every step's fields
are a pydantic model of ``hone.recipe`` (the same ones the recipe's ``[[curate.steps]]``
use), checked, with each step's own settings, before any work starts.
"""

from __future__ import annotations

import glob
import time
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hone.corpus.executor import get_executor
from hone.corpus.steps import check_steps, copy_quarantine, run_steps, steps_manifest
from hone.errors import HoneError
from hone.recipe import CurateStep, format_error
from hone.rundir import ensure_dir, write_json


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuildSection(_Model):
    inputs: list[str] = Field(..., min_length=1, description="Input files, directories or glob patterns.")
    output: str = Field(..., description="Output directory; step k writes to OUTPUT/NN-type, the manifest to OUTPUT.")
    text_field: str = Field("text", description="Name of the text field / column in the inputs.")
    executor: Literal["local", "ray"] = Field("local", description="Where shard tasks run: local processes or Ray.")
    workers: Optional[int] = Field(None, ge=1, description="Worker processes (default: all cores).")


class BuildRecipe(_Model):
    build: BuildSection
    # One model per step, shared with the recipe's [[curate.steps]] (hone.recipe).
    steps: list[CurateStep] = Field(..., min_length=1, description="The steps, run in order.")


def load_build(path: str | Path) -> BuildRecipe:
    """Read and validate a build recipe; a one-line HoneError naming the bad field."""
    path = Path(path)
    if not path.exists():
        raise HoneError(f"{path}: build recipe not found")
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise HoneError(f"{path}: invalid TOML: {e}") from None
    try:
        return BuildRecipe.model_validate(data)
    except ValidationError as e:
        raise HoneError(format_error(str(path), e)) from None


def expand_globs(patterns: list[str]) -> list[Path]:
    """Glob patterns to paths (sorted); a pattern matching nothing is an error."""
    out: list[Path] = []
    for pat in patterns:
        if any(c in pat for c in "*?["):
            hits = sorted(glob.glob(pat, recursive=True))
            if not hits:
                raise HoneError(f"build.inputs: {pat!r} matches no file")
            out += map(Path, hits)
        else:
            out.append(Path(pat))
    return out


def run_build(recipe: BuildRecipe, log=print) -> dict:
    """Run the steps in order (OUTPUT/NN-type each), then write OUTPUT/manifest.json."""

    t0, b = time.perf_counter(), recipe.build
    check_steps(recipe.steps)  # a missing step or a bad setting fails before any work starts
    out = ensure_dir(Path(b.output))
    executor = get_executor(b.executor, b.workers)
    inputs: list[Path] = expand_globs(b.inputs)
    steps = run_steps(recipe.steps, inputs, out, b.text_field, executor, log)
    manifest = {"command": "build", **steps_manifest(steps, recipe.steps),
                "recipe": recipe.model_dump(mode="json"), "seconds": round(time.perf_counter() - t0, 3)}
    copy_quarantine(Path(steps[0]["dir"]), out)
    write_json(out / "manifest.json", manifest)
    return manifest
