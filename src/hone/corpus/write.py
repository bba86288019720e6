"""The corpus writer: Parquet shards ``corpus/part-NNNNN.parquet``, each written atomically.

Columns: ``id, text, source, domain, meta`` (JSON string) and ``domain_score``. Shards
left over from an earlier run with more shards are removed, so the directory always
holds exactly one corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hone.rundir import atomic_path

ROWS_PER_SHARD = 100_000
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()),
                    ("domain", pa.string()), ("meta", pa.string()), ("domain_score", pa.float64())])


def _table(docs: list[dict]) -> pa.Table:
    cols = {
        "id": [d["id"] for d in docs],
        "text": [d["text"] for d in docs],
        "source": [d["source"] for d in docs],
        "domain": [d.get("domain") for d in docs],
        "meta": [json.dumps(d.get("meta") or {}, ensure_ascii=False, sort_keys=True) for d in docs],
        "domain_score": [float(d.get("domain_score", 0.0)) for d in docs],
    }
    return pa.table(cols, schema=SCHEMA)


def write_corpus(docs: list[dict], corpus_dir: Path, rows_per_shard: int = ROWS_PER_SHARD) -> list[Path]:
    """Write ``docs`` as Parquet shards in ``corpus_dir``; return the shard paths."""
    corpus_dir = Path(corpus_dir)
    corpus_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, start in enumerate(range(0, max(len(docs), 1), rows_per_shard)):
        path = corpus_dir / f"part-{n:05d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(_table(docs[start:start + rows_per_shard]), tmp, compression="zstd")
        paths.append(path)
    for stale in set(corpus_dir.glob("part-*.parquet")) - set(paths):
        stale.unlink()
    return paths


def read_corpus_table(corpus_dir: Path) -> pa.Table:
    """All shards of a corpus as one table (tests, small corpora)."""
    return pa.concat_tables(pq.read_table(p) for p in sorted(Path(corpus_dir).glob("part-*.parquet")))


# --- streaming shard writer with provenance ----------------------------------------------

BASE_COLUMNS = ("id", "text", "source", "domain", "meta", "src_file", "src_row")
BASE_TYPES = {"id": pa.string(), "text": pa.string(), "source": pa.string(), "domain": pa.string(),
              "meta": pa.string(), "src_file": pa.string(), "src_row": pa.int64()}


def record_columns(docs: list[dict]) -> list[str]:
    """The base columns, then every score column a step added (keys not starting with '_')."""
    extra: dict[str, None] = {}
    for d in docs:
        for k in d:
            if k not in BASE_TYPES and not k.startswith("_"):
                extra.setdefault(k)
    return [*BASE_COLUMNS, *extra]


def records_table(docs: list[dict], schema: pa.Schema | None = None) -> pa.Table:
    """Records as an Arrow table: ``meta`` as a JSON string, provenance as ``src_file``/``src_row``."""
    names = schema.names if schema is not None else record_columns(docs)
    arrays = []
    for name in names:
        values = [d.get(name) for d in docs]
        if name == "meta":
            values = [json.dumps(v or {}, ensure_ascii=False, sort_keys=True) for v in values]
        want = schema.field(name).type if schema is not None else BASE_TYPES.get(name)
        arrays.append(arrow_column(values, want))
    if schema is not None:
        return pa.Table.from_arrays(arrays, schema=schema)
    return pa.Table.from_arrays(arrays, names=names)


# Why not pa.array: on a Python list it asks pandas whether the list is "array-like", and
# the first such question imports pandas (about 0.5 s in every worker process that writes a
# shard). Building the buffers ourselves is as fast and never touches pandas.

def _kind(values: list) -> pa.DataType | None:
    """The type pa.array would infer for plain str / int / float / bool values (None: other)."""
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return pa.null()
    if kinds == {str}:
        return pa.string()
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {int}:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    return None


def _validity(values: list) -> tuple[pa.Buffer | None, int]:
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    nulls = len(values) - int(valid.sum())
    return (pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None), nulls


def arrow_column(values: list, type: pa.DataType | None = None) -> pa.Array:
    """``pa.array(values, type)`` for str / int / float / bool columns, without pandas."""
    kind = _kind(values)
    type = type or kind
    n = len(values)
    try:
        if kind == pa.null():
            return pa.nulls(n, type or pa.null())
        if type == pa.string() and kind == pa.string():
            encoded = [b"" if v is None else v.encode("utf-8") for v in values]
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=n), out=offsets[1:])
            if offsets[-1] < 2**31:
                valid, nulls = _validity(values)
                return pa.Array.from_buffers(type, n, [valid, pa.py_buffer(offsets.astype(np.int32)),
                                                       pa.py_buffer(b"".join(encoded))], null_count=nulls)
        elif type in (pa.int64(), pa.float64()) and kind in (pa.int64(), pa.float64()):
            if type == pa.int64() and kind == pa.float64():
                raise TypeError  # let pyarrow say what it says about floats in an int column
            dtype = np.int64 if type == pa.int64() else np.float64
            data = np.fromiter((0 if v is None else v for v in values), dtype=dtype, count=n)
            valid, nulls = _validity(values)
            return pa.Array.from_buffers(type, n, [valid, pa.py_buffer(data)], null_count=nulls)
        elif type == pa.bool_() and kind == pa.bool_():
            bits = np.packbits(np.fromiter((bool(v) for v in values), dtype=bool, count=n), bitorder="little")
            valid, nulls = _validity(values)
            return pa.Array.from_buffers(type, n, [valid, pa.py_buffer(bits)], null_count=nulls)
    except (TypeError, OverflowError, UnicodeEncodeError):
        pass
    return pa.array(values, type=type)  # anything else: pyarrow's own conversion (and its errors)


class ShardWriter:
    """Writes one Parquet shard batch by batch (flat memory); the file appears atomically on close."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, docs: list[dict]) -> None:
        if not docs:
            return
        if self._writer is None:
            table = records_table(docs)
            # A column that is null in the first batch gets a type from a later one only if we
            # guess it now; score columns are numbers or strings, so default nulls to float64.
            table = table.cast(pa.schema([f.with_type(pa.float64()) if pa.types.is_null(f.type) else f
                                          for f in table.schema]))
            self._writer = pq.ParquetWriter(self._tmp, table.schema, compression="zstd")
        else:
            table = records_table(docs, self._writer.schema)
        self._writer.write_table(table)
        self.rows += len(docs)

    def close(self) -> Path:
        if self._writer is None:  # an empty shard is still a valid (empty) Parquet file
            pq.write_table(records_table([], pa.schema([(n, BASE_TYPES[n]) for n in BASE_COLUMNS])), self._tmp)
        else:
            self._writer.close()
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)
