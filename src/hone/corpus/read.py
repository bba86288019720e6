"""Reading inputs into records, and the per-step counts every step keeps.

A record is ``{"id": str, "text": str, "source": str, "meta": dict}``. A line that cannot
become a record (bad UTF-8, bad JSON, not an object, no string text field) is never
silently lost: it goes to the quarantine with its file, line number and reason.

``expand_inputs`` + ``read_shard`` (or ``read_inputs``) read every supported format,
streaming, one input shard at a time:

- JSON lines: ``.jsonl``/``.json``/``.ndjson``, optionally ``.gz`` or ``.zst`` compressed;
- Parquet (``.parquet``), e.g. the output of another ``hone data`` command;
- Arrow IPC (``.arrow``) and Hugging Face ``save_to_disk`` directories (``state.json`` /
  ``dataset_info.json`` beside the Arrow files; ``dataset_dict.json`` for several splits);
- plain text: a ``.txt`` / ``.md`` / ``.rst`` file, or a directory of them, is one document per file.

Records from ``read_shard`` also carry provenance: ``src_file`` and ``src_row`` (1-based
line for JSON lines, 0-based row for Parquet / Arrow, 0 for a text file); Parquet inputs
that already have them keep the original ones. An unreadable or empty file is quarantined
as one entry (line 0).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from hone.errors import HoneError
from hone.rundir import parts_manifest, write_jsonl

RAW_KEEP = 2000  # characters of a quarantined line kept for the audit file
MAX_DOC_BYTES = 16 << 20  # longer documents are quarantined (too_large): no tokenizer wants them


@dataclass
class StepStats:
    """Docs and bytes in, kept, and dropped per reason, for one step of the manifest."""

    docs_in: int = 0
    bytes_in: int = 0
    docs_out: int = 0
    bytes_out: int = 0
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    quarantined: dict[str, dict[str, int]] = field(default_factory=dict)

    def keep(self, nbytes: int) -> None:
        self.docs_in, self.bytes_in = self.docs_in + 1, self.bytes_in + nbytes
        self.docs_out, self.bytes_out = self.docs_out + 1, self.bytes_out + nbytes

    def drop(self, reason: str, nbytes: int) -> None:
        self.docs_in, self.bytes_in = self.docs_in + 1, self.bytes_in + nbytes
        d = self.dropped.setdefault(reason, {"docs": 0, "bytes": 0})
        d["docs"] += 1
        d["bytes"] += nbytes

    def quarantine(self, reason: str, nbytes: int, docs: int = 1) -> None:
        """Count input that never became a document (kept apart from a step's drops)."""
        self.docs_in, self.bytes_in = self.docs_in + docs, self.bytes_in + nbytes
        d = self.quarantined.setdefault(reason, {"docs": 0, "bytes": 0})
        d["docs"] += docs
        d["bytes"] += nbytes

    def merge(self, other: "StepStats | dict") -> None:
        """Add another shard's counts (a StepStats or its ``as_dict``)."""
        o = other.as_dict() if isinstance(other, StepStats) else other
        for key in ("docs_in", "docs_out", "bytes_in", "bytes_out"):
            setattr(self, key, getattr(self, key) + o[key])
        for name in ("dropped", "quarantined"):
            mine = getattr(self, name)
            for reason, d in o.get(name, {}).items():
                m = mine.setdefault(reason, {"docs": 0, "bytes": 0})
                m["docs"] += d["docs"]
                m["bytes"] += d["bytes"]

    def as_dict(self) -> dict:
        out = {"docs_in": self.docs_in, "docs_out": self.docs_out, "bytes_in": self.bytes_in,
               "bytes_out": self.bytes_out, "dropped": dict(sorted(self.dropped.items()))}
        if self.quarantined:
            out["quarantined"] = dict(sorted(self.quarantined.items()))
        gone = [*self.dropped.values(), *self.quarantined.values()]
        assert self.docs_in == self.docs_out + sum(d["docs"] for d in gone), out
        assert self.bytes_in == self.bytes_out + sum(d["bytes"] for d in gone), out
        return out


class Quarantine:
    """Collects unreadable lines; writes them as JSON lines to ``path`` (if given) on close."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else None
        self.rows: list[dict] = []
        self.counts: Counter[str] = Counter()

    def add(self, file: Path, line: int, reason: str, raw: bytes, docs: int = 1) -> None:
        self.counts[reason] += docs
        self.rows.append({"file": str(file), "line": line, "reason": reason,
                          "raw": raw[:RAW_KEEP * 4].decode("utf-8", errors="replace")[:RAW_KEEP]})

    def close(self) -> None:
        if self.path is not None:
            write_jsonl(self.path, self.rows)


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
    if b"\\u" in raw and _SURROGATE_ESCAPE.search(raw) and not _encodable(obj):
        return "bad_utf8"  # valid JSON, but a lone surrogate escape (\ud800) is no UTF-8 text
    return obj


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _encodable(obj: dict) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def to_record(obj: dict, text_field: str, stem: str, lineno: int, id_prefix: str | None = None) -> dict:
    """Split a parsed line into the record fields; everything else goes into ``meta``. A record
    without an id gets ``ID_PREFIX:LINE`` (default: the file's stem)."""
    rest = {k: v for k, v in obj.items() if k not in (text_field, "id", "source", "meta")}
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else ({"meta": obj["meta"]} if "meta" in obj else {})
    rid = obj.get("id")
    return {"id": str(rid) if rid is not None and rid != "" else f"{id_prefix or stem}:{lineno}",
            "text": obj[text_field],
            "source": str(obj.get("source") or stem),
            "meta": {**meta, **rest}}


# --- every format, one shard at a time ---------------------------------------------------

JSONL_EXTS = (".jsonl", ".json", ".ndjson")
HF_MARKERS = ("state.json", "dataset_info.json")
PROVENANCE = ("src_file", "src_row")
RECORD_KEYS = ("id", "text", "source", "meta", "domain", *PROVENANCE)


@dataclass(frozen=True)
class Shard:
    """One input file and how to read it: ``jsonl``, ``parquet``, ``arrow`` or ``txt``; for a
    large plain JSON-lines file, a byte range of whole lines (``split_large``)."""

    path: Path
    kind: str
    start: int = 0  # first byte of the range (a line start)
    end: int | None = None  # one past its last byte (a line end); None: the whole file
    first_line: int = 1  # line number of the range's first line in the file

    @property
    def stem(self) -> str:
        name = self.path.name
        for ext in (".gz", ".zst", *JSONL_EXTS, ".parquet", ".arrow", ".txt"):
            name = name.removesuffix(ext)
        return name


TEXT_EXTS = (".txt", ".text", ".md", ".rst")  # one document per file


def file_kind(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz").removesuffix(".zst")
    if name.endswith(JSONL_EXTS):
        return "jsonl"
    for kind in ("parquet", "arrow"):
        if name.endswith("." + kind) and name == path.name.lower():
            return kind
    if name.endswith(TEXT_EXTS) and name == path.name.lower():
        return "txt"
    return None


def _hf_arrow_files(d: Path) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` directory, in the order ``state.json`` lists them."""
    state = d / "state.json"
    if state.exists():
        try:
            files = [d / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
            if all(f.exists() for f in files):
                return files
        except (ValueError, KeyError, TypeError, OSError):
            pass  # a damaged state.json: fall back to the files themselves
    return sorted(d.glob("*.arrow"))


def _dir_shards(d: Path) -> list[Shard]:
    if (d / "dataset_dict.json").exists():  # DatasetDict.save_to_disk: one subdirectory per split
        try:
            splits = json.loads((d / "dataset_dict.json").read_text())["splits"]
        except (ValueError, KeyError, TypeError, OSError):
            splits = sorted(p.name for p in d.iterdir() if p.is_dir())
        return [s for split in splits for s in _dir_shards(d / split)]
    if any((d / m).exists() for m in HF_MARKERS):
        return [Shard(p, "arrow") for p in _hf_arrow_files(d)]
    if parts_manifest(d).exists():  # another hone command's output (manifest in .hone/, or beside in older ones)
        return [Shard(p, "parquet") for p in nonempty_parts(sorted(d.glob("part-*.parquet")))]
    shards = []
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for name in sorted(files):
            p = Path(root) / name
            if not name.startswith(".") and (kind := file_kind(p)) is not None:
                shards.append(Shard(p, kind))
    return shards


def nonempty_parts(paths: Iterable[Path]) -> list[Path]:
    """The Parquet shards of a hone output that hold rows. A step writes one shard per input
    shard, empty when nothing survived; read again, an empty one is no input (not a
    quarantined "empty file" that the next step's manifest would count as a document)."""
    out = []
    for p in map(Path, paths):
        try:
            if pq.ParquetFile(p).metadata.num_rows == 0:
                continue
        except (OSError, ValueError):
            pass  # unreadable: let the reader quarantine it
        out.append(p)
    return out


SPLIT_BYTES = 16 << 20  # plain JSON-lines files above 1.5x this are read as several shards


def split_large(shards: list[Shard]) -> list[Shard]:
    """Plain (uncompressed) JSON-lines files larger than 1.5 x ``SPLIT_BYTES`` become byte
    ranges of about ``SPLIT_BYTES`` cut at line ends, so one big file keeps every worker
    busy. The ranges depend on the file only (never on the worker count): outputs are the
    same wherever they run. Their records are those of the whole file, line numbers and
    default ids included; finding the cuts reads the file once."""
    out = []
    for sh in shards:
        name = sh.path.name.lower()
        try:
            size = sh.path.stat().st_size
        except OSError:
            size = 0  # unreadable: the reader quarantines it
        if sh.kind != "jsonl" or name.endswith((".gz", ".zst")) or sh.end is not None or size <= SPLIT_BYTES * 3 // 2:
            out.append(sh)
            continue
        out += _byte_ranges(sh, size)
    return out


def _byte_ranges(sh: Shard, size: int) -> list[Shard]:
    ranges, start, line = [], 0, 1
    with open(sh.path, "rb") as f:
        while start < size:
            f.seek(min(start + SPLIT_BYTES, size))
            f.readline()  # to the end of the line the target falls in
            end = size if size - f.tell() < SPLIT_BYTES // 2 else f.tell()
            ranges.append(Shard(sh.path, sh.kind, start, end, line))
            f.seek(start)
            left = end - start
            while left > 0:  # line numbers: count the range's newlines
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                line += chunk.count(b"\n")
                left -= len(chunk)
            start = end
    return ranges


def expand_inputs(paths: Iterable[Path | str]) -> list[Shard]:
    """The input shards behind files and directories, in a fixed order.

    A path that does not exist, has an unknown extension, or a directory with nothing to
    read is a HoneError: that is a mistake on the command line, not bad data.
    """
    shards: list[Shard] = []
    for path in map(Path, paths):
        if not path.exists():
            raise HoneError(f"{path}: input not found")
        if path.is_dir():
            found = _dir_shards(path)
            if not found:
                raise HoneError(f"{path}: no .jsonl[.gz|.zst], .parquet, .arrow or .txt/.md/.rst files in this "
                                f"directory")
            shards += found
        elif (kind := file_kind(path)) is not None:
            shards.append(Shard(path, kind))
        else:
            raise HoneError(f"{path}: unknown input format (expected .jsonl[.gz|.zst], .parquet, .arrow, .txt/.md/.rst "
                            f"or a directory)")
    return split_large(shards)


class _Reader:
    """Turns one shard into records; quarantines what cannot become one."""

    def __init__(self, shard: Shard, text_field: str, quarantine: Quarantine | None, stats: StepStats | None,
                 max_doc_bytes: int):
        self.shard, self.text_field, self.q, self.stats = shard, text_field, quarantine, stats
        self.max_doc_bytes = max_doc_bytes
        self.stem = shard.stem  # once per shard, not per record
        # Records without an id are named by their file's path and line / row: two files of one
        # name in different directories (2023/part-0.jsonl, 2024/part-0.jsonl) must not collide.
        self.id_prefix = str(shard.path)

    def bad(self, row: int, reason: str, raw: bytes, nbytes: int | None = None, docs: int = 1) -> None:
        if self.q is None:
            raise HoneError(f"{self.shard.path}:{row}: unreadable input ({reason})")
        self.q.add(self.shard.path, row, reason, raw, docs)
        if self.stats is not None:
            self.stats.quarantine(reason, len(raw) if nbytes is None else nbytes, docs)

    def good(self, rec: dict, nbytes: int) -> dict | None:
        if len(rec["text"]) * 4 > self.max_doc_bytes and len(rec["text"].encode("utf-8")) > self.max_doc_bytes:
            self.bad(rec["src_row"], "too_large", rec["text"][:RAW_KEEP].encode("utf-8"), nbytes)
            return None
        if self.stats is not None:
            self.stats.keep(nbytes)
        return rec


def _open_stream(path: Path) -> IO[bytes]:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged or unreadable file raises: the file's fault, not a bug here."""

    return OSError, EOFError, ValueError, zlib.error, zstandard.ZstdError


def _ranged_lines(sh: Shard) -> Iterator[bytes]:
    """The lines of a byte range (it starts and ends at line boundaries)."""
    with open(sh.path, "rb") as f:
        f.seek(sh.start)
        left = sh.end - sh.start
        for raw in f:
            if left <= 0:
                return
            left -= len(raw)
            yield raw


def _read_jsonl_shard(r: _Reader) -> Iterator[dict]:
    path, lineno, seen = r.shard.path, r.shard.first_line - 1, False
    try:
        with (_open_stream(path) if r.shard.end is None else contextlib.nullcontext(_ranged_lines(r.shard))) as f:
            for lineno, raw in enumerate(f, start=r.shard.first_line):
                seen = True
                if not raw.strip():
                    continue
                raw = raw.rstrip(b"\r\n")
                obj = parse_line(raw, r.text_field)
                if isinstance(obj, str):
                    r.bad(lineno, obj, raw)
                    continue
                rec = to_record(obj, r.text_field, r.stem, lineno, r.id_prefix)
                rec.update(src_file=str(path), src_row=lineno)
                if (rec := r.good(rec, len(raw))) is not None:
                    yield rec
    except _read_errors() as e:  # corrupt gzip / zstd, permission denied, ...
        r.bad(lineno + 1 if seen else 0, "unreadable_file", f"{type(e).__name__}: {e}".encode(), 0)
        return
    if not seen:
        r.bad(0, "empty_file", b"", 0)


def _read_txt_shard(r: _Reader) -> Iterator[dict]:
    path = r.shard.path
    try:
        raw = path.read_bytes()
    except OSError as e:
        r.bad(0, "unreadable_file", f"{type(e).__name__}: {e}".encode(), 0)
        return
    if not raw.strip():
        r.bad(0, "empty_file", raw, len(raw))
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        r.bad(0, "bad_utf8", raw, len(raw))
        return
    # The path, not the file name: a tree of docs has an index.rst / README.md in many directories.
    rec = {"id": str(path), "text": text, "source": path.parent.name or r.shard.stem, "meta": {},
           "src_file": str(path), "src_row": 0}
    if (rec := r.good(rec, len(raw))) is not None:
        yield rec


def _table_batches(r: _Reader) -> Iterator["object"]:
    path = r.shard.path
    if r.shard.kind == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=1024)
        return
    source = pa.memory_map(str(path))
    try:  # datasets writes the IPC stream format; plain Arrow files use the file format
        reader = pa.ipc.open_stream(source)
        yield from reader
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def _row_record(row: dict, r: _Reader, n: int) -> dict:
    meta = row.get("meta")
    if meta == "{}":  # what our writer stores for no meta: skip the parser
        meta = {}
    elif isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = {"meta": meta}
    meta = meta if isinstance(meta, dict) else ({} if meta is None else {"meta": meta})
    rec = {"id": str(row["id"]) if row.get("id") not in (None, "") else f"{r.id_prefix}:{n}",
           "text": row[r.text_field], "source": str(row.get("source") or r.shard.stem), "meta": meta,
           "src_file": row.get("src_file") or str(r.shard.path),
           "src_row": row["src_row"] if row.get("src_file") and row.get("src_row") is not None else n}
    if row.get("domain") is not None:
        rec["domain"] = row["domain"]
    for key, value in row.items():  # scores added by earlier steps (dup_cluster, quality, ...)
        if key not in RECORD_KEYS and key != r.text_field and not isinstance(value, (dict, list, bytes)):
            rec[key] = value
    return rec


def _read_table_shard(r: _Reader) -> Iterator[dict]:
    n, seen = 0, False
    try:
        for batch in _table_batches(r):
            if r.text_field not in batch.schema.names:
                r.bad(0, "missing_text", f"columns: {batch.schema.names}".encode(), 0, max(batch.num_rows, 1))
                return
            cols = batch.to_pydict()  # column by column: much faster than to_pylist's row dicts
            names = list(cols)
            for values in zip(*cols.values()):
                row = dict(zip(names, values))
                seen = True
                text = row[r.text_field]
                if not isinstance(text, str):
                    r.bad(n, "missing_text" if text is None else "text_not_a_string", repr(text).encode(), 0)
                else:
                    if (rec := r.good(_row_record(row, r, n), len(text.encode("utf-8")))) is not None:
                        yield rec
                n += 1
    except (OSError, ValueError, EOFError) as e:  # pyarrow errors derive from these
        r.bad(n, "unreadable_file", f"{type(e).__name__}: {e}".encode(), 0)
        return
    if not seen:
        r.bad(0, "empty_file", b"", 0)


_READERS = {"jsonl": _read_jsonl_shard, "txt": _read_txt_shard, "parquet": _read_table_shard,
            "arrow": _read_table_shard}


def read_shard(shard: Shard, text_field: str = "text", quarantine: Quarantine | None = None,
               stats: StepStats | None = None, max_doc_bytes: int = MAX_DOC_BYTES) -> Iterator[dict]:
    """Stream the records of one shard, in row order; quarantine (or, without a quarantine,
    raise on) whatever cannot become a record."""
    yield from _READERS[shard.kind](_Reader(shard, text_field, quarantine, stats, max_doc_bytes))


def read_inputs(paths: Iterable[Path | str], text_field: str = "text", quarantine: Quarantine | None = None,
                stats: StepStats | None = None, max_doc_bytes: int = MAX_DOC_BYTES) -> Iterator[dict]:
    """Stream the records of every input (files or directories, any supported format)."""
    for shard in expand_inputs(paths):
        yield from read_shard(shard, text_field, quarantine, stats, max_doc_bytes)


def batched(docs: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Group a stream into lists of at most ``size`` (memory stays flat with corpus size)."""
    batch: list[dict] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


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
