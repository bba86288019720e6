"""Run-directory helpers: atomic writes, JSON / JSONL artifacts, completion markers.

Every artifact is written to a temporary name in the same directory and renamed into
place, so a crash never leaves a half-written file that a later stage would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hone.errors import HoneError

# --- the names of a run directory's artifacts (README, "The run directory") ----------------
RECIPE_STAMP = "recipe.json"             # the validated recipe and its data / train hashes
POOL_DIR = "pool"                        # the mixed pool built from packaged corpora
HELDOUT_DIR = "heldout"                  # held-out evaluation sets: the packaged data's, each source's NAME.jsonl
CORPUS_DIR = "corpus"                    # curated part-*.parquet; .hone/: manifest, steps/, dropped/, quarantine/
SOURCES_DIR = "sources"                  # per data source: corpus/ (curated) and train/ (without its held-out part)
TOKENS_DIR = "tokens"                    # token shards per stream
TOKENIZER_FILE = "tokenizer.json"        # the BPE trained for a random model
BASE_DIR = "base"                        # the base model in HF format, when it came from a GGUF file
SAMPLES_TEXT_FILE = "completions.json"   # completions of fixed prompts before and after training
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "train_summary.json"      # steps, tokens, wall time of the last training run
TENSORBOARD_DIR = "tensorboard"
TRACKING_FILE = "tracking.json"          # the W&B / MLflow run ids of [log] backends, the last step sent
LOGS_DIR = "logs"                        # a worker's traceback: logs/rankR.err
EVENTS_FILE = "events.jsonl"             # failures, decisions, recoveries
SAMPLES_FILE = "samples.jsonl"           # the sample ledger
HEAL_DIR = "heal"                        # skips, heartbeats, failure reports, fired faults
LAUNCH_DIR = "launch"                    # slurm.sbatch for multi-node runs
MIX_DIR = "mix"                          # hone mix sweep
MIXTURE_FILE = "mixture.json"            # hone mix fit
PLAN_FILE = "plan.json"                  # hone plan --out
EXPERTS_DIR = "experts"                  # hone branch
EVAL_BEFORE_FILE = "eval_before.json"
EVAL_AFTER_FILE = "eval_after.json"
EVAL_FILE = "eval.json"
TASKS_DIR = "tasks"                      # the packaged lm-eval tasks: NAME.yaml + NAME.jsonl
TASKS_BEFORE_FILE = "eval_tasks_before.json"  # task accuracy of the base (eval.tasks)
TASKS_AFTER_FILE = "eval_tasks_after.json"
EVAL_TASKS_FILE = "eval_tasks.json"      # task accuracy before and after, and the change
FINAL_DIR = "final"                      # the trained model, HF format
FINAL_ADAPTER_DIR = "final-adapter"      # under train.lora: the adapter in PEFT's format (final/ is merged)
REPORT_FILE = "report.html"

# Every directory of Parquet parts Hone writes holds only part-*.parquet at its top; its manifest,
# markers, audit files, work files and step outputs live in DIR/.hone/, which pandas, pyarrow and
# datasets skip (hone.corpus.runner says why this name).
PARTS_META_DIR = ".hone"
MANIFEST_FILE = "manifest.json"


def parts_manifest(parts_dir: Path) -> Path:
    """The manifest of a directory of Parquet parts: DIR/.hone/manifest.json, or DIR/manifest.json
    in a directory an older Hone wrote (when only that one exists)."""
    new, old = Path(parts_dir) / PARTS_META_DIR / MANIFEST_FILE, Path(parts_dir) / MANIFEST_FILE
    return old if old.is_file() and not new.exists() else new


# What training writes; `hone train --fresh` removes these and keeps the data stages.
TRAINING_ARTIFACTS = (CHECKPOINTS_DIR, METRICS_FILE, SUMMARY_FILE, EVAL_AFTER_FILE, EVAL_FILE, FINAL_DIR,
                      REPORT_FILE, TENSORBOARD_DIR, HEAL_DIR, EVENTS_FILE, SAMPLES_FILE, SAMPLES_TEXT_FILE,
                      TRACKING_FILE, FINAL_ADAPTER_DIR, TASKS_AFTER_FILE, EVAL_TASKS_FILE)


def source_train_dir(workdir: Path, source: str) -> Path:
    """A data source's training documents (Parquet): ``sources/NAME/train``, its held-out part removed."""
    return Path(workdir) / SOURCES_DIR / source / "train"


def stream_tokens_dir(workdir: Path, stream: str, from_pool: bool) -> Path:
    """Where a training stream's token shards live: ``tokens/train/NAME`` for the pool's domain and
    replay, ``tokens/sources/NAME/train/NAME`` for a data source (each source tokenized on its own)."""
    base = Path(workdir) / TOKENS_DIR
    return base / "train" / stream if from_pool else base / SOURCES_DIR / stream / "train" / stream


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents); a one-line HoneError if it cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise HoneError(f"run directory {path} is not writable: {e.strerror or e}") from None
    return path


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes 0600; artifacts are ordinary files
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; swap it in as ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise HoneError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HoneError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def write_jsonl(path: Path, rows: Any) -> int:
    """Write an iterable of dicts as JSON lines atomically; return the number of rows."""
    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
    return n


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines log this package wrote (none if it does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_jsonl(path: Path, row: dict) -> None:
    """Append one line (metrics logs): a crash loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def mark_done(path: Path, info: dict | None = None) -> None:
    """Write a completion marker ``<path>.done`` for a finished stage or shard."""
    write_json(Path(str(path) + ".done"), info or {})


def is_done(path: Path) -> bool:
    return Path(str(path) + ".done").exists()


def clear_done(path: Path) -> None:
    Path(str(path) + ".done").unlink(missing_ok=True)


# --- events.jsonl: failures, decisions and recoveries of a run -----------------------------
# Each line has ``time`` (Unix seconds), ``kind`` and the fields of that kind; small appends
# of one line are atomic on a local file system, so two writers never interleave a line.

def _json_safe(value):
    """JSON has no NaN/inf: write them as strings so every line stays valid JSON."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def append_event(workdir: Path, kind: str, **fields) -> dict:
    event = _json_safe({"time": round(time.time(), 3), "kind": kind, **fields})
    path = Path(workdir) / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")
    return event


def read_events(workdir: Path) -> list[dict]:
    """The run's events in order; a torn last line (a crash mid-write) is ignored."""
    path = Path(workdir) / EVENTS_FILE
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
