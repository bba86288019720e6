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

Steps run in order, each reading the previous step's Parquet output. OUTPUT/part-*.parquet
are the last step's documents (hard links to its parts), so OUTPUT reads as one dataset with
pandas, pyarrow and datasets; each step's own output is OUTPUT/.hone/steps/NN-type/ and the
manifest OUTPUT/.hone/manifest.json (the layout: :mod:`hone.corpus.runner`). Every step's fields
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
from hone.corpus.runner import clear_legacy, manifest_file, meta_dir, publish_parts
from hone.corpus.steps import check_steps, copy_quarantine, run_steps, steps_manifest
from hone.errors import HoneError
from hone.recipe import CurateStep, format_error
from hone.rundir import ensure_dir, write_json


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuildSection(_Model):
    inputs: list[str] = Field(..., min_length=1, description="Input files, directories or glob patterns.")
    output: str = Field(..., description="Output directory: the kept documents as part-*.parquet; step k's "
                        "output in OUTPUT/.hone/steps/NN-type, the manifest in OUTPUT/.hone.")
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
    """Run the steps in order (OUTPUT/.hone/steps/NN-type each), publish the last one's parts
    as OUTPUT/part-*.parquet, then write OUTPUT/.hone/manifest.json."""

    t0, b = time.perf_counter(), recipe.build
    check_steps(recipe.steps)  # a missing step or a bad setting fails before any work starts
    out = ensure_dir(Path(b.output))
    clear_legacy(out)
    executor = get_executor(b.executor, b.workers)
    inputs: list[Path] = expand_globs(b.inputs)
    steps = run_steps(recipe.steps, inputs, meta_dir(out) / "steps", b.text_field, executor, log)
    last = Path(steps[-1]["dir"])
    parts = publish_parts([last / s for s in steps[-1]["manifest"]["shards"]], out)
    manifest = {"command": "build", **steps_manifest(steps, recipe.steps), "shards": [p.name for p in parts],
                "recipe": recipe.model_dump(mode="json"), "seconds": round(time.perf_counter() - t0, 3)}
    copy_quarantine(Path(steps[0]["dir"]), out)
    write_json(manifest_file(out), manifest)
    return manifest
