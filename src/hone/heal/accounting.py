"""Sample accounting across restarts, from the ledger ``samples.jsonl`` (hone.train.hooks).

The ledger is append-only: one line per loader batch (its windows as ``stream:epoch:position``,
``trained`` with its optimizer step or ``skipped``) and a ``resume`` line at every (re)start.
A resume from a checkpoint rolls back every batch at or after the checkpoint's loader
position, so the *effective* ledger keeps, for each batch index, the last attempt's line.
:func:`audit` then checks that the run consumed every window once per epoch, in order,
with no gap and no repeat, skipped windows included and marked.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from hone.errors import HoneError


def read_ledger(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise HoneError(f"{path}: no sample ledger (train writes it next to metrics.jsonl)")
    raw = path.read_text(encoding="utf-8").splitlines()
    lines = []
    for n, line in enumerate(raw, 1):
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(raw):  # only a torn last line (a kill mid-write) is expected
                raise HoneError(f"{path}:{n}: invalid JSON line") from None
    return lines


def effective(lines: list[dict]) -> list[dict]:
    """The batches the finished run stands on: each resume forgets what came after its batch."""
    kept: list[dict] = []
    for rec in lines:
        if "resume" in rec:
            kept = [e for e in kept if e["batch"] < rec["resume"]]
        else:
            kept.append(rec)
    return kept


def audit(path: Path, seq_len: int, lengths: dict[str, int] | None = None) -> dict:
    """Counts and every violation of exactly-once consumption (empty lists when exact).

    With ``lengths`` (tokens per stream) a new epoch must also start only when the previous
    one is used up: the loader wraps when the next window of ``seq_len + 1`` tokens no longer fits.
    """
    lines = read_ledger(path)
    batches = effective(lines)
    problems: list[str] = []
    if [b["batch"] for b in batches] != list(range(len(batches))):
        problems.append(f"loader batches out of order or missing: {[b['batch'] for b in batches][:20]}")
    steps = [b["step"] for b in batches if b["status"] == "trained"]
    if steps != list(range(1, len(steps) + 1)):
        problems.append(f"optimizer steps not 1..{len(steps)} once each: {steps[:20]}")
    walk: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for b in batches:
        for sid in b["ids"]:
            name, epoch, pos = sid.rsplit(":", 2)
            walk[name].append((int(epoch), int(pos)))
    for name, seq in walk.items():
        seen = set()
        for i, (epoch, pos) in enumerate(seq):
            if (epoch, pos) in seen:
                problems.append(f"{name}: window epoch {epoch} position {pos} consumed twice")
            seen.add((epoch, pos))
            if i == 0:
                ok = (epoch, pos) == (0, 0)
            else:
                pe, pp = seq[i - 1]
                wrapped = epoch == pe + 1 and pos == 0
                ok = (epoch == pe and pos == pp + seq_len) or wrapped
                if wrapped and lengths and name in lengths and pp + 2 * seq_len + 1 <= lengths[name]:
                    ok = False  # the epoch ended early: its last windows were never consumed
            if not ok:
                problems.append(f"{name}: gap before epoch {epoch} position {pos}")
    return {"batches": len(batches), "trained": len(steps),
            "skipped": sum(b["status"] == "skipped" for b in batches),
            "samples": sum(len(b["ids"]) for b in batches),
            "skipped_samples": sum(len(b["ids"]) for b in batches if b["status"] == "skipped"),
            "rolled_back": sum(1 for r in lines if "resume" not in r) - len(batches),
            "restarts": sum(1 for r in lines if "resume" in r) - 1,
            "problems": problems}
