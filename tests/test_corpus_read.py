"""Reading JSON lines: unreadable lines are quarantined with file, line and reason, and counted."""

import gzip
import json

import pytest

from hone.corpus.read import Quarantine, StepStats, read_inputs
from hone.errors import HoneError


def _write(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_lines_go_to_quarantine_with_file_and_line(tmp_path):
    f = _write(tmp_path / "web.jsonl", [
        json.dumps({"id": "a", "text": "good one"}).encode(),
        b"{not json",
        b'{"text": "caf\xe9"}',          # latin-1 byte: bad UTF-8
        b"[1, 2]",                        # not an object
        b'{"body": "no text field"}',
        b'{"text": 42}',
        b"",                              # blank lines are not documents
        json.dumps({"text": "second good", "lang": "en"}).encode(),
    ])
    q, stats = Quarantine(tmp_path / "q" / "quarantine.jsonl"), StepStats()
    docs = list(read_inputs([f], quarantine=q, stats=stats))
    q.close()
    assert [d["id"] for d in docs] == ["a", f"{f}:8"]  # no id: the file as given, and its line
    rows = [json.loads(ln) for ln in (tmp_path / "q" / "quarantine.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rows] == [
        (2, "bad_json"), (3, "bad_utf8"), (4, "not_an_object"), (5, "missing_text"), (6, "text_not_a_string")]
    assert all(r["file"] == str(f) for r in rows)
    d = stats.as_dict()
    assert (d["docs_in"], d["docs_out"]) == (7, 2)
    assert sum(v["docs"] for v in d["quarantined"].values()) == 5  # unreadable lines are quarantined, not dropped


def test_record_fields_defaults_and_meta(tmp_path):
    f = _write(tmp_path / "mine.jsonl.gz", [])
    with gzip.open(f, "wt") as g:
        g.write(json.dumps({"body": "hello there", "source": "web", "meta": {"url": "u"}, "lang": "en"}) + "\n")
        g.write(json.dumps({"id": 7, "body": "second"}) + "\n")
    docs = list(read_inputs([f], text_field="body"))
    assert docs[0] == {"id": f"{f}:1", "text": "hello there", "source": "web", "meta": {"url": "u", "lang": "en"},
                       "src_file": str(f), "src_row": 1}  # and where it came from
    assert docs[1]["id"] == "7" and docs[1]["source"] == "mine"


def test_without_quarantine_a_bad_line_is_an_error_naming_it(tmp_path):
    f = _write(tmp_path / "x.jsonl", [b'{"text": "ok"}', b"oops"])
    with pytest.raises(HoneError, match=r"x.jsonl:2: unreadable input \(bad_json\)"):
        list(read_inputs([f]))


def test_missing_input_file(tmp_path):
    with pytest.raises(HoneError, match="not found"):
        list(read_inputs([tmp_path / "nope.jsonl"]))
