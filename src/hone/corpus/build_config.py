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

Steps run in order, each reading the previous step's Parquet output. ``dsir``, ``rate`` and
``select`` steps pass their fields to ``hone.corpus.<type>.<type>_step``.
"""

from __future__ import annotations

import glob
import importlib
import shutil
import time
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hone.corpus.dedup import dedup_step
from hone.corpus.executor import filter_step, get_executor, retrieve_step, summary_line
from hone.corpus.read import nonempty_parts, read_inputs
from hone.errors import HoneError
from hone.recipe import FilterConfig, _format_error
from hone.rundir import ensure_dir, write_json


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuildSection(_Model):
    inputs: list[str] = Field(..., min_length=1, description="Input files, directories or glob patterns.")
    output: str = Field(..., description="Output directory; step k writes to OUTPUT/NN-type, the manifest to OUTPUT.")
    text_field: str = Field("text", description="Name of the text field / column in the inputs.")
    executor: Literal["local", "ray"] = Field("local", description="Where shard tasks run: local processes or Ray.")
    workers: Optional[int] = Field(None, ge=1, description="Worker processes (default: all cores).")


class FilterStep(FilterConfig):
    type: Literal["filter"] = Field(description="Gopher / C4 heuristic filters.")


class DedupStep(_Model):
    type: Literal["dedup"] = Field(description="MinHash LSH near-dedup with exact Jaccard verification.")
    threshold: float = Field(0.8, gt=0, lt=1, description="Shingle Jaccard at or above which docs are duplicates.")
    ngram: int = Field(5, ge=1, description="Shingle length (words or bytes).")
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash permutations.")
    unit: Literal["word", "char"] = Field("word", description="Word or character (byte) shingles.")
    bands: Optional[int] = Field(None, ge=1, description="LSH bands (with rows; default: chosen from threshold).")
    rows: Optional[int] = Field(None, ge=1, description="LSH rows per band (with bands).")
    cluster_column: bool = Field(False, description="Add a dup_cluster column.")
    mark_only: bool = Field(False, description="Keep every document; only add dup_cluster.")
    write_dropped: bool = Field(False, description="Write removed documents to dropped/dropped.jsonl.")

    @model_validator(mode="after")
    def _bands_rows(self) -> "DedupStep":
        if (self.bands is None) != (self.rows is None):
            raise ValueError("give both bands and rows, or neither")
        if self.bands and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands({self.bands}) * rows({self.rows}) = {self.bands * self.rows} > num_perm({self.num_perm})")
        return self


class RetrieveStep(_Model):
    type: Literal["retrieve"] = Field(description="BM25 domain retrieval with query expansion.")
    query: list[str] = Field(default_factory=list, description="Seed keywords or questions.")
    examples: Optional[str] = Field(None, description="File of example documents (jsonl/parquet/txt).")
    top_k: int = Field(1000, ge=1, description="Documents to retrieve.")
    expand: Literal["none", "prf", "llm"] = Field("prf", description="Query expansion.")
    name: str = Field("domain", description="Domain label of the retrieved documents.")
    keep_rest: bool = Field(False, description="Keep the other documents as domain 'general'.")

    @model_validator(mode="after")
    def _seeds(self) -> "RetrieveStep":
        if not self.query and not self.examples:
            raise ValueError("give query or examples")
        return self


class ExternalStep(BaseModel):
    """A step implemented elsewhere (``hone.corpus.<type>.<type>_step``); its fields pass through."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: Literal["dsir", "rate", "select"]


Step = Annotated[Union[FilterStep, DedupStep, RetrieveStep, ExternalStep], Field(discriminator="type")]


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
        raise HoneError(_format_error(str(path), e)) from None


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


