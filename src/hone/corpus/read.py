"""Reading JSON-lines inputs into records, and the per-step counts every step keeps.

A record is ``{"id": str, "text": str, "source": str, "meta": dict}``. A line that cannot
become a record (bad UTF-8, bad JSON, not an object, no string text field) is never
silently lost: it goes to the quarantine with its file, line number and reason.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

from hone.errors import HoneError

RAW_KEEP = 2000  # characters of a quarantined line kept for the audit file


@dataclass
class StepStats:
    """Docs and bytes in, kept, and dropped per reason, for one step of the manifest."""

    docs_in: int = 0
    bytes_in: int = 0
    docs_out: int = 0
    bytes_out: int = 0
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)

    def keep(self, nbytes: int) -> None:
        self.docs_in, self.bytes_in = self.docs_in + 1, self.bytes_in + nbytes
        self.docs_out, self.bytes_out = self.docs_out + 1, self.bytes_out + nbytes

    def drop(self, reason: str, nbytes: int) -> None:
        self.docs_in, self.bytes_in = self.docs_in + 1, self.bytes_in + nbytes
        d = self.dropped.setdefault(reason, {"docs": 0, "bytes": 0})
        d["docs"] += 1
        d["bytes"] += nbytes

    def as_dict(self) -> dict:
        out = {"docs_in": self.docs_in, "docs_out": self.docs_out, "bytes_in": self.bytes_in,
               "bytes_out": self.bytes_out, "dropped": dict(sorted(self.dropped.items()))}
        assert self.docs_in == self.docs_out + sum(d["docs"] for d in self.dropped.values()), out
        assert self.bytes_in == self.bytes_out + sum(d["bytes"] for d in self.dropped.values()), out
        return out


class Quarantine:
    """Collects unreadable lines; writes them as JSON lines to ``path`` (if given) on close."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else None
        self.rows: list[dict] = []
        self.counts: Counter[str] = Counter()

    def add(self, file: Path, line: int, reason: str, raw: bytes) -> None:
        self.counts[reason] += 1
        self.rows.append({"file": str(file), "line": line, "reason": reason,
                          "raw": raw.decode("utf-8", errors="replace")[:RAW_KEEP]})

    def close(self) -> None:
        if self.path is not None:
            from hone.rundir import write_jsonl

            write_jsonl(self.path, self.rows)


def _open(path: Path) -> IO[bytes]:
    if not path.exists():
        raise HoneError(f"{path}: input file not found")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.suffix in (".zst", ".parquet", ".arrow"):
        raise HoneError(f"{path}: only JSON-lines input (.jsonl or .jsonl.gz) is read by this version")
    return open(path, "rb")


def _file_stem(path: Path) -> str:
    name = path.name
    for ext in (".gz", ".jsonl", ".json", ".ndjson"):
        name = name.removesuffix(ext)
    return name


def parse_line(raw: bytes, text_field: str) -> dict | str:
    """The parsed object, or the reason it is unreadable."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bad_utf8"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return "bad_json"
    if not isinstance(obj, dict):
        return "not_an_object"
    if text_field not in obj:
        return "missing_text"
    if not isinstance(obj[text_field], str):
        return "text_not_a_string"
    return obj


def to_record(obj: dict, text_field: str, stem: str, lineno: int) -> dict:
    """Split a parsed line into the record fields; everything else goes into ``meta``."""
    rest = {k: v for k, v in obj.items() if k not in (text_field, "id", "source", "meta")}
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else ({"meta": obj["meta"]} if "meta" in obj else {})
    rid = obj.get("id")
    return {"id": str(rid) if rid is not None and rid != "" else f"{stem}:{lineno}",
            "text": obj[text_field],
            "source": str(obj.get("source") or stem),
            "meta": {**meta, **rest}}


def read_jsonl(paths: Iterable[Path], text_field: str = "text", quarantine: Quarantine | None = None,
               stats: StepStats | None = None) -> Iterator[dict]:
    """Stream records from JSON-lines files (``.jsonl`` or ``.jsonl.gz``), in file and line order.

    Blank lines are skipped (they are not documents). Without a ``quarantine`` the first
    unreadable line is an error naming file and line. ``stats`` counts lines and raw bytes.
    """
    for path in map(Path, paths):
        stem = _file_stem(path)
        with _open(path) as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                obj = parse_line(raw.rstrip(b"\r\n"), text_field)
                if isinstance(obj, str):
                    if quarantine is None:
                        raise HoneError(f"{path}:{lineno}: unreadable line ({obj})")
                    quarantine.add(path, lineno, obj, raw.rstrip(b"\r\n"))
                    if stats is not None:
                        stats.drop(obj, len(raw))
                    continue
                if stats is not None:
                    stats.keep(len(raw))
                yield to_record(obj, text_field, stem, lineno)
