"""The corpus writer: Parquet shards ``corpus/part-NNNNN.parquet``, each written atomically.

Columns: ``id, text, source, domain, meta`` (JSON string) and ``domain_score``. Shards
left over from an earlier run with more shards are removed, so the directory always
holds exactly one corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

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
