"""Bad input through the real commands: every kind of unreadable input is quarantined with
its file and line and counted, the summary is one line, the exit is non-zero only when
nothing usable was read, never a traceback; `in == kept + dropped + quarantined` everywhere."""

import gzip
import json
import os

import pytest
from typer.testing import CliRunner

from hone.cli import app

GOOD = [f"Document {i} is about rivers, proteins and the history of the cell membrane, in plain words."
        for i in range(12)]
# reason -> (file, line) of every bad input written by _bad_dir
EXPECTED = {
    ("a.jsonl", 3): "bad_json", ("a.jsonl", 4): "not_an_object", ("a.jsonl", 5): "missing_text",
    ("a.jsonl", 6): "text_not_a_string", ("a.jsonl", 7): "bad_utf8", ("a.jsonl", 12): "bad_utf8",
    ("notes.txt", 0): "bad_utf8", ("broken.jsonl", 0): "unreadable_file", ("corrupt.jsonl.gz", 0): "unreadable_file",
    ("empty.jsonl", 0): "empty_file", ("huge.jsonl", 1): "too_large",
}


def _bad_dir(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    lines = [json.dumps({"text": t}).encode() for t in GOOD[:6]]
    lines[2:2] = [b'{"text": "unterminated', b"[1, 2, 3]", b'{"body": "no text field"}', b'{"text": 42}',
                  b'{"text": "a lone surrogate \\ud800 escape is valid JSON but no UTF-8 text"}']
    lines += [b'{"text": "invalid utf-8 \xff\xfe bytes"}', b""]  # line 12, then a blank line (no document)
    (d / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (d / "empty.jsonl").write_bytes(b"")
    with open(d / "huge.jsonl", "w") as f:  # one document over the 16 MB limit, then three good ones
        f.write(json.dumps({"text": "word " * (17 << 18)}) + "\n")
        f.writelines(json.dumps({"text": t}) + "\n" for t in GOOD[6:9])
    (d / "corrupt.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00not gzip at all")
    os.symlink(tmp_path / "missing.jsonl", d / "broken.jsonl")  # unreadable (root reads any mode)
    (d / "notes.txt").write_bytes(b"\xff\xfe a text file that is not UTF-8")
    with gzip.open(d / "ok.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in GOOD[9:])
    (tmp_path / "target.txt").write_text("proteins of the cell membrane\n\nhistory of rivers\n")
    return d


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _check(r, out, name, kept, dropped):
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    assert r.exit_code == 0, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"{name}: 23 in, {kept} kept, {dropped} dropped, 11 quarantined (")
    m = json.loads((out / ".hone" / "manifest.json").read_text())
    t = m["totals"]
    assert (t["docs_in"], t["kept"], t["dropped"], t["quarantined"]) == (23, kept, dropped, 11)
    rows = [json.loads(x) for x in (out / ".hone" / "quarantine" / "quarantine.jsonl").read_text().splitlines()]
    assert {(os.path.basename(q["file"]), q["line"]): q["reason"] for q in rows} == EXPECTED
    return m


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    return tmp, _bad_dir(tmp)


@pytest.mark.parametrize("cmd,kept,dropped", [
    (["dedup", "--workers", "1"], 12, 0),
    (["retrieve", "--query", "protein", "--top-k", "3", "--expand", "none"], 3, 9),
    (["dsir", "--target", "{target}", "--k", "3"], 3, 9),
    (["select", "--method", "random", "--max-docs", "3"], 3, 9),
])
def test_every_command_quarantines_and_counts(bad, cmd, kept, dropped):
    tmp, d = bad
    out = tmp / f"out-{cmd[0]}"
    args = [a.format(target=tmp / "target.txt") for a in cmd[1:]]
    _check(_run("data", cmd[0], d, "-o", out, *args), out, cmd[0], kept, dropped)


def test_rate_step_quarantines_and_counts(bad):
    from hone.corpus.steps.rate import rate_step

    class Judge:  # prefers the longer excerpt; confident on every pair
        name = "len"

        def __call__(self, pairs, q):
            import numpy as np

            return np.array([0.9 if len(b) > len(a) else 0.1 for a, b in pairs])

    tmp, d = bad
    m = rate_step([d], tmp / "out-rate", judge_obj=Judge(), pairs=20, heldout=0.2)
    t = m["totals"]
    assert (t["docs_in"], t["kept"], t["dropped"], t["quarantined"]) == (23, 12, 0, 11)


def test_build_counts_each_document_once(bad):
    tmp, d = bad
    recipe = tmp / "build.toml"
    recipe.write_text(f"""
[build]
inputs = ["{d}"]
output = "{tmp / 'built'}"
workers = 1

[[steps]]
type = "filter"
min_words = 3

[[steps]]
type = "dedup"

[[steps]]
type = "dsir"
target = "{tmp / 'target.txt'}"
k = 6

[[steps]]
type = "select"
method = "random"
max_docs = 3
""")
    r = _run("data", "build", recipe)
    m = _check(r, tmp / "built", "build", 3, 9)
    # steps after the first read the previous step's shards; empty ones are no input
    for step in m["step_dirs"][1:]:
        step_dir = tmp / "built" / ".hone" / "steps" / step.split("/")[-1]
        sm = json.loads((step_dir / ".hone" / "manifest.json").read_text())
        assert sm["totals"]["quarantined"] == 0
    assert m["steps"]["02-dedup/dedup"]["docs_in"] == 12 and m["steps"]["03-dsir/dsir"]["docs_in"] == 12
    # another command on a step's output directory skips its empty shards too
    r = _run("data", "dedup", tmp / "built" / ".hone" / "steps" / "01-filter", "-o", tmp / "again", "--workers", "1")
    assert r.exit_code == 0 and r.output.strip().splitlines()[-1].startswith("dedup: 12 in, 12 kept, 0 dropped, 0 "
                                                                             "quarantined")


@pytest.mark.parametrize("cmd", [["dedup"], ["retrieve", "--query", "x"], ["dsir", "--target", "{target}", "--k", "2"],
                                 ["select", "--method", "random", "--max-docs", "2"], ["build"]])
def test_nothing_usable_is_exit_1_without_traceback(tmp_path, cmd):
    d = tmp_path / "allbad"
    d.mkdir()
    (d / "x.jsonl").write_text("{oops\n[]\n")
    (d / "e.jsonl").write_text("")
    (tmp_path / "t.txt").write_text("anything at all here")
    out = tmp_path / "out"
    if cmd == ["build"]:
        (tmp_path / "b.toml").write_text(f'[build]\ninputs = ["{d}"]\noutput = "{out}"\nworkers = 1\n'
                                         '[[steps]]\ntype = "filter"\n[[steps]]\ntype = "dedup"\n')
        r = _run("data", "build", tmp_path / "b.toml")
    else:
        r = _run("data", cmd[0], d, "-o", out, *[a.format(target=tmp_path / "t.txt") for a in cmd[1:]])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert "Traceback" not in r.output and "no usable document" in r.output
    assert "3 in, 0 kept, 0 dropped, 3 quarantined" in r.output
    assert (out / ".hone" / "quarantine" / "quarantine.jsonl").exists()
    assert f"see {out / '.hone' / 'quarantine' / 'quarantine.jsonl'}" in r.output
