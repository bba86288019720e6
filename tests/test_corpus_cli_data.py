"""`hone data dedup / retrieve / build`: outputs, manifests, one-line errors, exit codes."""

import json

import pyarrow.parquet as pq
from typer.testing import CliRunner

from hone.cli import app

BIO = ["The enzyme catalyzes the phosphorylation of a protein substrate inside the cell membrane.",
       "Gene expression is controlled by transcription factors binding to promoter DNA sequences.",
       "Ribosomes translate messenger RNA into a chain of amino acids forming a new protein."]
GEN = ["The river flows through the valley past the old stone bridge into the sea at dawn.",
       "Parliament passed the budget after a long debate about taxes and new roads in the north.",
       "The orchestra played a symphony by Beethoven in the concert hall last night for us."]


def _pool(tmp_path):
    rows = [{"text": t} for t in BIO + GEN] + [{"text": BIO[0].upper() + "!"}, {"text": "x"}]
    f = tmp_path / "pool.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    return f


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _manifest(out):
    m = json.loads((out / ".hone" / "manifest.json").read_text())
    t = m["totals"]
    assert t["docs_in"] == t["kept"] + t["dropped"] + t["quarantined"]
    return m


def test_dedup_command(tmp_path):
    r = _run("data", "dedup", _pool(tmp_path), "-o", tmp_path / "out", "--threshold", "0.8", "--ngram", "5",
             "--num-perm", "64", "--cluster-column")
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].startswith("dedup: 9 in, 7 kept, 1 dropped, 1 quarantined")
    m = _manifest(tmp_path / "out")
    assert m["steps"]["dedup"]["dropped"]["near_duplicate"]["docs"] == 1
    t = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert {"src_file", "src_row", "dup_cluster"} <= set(t.column_names)
    assert (tmp_path / "out" / ".hone" / "quarantine" / "quarantine.jsonl").exists()


def test_retrieve_command_and_llm_needs_endpoint(tmp_path, monkeypatch):
    pool = _pool(tmp_path)
    r = _run("data", "retrieve", pool, "-o", tmp_path / "out", "--query", "protein", "--query", "gene RNA",
             "--top-k", "3", "--expand", "none")
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()
    assert len(rows) == 3 and all(x["domain"] == "domain" for x in rows)
    assert _manifest(tmp_path / "out")["steps"]["retrieve"]["dropped"]["not_retrieved"]["docs"] == 5
    monkeypatch.delenv("HONE_LLM_URL", raising=False)
    ex = tmp_path / "ex.txt"
    ex.write_text(BIO[1] + "\n\n" + BIO[2])
    r = _run("data", "retrieve", pool, "-o", tmp_path / "o2", "--examples", ex, "--expand", "llm")
    assert r.exit_code != 0 and "HONE_LLM_URL" in str(r.exception or r.output)


def test_nothing_usable_exits_nonzero(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text("{no\n[1]\n")
    r = _run("data", "dedup", f, "-o", tmp_path / "out")
    assert r.exit_code == 1 and "no usable document" in r.output


def test_build_runs_steps_in_order(tmp_path):
    pool = _pool(tmp_path)
    recipe = tmp_path / "build.toml"
    recipe.write_text(f"""
[build]
inputs = ["{tmp_path}/*.jsonl"]
output = "{tmp_path / 'built'}"
workers = 1

[[steps]]
type = "filter"
min_words = 3

[[steps]]
type = "dedup"
threshold = 0.8

[[steps]]
type = "retrieve"
query = ["protein", "gene"]
top_k = 2
""")
    r = _run("data", "build", recipe)
    assert r.exit_code == 0, r.output
    m = _manifest(tmp_path / "built")
    assert m["totals"] == {"docs_in": 9, "kept": 2, "dropped": 6, "quarantined": 1,
                           "bytes_in": m["totals"]["bytes_in"], "bytes_out": m["totals"]["bytes_out"]}
    assert list(m["steps"]) == ["01-filter/read", "01-filter/filter", "02-dedup/dedup", "03-retrieve/retrieve"]
    assert pool.exists()


def test_build_errors_are_one_line(tmp_path):
    recipe = tmp_path / "b.toml"
    recipe.write_text('[build]\ninputs = ["x"]\noutput = "o"\n[[steps]]\ntype = "dedup"\nthreshold = 1.5\n')
    r = _run("data", "build", recipe)
    assert r.exit_code != 0 and "steps.0.dedup.threshold" in str(r.exception)


def test_subcommands_are_the_documented_ones():
    r = _run("data", "--help")
    for cmd in ("pool", "curate", "dedup", "retrieve", "build"):
        assert cmd in r.output
