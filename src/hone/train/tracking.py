"""Experiment tracking: TensorBoard, Weights & Biases and MLflow behind one small interface.

Each backend receives exactly the scalars of ``metrics.jsonl`` (:func:`scalars`: the same names,
a nested dict flattened as ``loss_by_domain/NAME``, at the same steps), then, from the pipeline,
the evaluation table (``eval.json``) and ``report.html``. Only rank 0 tracks. The ids of the
tracked runs are kept in ``WORKDIR/tracking.json``, so a resumed run (or the final evaluation,
in another process than torchrun's workers) continues the same W&B and MLflow run, and a step
already sent is not sent again. Secrets (``WANDB_API_KEY``, MLflow credentials) are read by the
libraries from the environment; Hone never reads or logs them.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from hone.errors import HoneError
from hone.recipe import Recipe
from hone.rundir import METRICS_FILE, TENSORBOARD_DIR, TRACKING_FILE, read_json, write_json

__all__ = ["Tracking", "tracking_for", "check_backends", "scalars", "open_tracking", "finish_tracking"]

# backend -> (the module it needs, the extra that installs it)
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
MLFLOW_DIR = "mlruns"
WANDB_SUBDIR = "wandb"

Say = Callable[[str], None]


@dataclass(frozen=True)
class Tracking:
    """The recipe's ``[log]`` section, resolved: ``backends`` None means tensorboard if installed."""

    backends: tuple[str, ...] | None = None
    project: str = "hone"
    run_name: str = "run"
    mlflow_tracking_uri: str | None = None
    config: dict = field(default_factory=dict)


def tracking_for(recipe: Recipe) -> Tracking:
    lg = recipe.log
    return Tracking(tuple(lg.backends) if lg.backends is not None else None, lg.project,
                    lg.run_name or recipe.run.name, lg.mlflow_tracking_uri, json.loads(recipe.model_dump_json()))


def _installed(module: str) -> bool:
    if module in sys.modules:  # None there: an import that is known to fail
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def _missing_error(name: str) -> HoneError:
    module, extra = NEEDS[name]
    return HoneError(f"log.backends: {name!r} needs the {module} package: pip install 'hone[{extra}]' "
                     f"(or remove it from log.backends)")


def check_backends(tracking: Tracking | None) -> list[str]:
    """The backends that will run; a listed backend that is not installed is a one-line error."""
    if tracking is None or tracking.backends is None:
        return ["tensorboard"] if _installed("tensorboard") else []
    for name in tracking.backends:
        if not _installed(NEEDS[name][0]):
            raise _missing_error(name)
    return list(dict.fromkeys(tracking.backends))


def _import(name: str, module: str | None = None):
    """Backend ``name``'s library (or its submodule ``module``), imported only when that backend runs."""
    try:
        return importlib.import_module(module or NEEDS[name][0])
    except ImportError:
        raise _missing_error(name) from None


def redact(uri: str) -> str:
    """``uri`` without the credentials a URL may carry (``https://user:token@host`` -> ``https://***@host``)."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def scalars(row: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of one ``metrics.jsonl`` line (or ``eval.json``), flat: ``{"loss": ..,
    "loss_by_domain/domain": .., ...}``; ``step``, strings, None and non-finite values left out."""
    out = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step" \
                and math.isfinite(value):
            out[name] = float(value)
    return out


