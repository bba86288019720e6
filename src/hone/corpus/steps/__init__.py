"""The curation steps, one module each, and running a list of them.

Every step is a function ``step(inputs, out_dir, *, text_field, executor, **settings)`` that
reads its input shards and writes OUT/part-*.parquet (+ OUT/.hone/manifest.json) through
:mod:`hone.corpus.runner` (the one keep/drop loop, manifest and directory layout); its settings are the step's
model in :mod:`hone.recipe`, shared by the recipe's ``[[curate.steps]]``, the build file's
``[[steps]]`` and the ``hone data`` commands.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from hone.corpus.read import load_examples, nonempty_parts
from hone.corpus.runner import quarantine_file, summary_line
from hone.corpus.steps.dedup import NearDedupConfig, dedup_step
from hone.corpus.steps.dsir import DsirConfig, dsir_step
from hone.corpus.steps.exact_dedup import exact_dedup_step
from hone.corpus.steps.filter import filter_step
from hone.corpus.steps.rate import RateConfig, rate_step
from hone.corpus.steps.retrieve import retrieve_step
from hone.corpus.steps.select import SelectConfig, select_step
from hone.errors import HoneError
from hone.recipe import STEP_TYPES
from hone.rundir import atomic_path

STEP_FUNCTIONS: dict[str, Callable[..., dict]] = {
    "filter": filter_step, "exact_dedup": exact_dedup_step, "dedup": dedup_step, "retrieve": retrieve_step,
    "dsir": dsir_step, "rate": rate_step, "select": select_step}
# The settings a step builds when it runs (with checks beyond the recipe's: the rate criterion).
RUNTIME_SETTINGS = {"dedup": NearDedupConfig, "dsir": DsirConfig, "rate": RateConfig, "select": SelectConfig}
assert set(STEP_FUNCTIONS) == set(STEP_TYPES)


def step_params(step, text_field: str) -> dict:
    """The keyword settings of ``step`` (a step model) for its function."""
    params = step.model_dump()
    params.pop("type")
    if step.type == "retrieve" and isinstance(step.examples, str):
        params["examples"] = load_examples(step.examples, text_field)
    elif step.type == "retrieve":
        params["examples"] = list(step.examples or [])
    return params


def check_steps(steps: list, where: str = "steps") -> None:
    """What can be checked without reading the data, before any work starts: each step's
    settings as its function will build them (a one-line HoneError naming the step)."""
    for n, step in enumerate(steps):
        params = step.model_dump()
        params.pop("type")
        params.pop("target", None)
        try:
            if step.type in RUNTIME_SETTINGS:
                RUNTIME_SETTINGS[step.type](**params)
        except HoneError as e:
            raise HoneError(f"{where}.{n}.{step.type}: {e}") from None


def run_steps(steps: list, inputs: list[Path], out: Path, text_field: str, executor, log=print,
              names: list[str] | None = None) -> list[dict]:
    """Run ``steps`` in order (OUT/NAME each, every one reading the previous one's shards; NAME
    is NN-type unless ``names`` are given); return ``{"name", "dir", "manifest"}`` per step run.
    The steps are checked first."""
    check_steps(steps)
    names = names or [f"{n:02d}-{s.type}" for n, s in enumerate(steps, start=1)]
    done = []
    for n, (step, name) in enumerate(zip(steps, names), start=1):
        step_dir = out / name
        m = STEP_FUNCTIONS[step.type](inputs, step_dir, text_field=text_field, executor=executor,
                                      **step_params(step, text_field))
        log(summary_line(f"  {name}", m, step_dir))
        done.append({"name": name, "dir": str(step_dir), "manifest": m})
        inputs = nonempty_parts(step_dir / s for s in m["shards"])
        text_field = "text"  # our Parquet always says 'text'
        if not inputs and n < len(steps):
            log(f"  nothing left after {name}: the later steps have no input")
            break
    return done


def steps_manifest(steps: list[dict], planned: list, names: list[str] | None = None) -> dict:
    """The totals and per-step counts of a run of several steps (``steps`` as ``run_steps``
    returns them, ``planned`` the step models, ``names`` as given to ``run_steps``)."""
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
        "skipped_steps": (names or [f"{n:02d}-{st.type}" for n, st in enumerate(planned, start=1)])[len(steps):],
        "final_shards": [str(p) for p in final],
    }
    t = manifest["totals"]
    assert t["docs_in"] == t["kept"] + t["dropped"] + t["quarantined"], t
    return manifest


def copy_quarantine(first_step: Path, out: Path) -> None:
    """The unreadable input lines (the first step read the inputs) at OUTPUT/.hone/quarantine too."""
    src, dst = quarantine_file(first_step), quarantine_file(out)
    if src.exists():
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    else:
        dst.unlink(missing_ok=True)
