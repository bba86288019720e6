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
import importlib
import shutil
import time
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hone.corpus.dedup import dedup_step, exact_dedup_step
from hone.corpus.executor import filter_step, get_executor, retrieve_step, summary_line
from hone.corpus.read import load_examples, nonempty_parts  # noqa: F401 (load_examples: re-exported)
from hone.errors import HoneError
from hone.recipe import (  # noqa: F401
    CurateStep,
    DedupStep,
    DsirStep,
    ExactDedupStep,
    FilterStep,
    RateStep,
    RetrieveStep,
    SelectStep,
    format_error,
)
from hone.rundir import ensure_dir, write_json


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuildSection(_Model):
    inputs: list[str] = Field(..., min_length=1, description="Input files, directories or glob patterns.")
    output: str = Field(..., description="Output directory; step k writes to OUTPUT/NN-type, the manifest to OUTPUT.")
    text_field: str = Field("text", description="Name of the text field / column in the inputs.")
    executor: Literal["local", "ray"] = Field("local", description="Where shard tasks run: local processes or Ray.")
    workers: Optional[int] = Field(None, ge=1, description="Worker processes (default: all cores).")


Step = CurateStep  # one config per step, shared with the recipe's [[curate.steps]] (hone.recipe)


class BuildRecipe(_Model):
    build: BuildSection
    steps: list[Step] = Field(..., min_length=1, description="The steps, run in order.")


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


def _step_function(kind: str):
    local = {"filter": filter_step, "exact_dedup": exact_dedup_step, "dedup": dedup_step, "retrieve": retrieve_step}
    if kind in local:
        return local[kind]
    try:  # dsir, rate, select: imported when used (rate pulls in the model code)
        return getattr(importlib.import_module(f"hone.corpus.{kind}"), f"{kind}_step")
    except (ImportError, AttributeError):
        raise HoneError(f"step '{kind}' needs hone.corpus.{kind}.{kind}_step, "
                        "which this install does not have") from None


def _step_params(step, text_field: str) -> dict:
    params = step.model_dump()
    params.pop("type")
    if step.type == "retrieve":
        params["examples"] = load_examples(step.examples, text_field) if step.examples else []
    return params


RUNTIME_CONFIG = {"dsir": "DsirConfig", "rate": "RateConfig", "select": "SelectConfig"}


def check_steps(steps: list, where: str = "steps") -> None:
    """Everything about the steps that can be checked without reading the data, before any
    work starts: each step's function exists and its own settings hold (a one-line HoneError
    naming the step and field)."""
    for n, step in enumerate(steps):
        _step_function(step.type)
        params = step.model_dump()
        params.pop("type")
        try:
            if step.type in RUNTIME_CONFIG:  # their modules are imported when used (rate pulls in the model code)
                mod = importlib.import_module(f"hone.corpus.{step.type}")
                params.pop("target", None)
                mod.config_from(getattr(mod, RUNTIME_CONFIG[step.type]), params, step.type)
        except HoneError as e:
            raise HoneError(f"{where}.{n}.{step.type}: {e}") from None


def run_steps(steps: list, inputs: list[Path], out: Path, text_field: str, executor, log=print) -> list[dict]:
    """Run ``steps`` in order (OUT/NN-type each, every one reading the previous one's shards);
    return ``{"name", "dir", "manifest"}`` per step run. The steps are checked first."""
    check_steps(steps)
    done = []
    for n, step in enumerate(steps, start=1):
        step_dir = out / f"{n:02d}-{step.type}"
        m = _step_function(step.type)(inputs, step_dir, text_field=text_field, executor=executor,
                                      **_step_params(step, text_field))
        log(summary_line(f"  {n:02d}-{step.type}", m, step_dir))
        done.append({"name": f"{n:02d}-{step.type}", "dir": str(step_dir), "manifest": m})
        inputs = nonempty_parts(step_dir / s for s in m["shards"])
        text_field = "text"  # our Parquet always says 'text'
        if not inputs and n < len(steps):
            log(f"  nothing left after {n:02d}-{step.type}: the later steps have no input")
            break
    return done


def steps_manifest(steps: list[dict], planned: list) -> dict:
    """The totals and per-step counts of a run of several steps."""
    first, last = steps[0]["manifest"]["totals"], steps[-1]["manifest"]["totals"]
    dropped = sum(s["manifest"]["totals"]["dropped"] + s["manifest"]["totals"]["quarantined"] for s in steps)
    dropped -= first["quarantined"]
    final = nonempty_parts(Path(steps[-1]["dir"]) / s for s in steps[-1]["manifest"]["shards"])
    manifest = {
        "totals": {"docs_in": first["docs_in"], "kept": last["kept"], "dropped": dropped,
                   "quarantined": first["quarantined"], "bytes_in": first["bytes_in"], "bytes_out": last["bytes_out"]},
        # Later steps read the previous step's clean Parquet: only the first read counts.
        "steps": {f"{s['name']}/{k}": v for i, s in enumerate(steps) for k, v in s["manifest"]["steps"].items()
                  if k != "read" or i == 0},
        "step_dirs": [s["dir"] for s in steps],
        "skipped_steps": [f"{n:02d}-{st.type}" for n, st in enumerate(planned, start=1)][len(steps):],
        "final_shards": [str(p) for p in final],
    }
    t = manifest["totals"]
    assert t["docs_in"] == t["kept"] + t["dropped"] + t["quarantined"], t
    return manifest


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


def copy_quarantine(first_step: Path, out: Path) -> None:
    """The unreadable input lines (the first step read the inputs) at OUTPUT/quarantine too."""
    src, dst = first_step / "quarantine" / "quarantine.jsonl", out / "quarantine" / "quarantine.jsonl"
    if src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    else:
        dst.unlink(missing_ok=True)