def load_examples(path: str | Path, text_field: str = "text") -> list[str]:
    """Example documents: a .txt file holds one per paragraph (blank-line separated); any
    other supported input holds one per record."""
    path = Path(path)
    if not path.exists():
        raise HoneError(f"{path}: examples file not found")
    if path.suffix == ".txt":
        paras = [p.strip() for p in path.read_text(encoding="utf-8", errors="replace").split("\n\n")]
        out = [p for p in paras if p]
    else:
        out = [d["text"] for d in read_inputs([path], text_field)]
    if not out:
        raise HoneError(f"{path}: no example documents in this file")
    return out


def _step_function(kind: str):

    local = {"filter": filter_step, "dedup": dedup_step, "retrieve": retrieve_step}
    if kind in local:
        return local[kind]
    try:
        return getattr(importlib.import_module(f"hone.corpus.{kind}"), f"{kind}_step")
    except (ImportError, AttributeError):
        raise HoneError(f"step '{kind}' needs hone.corpus.{kind}.{kind}_step, which this install does not have") from None


def _step_params(step, text_field: str) -> dict:
    params = step.model_dump()
    params.pop("type")
    if step.type == "retrieve":
        params["examples"] = load_examples(step.examples, text_field) if step.examples else []
    return params


def run_build(recipe: BuildRecipe, log=print) -> dict:
    """Run the steps in order (OUTPUT/NN-type each), then write OUTPUT/manifest.json."""

    t0, b = time.perf_counter(), recipe.build
    out = ensure_dir(Path(b.output))
    for step in recipe.steps:
        _step_function(step.type)  # a missing step fails before any work starts
    executor = get_executor(b.executor, b.workers)
    inputs: list[Path] = expand_globs(b.inputs)
    steps = []
    for n, step in enumerate(recipe.steps, start=1):
        step_dir = out / f"{n:02d}-{step.type}"
        m = _step_function(step.type)(inputs, step_dir, text_field=b.text_field, executor=executor,
                                      **_step_params(step, b.text_field))
        log(summary_line(f"  {n:02d}-{step.type}", m, step_dir))
        steps.append({"name": f"{n:02d}-{step.type}", "dir": str(step_dir), "manifest": m})
        inputs = nonempty_parts(step_dir / s for s in m["shards"])
        b = b.model_copy(update={"text_field": "text"})  # our Parquet always says 'text'
        if not inputs and n < len(recipe.steps):
            log(f"  nothing left after {n:02d}-{step.type}: the later steps have no input")
            break
    first, last = steps[0]["manifest"]["totals"], steps[-1]["manifest"]["totals"]
    dropped = sum(s["manifest"]["totals"]["dropped"] + s["manifest"]["totals"]["quarantined"] for s in steps)
    dropped -= first["quarantined"]
    manifest = {
        "command": "build",
        "totals": {"docs_in": first["docs_in"], "kept": last["kept"], "dropped": dropped,
                   "quarantined": first["quarantined"], "bytes_in": first["bytes_in"], "bytes_out": last["bytes_out"]},
        # Later steps read the previous step's clean Parquet: only the first read counts.
        "steps": {f"{s['name']}/{k}": v for i, s in enumerate(steps) for k, v in s["manifest"]["steps"].items()
                  if k != "read" or i == 0},
        "step_dirs": [s["dir"] for s in steps],
        "skipped_steps": [f"{n:02d}-{st.type}" for n, st in enumerate(recipe.steps, start=1)][len(steps):],
        "final_shards": [str(p) for p in inputs],
        "recipe": recipe.model_dump(mode="json"),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    t = manifest["totals"]
    assert t["docs_in"] == t["kept"] + t["dropped"] + t["quarantined"], t
    _copy_quarantine(Path(steps[0]["dir"]), out)
    write_json(out / "manifest.json", manifest)
    return manifest


def _copy_quarantine(first_step: Path, out: Path) -> None:
    """The unreadable input lines (the first step read the inputs) at OUTPUT/quarantine too."""
    src, dst = first_step / "quarantine" / "quarantine.jsonl", out / "quarantine" / "quarantine.jsonl"
    if src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    else:
        dst.unlink(missing_ok=True)
