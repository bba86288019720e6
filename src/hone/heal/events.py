"""``WORKDIR/events.jsonl``: every failure, decision (with its cost estimate) and recovery of a
run, one JSON object per line, appended by the supervisor and by rank 0 of the workers.

Each line has ``time`` (Unix seconds), ``kind`` and the fields of that kind; small appends
of one line are atomic on a local file system, so two writers never interleave a line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

EVENTS_FILE = "events.jsonl"


def _clean(value):
    """JSON has no NaN/inf: write them as strings so every line stays valid JSON."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def append_event(workdir: Path, kind: str, **fields) -> dict:
    event = _clean({"time": round(time.time(), 3), "kind": kind, **fields})
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
