"""Every input format reads into the same records, with provenance; bad input is quarantined."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hone.corpus.read import Quarantine, StepStats, expand_inputs, read_inputs
from hone.errors import HoneError

ROWS = [{"id": "a", "body": "first document", "lang": "fr"}, {"id": "b", "body": "second document", "lang": "en"}]


def _read(paths, **kw):
    q, stats = Quarantine(), StepStats()
    docs = list(read_inputs(paths, quarantine=q, stats=stats, **kw))
    return docs, q, stats.as_dict()


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_jsonl_gz_zst_parquet_arrow_agree(tmp_path):
    import zstandard

    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(ROWS)))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(ROWS)))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    hf = tmp_path / "hf"
    hf.mkdir()
    table = pa.Table.from_pylist(ROWS)
    with pa.ipc.new_stream(hf / "data-00000-of-00001.arrow", table.schema) as w:  # datasets' layout
        w.write_table(table)
    (hf / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (hf / "dataset_info.json").write_text("{}")
    for path in ("a.jsonl.gz", "a.jsonl.zst", "a.parquet", "hf"):
        docs, q, stats = _read([tmp_path / path], text_field="body")
        assert [(d["id"], d["text"]) for d in docs] == [("a", "first document"), ("b", "second document")], path
        assert docs[1]["meta"].get("lang") == "en" or docs[1].get("lang") == "en"
        assert docs[0]["src_file"].startswith(str(tmp_path)) and stats["docs_out"] == 2 and not q.rows
    assert [d["src_row"] for d in _read([tmp_path / "a.jsonl.gz"], text_field="body")[0]] == [1, 2]
    assert [d["src_row"] for d in _read([tmp_path / "a.parquet"], text_field="body")[0]] == [0, 1]


def test_txt_directory_one_doc_per_file_and_bad_files(tmp_path):
    d = tmp_path / "txt"
    (d / "sub").mkdir(parents=True)
    (d / "one.txt").write_text("hello world")
    (d / "sub" / "two.txt").write_text("second file")
    (d / "empty.txt").write_text("")
    (d / "latin.txt").write_bytes(b"caf\xe9")
    (d / "skip.bin").write_bytes(b"\x00")
    docs, q, stats = _read([d])
    assert sorted(x["text"] for x in docs) == ["hello world", "second file"]
    assert sorted(r["reason"] for r in q.rows) == ["bad_utf8", "empty_file"]
    assert stats["docs_in"] == 4 and stats["docs_out"] == 2


def test_quarantine_empty_corrupt_huge_missing_field(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(_jsonl(ROWS * 50))[:60])
    (tmp_path / "huge.jsonl").write_bytes(_jsonl([{"text": "x" * 5000}, {"text": "small"}]))
    pq.write_table(pa.Table.from_pylist([{"body": "no text column"}]), tmp_path / "nofield.parquet")
    docs, q, stats = _read(sorted(tmp_path.iterdir()), max_doc_bytes=1000)
    reasons = {(r["file"].rsplit("/", 1)[-1], r["reason"]) for r in q.rows}
    assert ("empty.jsonl", "empty_file") in reasons and ("huge.jsonl", "too_large") in reasons
    assert ("broken.jsonl.gz", "unreadable_file") in reasons and ("nofield.parquet", "missing_text") in reasons
    assert [d["text"] for d in docs] == ["small"]
    gone = sum(v["docs"] for v in stats.get("quarantined", {}).values())
    assert stats["docs_in"] == stats["docs_out"] + gone


def test_expand_inputs_errors_and_output_dirs(tmp_path):
    with pytest.raises(HoneError, match="not found"):
        expand_inputs([tmp_path / "nope.jsonl"])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(HoneError, match="unknown input format"):
        expand_inputs([tmp_path / "x.csv"])
    out = tmp_path / "out"  # another hone command's output: its parts only, not its steps' or audit files
    (out / ".hone" / "steps" / "01-filter").mkdir(parents=True)
    (out / ".hone" / "manifest.json").write_text("{}")
    pq.write_table(pa.Table.from_pylist([{"text": "t"}]), out / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": "s"}]), out / ".hone" / "steps" / "01-filter" / "part-00000.parquet")
    assert [s.path for s in expand_inputs([out])] == [out / "part-00000.parquet"]
    old = tmp_path / "old"  # as an older Hone wrote it: manifest, quarantine/ and step dirs beside the parts
    (old / "quarantine").mkdir(parents=True)
    (old / "01-filter").mkdir(parents=True)
    (old / "manifest.json").write_text("{}")
    (old / "quarantine" / "quarantine.jsonl").write_text("{}\n")
    pq.write_table(pa.Table.from_pylist([{"text": "t"}]), old / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": "s"}]), old / "01-filter" / "part-00000.parquet")
    assert [s.path for s in expand_inputs([old])] == [old / "part-00000.parquet"]


def test_large_jsonl_split_into_byte_ranges_reads_the_same_records(tmp_path, monkeypatch):
    import hone.corpus.read as read_mod
    from hone.corpus.executor import LocalExecutor
    from hone.corpus.steps.dedup import NearDedupConfig, near_dedup

    lines = []
    for i in range(300):
        if i % 37 == 5:
            lines.append(b"{not json")
        elif i % 41 == 7:
            lines.append(b"")
        else:
            text = " ".join(f"w{(i * 7 + k) % 97}" for k in range(5 + i % 23)) if i % 10 else "same text " * 9
            lines.append(json.dumps({"text": text}).encode() + (b"\r" if i % 13 == 0 else b""))
    f = tmp_path / "big.jsonl"
    f.write_bytes(b"\n".join(lines))  # no newline after the last line
    q1, q2 = Quarantine(None), Quarantine(None)
    whole = list(read_inputs([f], quarantine=q1))
    monkeypatch.setattr(read_mod, "SPLIT_BYTES", 1500)
    shards = read_mod.expand_inputs([f])
    assert len(shards) > 5 and shards[0].start == 0 and shards[-1].end == f.stat().st_size
    assert all(a.end == b.start for a, b in zip(shards, shards[1:]))
    split = list(read_inputs([f], quarantine=q2))
    assert split == whole and q1.rows == q2.rows and len(q1.rows) == 8
    # a step over the ranges: one output shard per range, the same documents kept in order
    m = near_dedup([f], tmp_path / "o", NearDedupConfig(), executor=LocalExecutor(2))
    kept = [r["id"] for p in m["shards"] for r in pq.read_table(tmp_path / "o" / p).to_pylist()]
    monkeypatch.setattr(read_mod, "SPLIT_BYTES", 1 << 30)
    m1 = near_dedup([f], tmp_path / "o1", NearDedupConfig(), executor=LocalExecutor(1))
    assert len(m["shards"]) == len(shards) and len(m1["shards"]) == 1
    assert kept == pq.read_table(tmp_path / "o1" / "part-00000.parquet")["id"].to_pylist()
    assert m["totals"] == m1["totals"] and m["totals"]["dropped"] > 0


def test_text_files_of_the_same_name_in_different_directories_are_different_documents(tmp_path):
    """A documentation tree has an index.rst in every directory: none may be lost as a 'duplicate id'."""
    from hone.corpus.read import read_inputs

    for sub in ("a", "b", "c"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "index.rst").write_text(f"The {sub} subsystem documentation index page.\n")
    ids = [d["id"] for d in read_inputs([tmp_path])]
    assert len(ids) == len(set(ids)) == 3