class Backend(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...
    def log_table(self, table: dict[str, dict], step: int) -> None: ...
    def log_file(self, path: Path) -> None: ...
    def close(self) -> None: ...


class TensorBoardBackend:
    def __init__(self, workdir: Path, tracking: Tracking, state: dict) -> None:
        _import("tensorboard")
        self.writer = _import("tensorboard", "torch.utils.tensorboard").SummaryWriter(str(workdir / TENSORBOARD_DIR))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_table(self, table: dict[str, dict], step: int) -> None:
        self.log(scalars(table, "eval/"), step)
        keys = sorted({k for row in table.values() for k in scalars(row)})
        lines = ["| set | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{scalars(row).get(k, float('nan')):.4g}" for k in keys) + " |"
                  for name, row in table.items()]
        self.writer.add_text("eval", "\n".join(lines), step)

    def log_file(self, path: Path) -> None:  # TensorBoard has no artifacts: the report stays in the run directory
        pass

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    """A W&B run in WORKDIR/wandb (``WANDB_MODE=offline`` works; ``wandb sync`` uploads later)."""

    def __init__(self, workdir: Path, tracking: Tracking, state: dict) -> None:
        self.wandb = _import("wandb")
        mine = state.setdefault("wandb", {})
        mine.setdefault("id", secrets.token_hex(6))  # W&B ids: lowercase letters and digits
        self.run = self.wandb.init(project=tracking.project, name=tracking.run_name, id=mine["id"], resume="allow",
                                   dir=str(workdir), config=tracking.config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_table(self, table: dict[str, dict], step: int) -> None:
        keys = sorted({k for row in table.values() for k in scalars(row)})
        rows = [[name] + [scalars(row).get(k) for k in keys] for name, row in table.items()]
        self.run.log({"eval": self.wandb.Table(columns=["set", *keys], data=rows)}, step=step)
        self.run.summary.update(scalars(table, "eval/"))

    def log_file(self, path: Path) -> None:
        artifact = self.wandb.Artifact(f"{self.run.id}-{path.stem}", type=path.stem)
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()


class MlflowBackend:
    """An MLflow run through ``MlflowClient`` (no global active run): by default a local file store
    WORKDIR/mlruns, the store that works with mlflow-skinny alone (no database)."""

    def __init__(self, workdir: Path, tracking: Tracking, state: dict) -> None:
        self.metric = _import("mlflow", "mlflow.entities").Metric
        uri = tracking.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (workdir / MLFLOW_DIR).as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses a file store unless told that it is wanted; here it is the chosen default.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = _import("mlflow", "mlflow.tracking").MlflowClient(tracking_uri=uri)
        mine = state.setdefault("mlflow", {})
        if mine.get("run_id") and mine.get("tracking_uri") == redact(uri):
            self.run_id = mine["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(tracking.project)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(tracking.project)
            self.run_id = self.client.create_run(exp_id, run_name=tracking.run_name).info.run_id
            self.client.log_dict(self.run_id, tracking.config, "recipe.json")
            mine.update(run_id=self.run_id, tracking_uri=redact(uri))  # never a password on disk or screen

    def log(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.metric(k, v, now, step) for k, v in values.items()])

    def log_table(self, table: dict[str, dict], step: int) -> None:
        self.log(scalars(table, "eval/"), step)
        self.client.log_dict(self.run_id, table, "eval.json")

    def log_file(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


BACKENDS = {"tensorboard": TensorBoardBackend, "wandb": WandbBackend, "mlflow": MlflowBackend}


class Trackers:
    """The run's backends together, and the last step they were sent (kept in tracking.json at the
    end; after a crash, the last step of metrics.jsonl, which each step reaches just before them)."""

    def __init__(self, backends: list[Backend], workdir: Path, state: dict) -> None:
        self.backends, self.path, self.state = backends, workdir / TRACKING_FILE, state

    def log_step(self, row: dict) -> None:
        """One metrics.jsonl line; a step sent before (a resumed run repeats the steps after its
        checkpoint, with the same values) is not sent twice."""
        step = int(row["step"])
        if step <= self.state.get("sent_step", 0):
            return
        values = scalars(row)
        for backend in self.backends:
            backend.log(values, step)
        self.state["sent_step"] = step

    def finish(self, table: dict | None, files: list[Path]) -> None:
        step = self.state.get("sent_step", 0)
        for backend in self.backends:
            if table:
                backend.log_table(table, step)
            for path in files:
                if Path(path).is_file():
                    backend.log_file(Path(path))

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        write_json(self.path, self.state)


def _last_logged_step(workdir: Path) -> int:
    path = workdir / METRICS_FILE
    lines = path.read_text().split("\n") if path.is_file() else []
    last = next((line for line in reversed(lines) if line.strip()), None)
    try:
        return int(json.loads(last)["step"]) if last else 0
    except (ValueError, KeyError, TypeError):  # a line cut by a crash
        return 0


def open_tracking(tracking: Tracking | None, workdir: Path, say: Say = print, *,
                  fresh: bool = False) -> Trackers | None:
    """The run's backends, continuing the runs recorded in tracking.json (``fresh``: new runs);
    None when there is none. Open it before a resume forgets the metrics lines past its checkpoint."""
    names = check_backends(tracking)
    if not names:
        return None
    tracking = tracking or Tracking()
    workdir = Path(workdir)
    state = read_json(workdir / TRACKING_FILE) if (workdir / TRACKING_FILE).is_file() and not fresh else {}
    if state:
        state["sent_step"] = max(state.get("sent_step", 0), _last_logged_step(workdir))
    backends = [BACKENDS[name](workdir, tracking, state) for name in names]
    write_json(workdir / TRACKING_FILE, state)
    if tracking.backends is not None:
        say(f"tracking: {', '.join(names)}" + (f" (MLflow {state['mlflow']['tracking_uri']})" if "mlflow" in names
                                                else ""))
    return Trackers(backends, workdir, state)


def finish_tracking(tracking: Tracking | None, workdir: Path, table: dict | None, files: list[Path],
                    say: Say = print) -> None:
    """Send the evaluation table and files (report.html) to the run's backends, and close them."""
    trackers = open_tracking(tracking, workdir, lambda m: None)
    if trackers is None:
        return
    try:
        trackers.finish(table, files)
    finally:
        trackers.close()
    if tracking is not None and tracking.backends is not None:
        say(f"tracking: sent eval.json and {', '.join(Path(f).name for f in files)} to {', '.join(tracking.backends)}")
