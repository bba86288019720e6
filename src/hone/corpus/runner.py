"""The one keep/drop loop and the one step manifest of every curation step.

A step decides per document: ``None`` keeps it, a reason string (or ``(reason, detail)``)
drops it. ``keep_or_drop`` applies the verdicts, counts docs and bytes per reason in a
``StepStats`` and optionally collects the dropped documents for the audit file;
``step_manifest`` writes the manifest every step directory holds, with
``totals`` asserting ``docs_in == kept + dropped + quarantined``.

    kept = list(run_decide(docs, decide, stats, dropped))
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator

from hone.corpus.read import StepStats


def dropped_record(doc: dict, reason: str, detail: dict) -> dict:
    """What the audit file keeps of a dropped document."""
    rec = {"id": doc["id"]}
    for key in ("source", "src_file", "src_row"):
        if key in doc:
            rec[key] = doc[key]
    return {**rec, "reason": reason, **detail, "text": doc["text"], "meta": doc.get("meta", {})}


def _apply(doc: dict, verdict, stats: StepStats, dropped: list[dict] | None, record=dropped_record) -> bool:
    nbytes = len(doc["text"].encode("utf-8"))
    if verdict is None:
        stats.keep(nbytes)
        return True
    reason, detail = verdict if isinstance(verdict, tuple) else (verdict, {})
    stats.drop(reason, nbytes)
    if dropped is not None:
        dropped.append(record(doc, reason, detail))
    return False


def keep_or_drop(docs: Iterable[dict], verdicts: Iterable, stats: StepStats,
                 dropped: list[dict] | None = None, record=dropped_record) -> Iterator[dict]:
    """Yield the documents whose verdict (one per document, in order) is None; count (and
    optionally keep for audit, as ``record(doc, reason, detail)``) the rest."""
    for doc, verdict in zip(docs, verdicts):
        if _apply(doc, verdict, stats, dropped, record):
            yield doc


def run_decide(docs: Iterable[dict], decide, stats: StepStats, dropped: list[dict] | None = None) -> Iterator[dict]:
    """``keep_or_drop`` with a per-document ``decide``, streaming: each document is decided
    when it is reached, so stateful deciders (exact dedup) see them in order."""
    for doc in docs:
        if _apply(doc, decide(doc), stats, dropped):
            yield doc


def totals(read: dict, steps: dict[str, dict]) -> dict:
    """Docs in (every input line / row / file), kept, dropped by the steps, quarantined."""
    quarantined = sum(d["docs"] for d in read.get("quarantined", {}).values())
    dropped = sum(d["docs"] for s in steps.values() for d in s["dropped"].values())
    dropped += sum(d["docs"] for d in read["dropped"].values())
    last = list(steps.values())[-1] if steps else read
    return {"docs_in": read["docs_in"], "kept": last["docs_out"], "dropped": dropped, "quarantined": quarantined,
            "bytes_in": read["bytes_in"], "bytes_out": last["bytes_out"]}


def step_manifest(command: str, shards: list, read: StepStats, step: StepStats, config: dict, parts: list[str],
                  t0: float, after_config: dict | None = None, **extra) -> dict:
    """The manifest of one step's output directory (the same keys for every step), with a
    step's own keys (``extra``: before ``shards``; ``after_config``: before ``seconds``)."""
    steps = {"read": read.as_dict(), command: step.as_dict()}
    return {"command": command, "inputs": list(dict.fromkeys(str(s.path) for s in shards)), "steps": steps,
            "totals": totals(steps["read"], {command: steps[command]}),
            "quarantined": {r: d["docs"] for r, d in steps["read"].get("quarantined", {}).items()},
            **extra, "shards": parts, "config": config, **(after_config or {}),
            "seconds": round(time.perf_counter() - t0, 3)}
