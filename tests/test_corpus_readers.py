"""Every directory of Parquet parts Hone writes opens with pandas, pyarrow and datasets, and
they read exactly the kept documents once each: the ids Hone itself reads, in its order,
with the same columns. Manifests, markers, audit and work files and the steps' outputs sit
in DIR/.hone/, which all three skip."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hone.cli import app
from hone.corpus.pipeline import curate
from hone.corpus.read import read_inputs
from hone.corpus.runner import unify_parts
from hone.corpus.steps.rate import rate_step
from hone.recipe import CurateConfig, DomainConfig

pd = pytest.importorskip("pandas")
datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

TOPICS = ["protein gene enzyme cell membrane RNA", "river valley bridge sea stone", "budget debate taxes roads"]


def _inputs(d):
    """a.jsonl (the first shard) has no readable line, so a step's first part is empty; b and c
    hold documents, near-copies and one line too short to pass a filter."""
    d.mkdir()
    (d / "a.jsonl").write_text("{broken\n[1, 2]\n")
    for name, topic in (("b", TOPICS[0]), ("c", TOPICS[1] + " " + TOPICS[2])):
        rows = [{"id": f"{name}{i}", "text": f"{topic} document {i} " + " ".join(f"w{name}{i}x{k}" for k in range(12)),
                 "meta": {"label": "bio" if name == "b" else "general"}} for i in range(8)]
        rows += [{"id": f"{name}copy", "text": rows[0]["text"] + " again"}, {"id": f"{name}short", "text": "too short"}]
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d.parent / "target.txt").write_text(TOPICS[0] + "\n\nenzyme kinetics of a protein in the cell")
    return d


class _Judge:  # rate: prefers the longer excerpt, confident on every pair
    name = "len"

    def __call__(self, pairs, q):
        return np.array([0.9 if len(b) > len(a) else 0.1 for a, b in pairs])


def _run(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """name -> a directory of parts, for every hone data command, a build, its steps and a run's corpus/."""
    tmp = tmp_path_factory.mktemp("readers")
    inp, out = _inputs(tmp / "in"), {}
    for cmd, args in {"dedup": ["--cluster-column", "--write-dropped", "--workers", "1"],
                      "retrieve": ["--query", "protein enzyme", "--top-k", "5", "--expand", "none"],
                      "dsir": ["--target", tmp / "target.txt", "--k", "6", "--deterministic"],
                      "select": ["--method", "random", "--max-docs", "9"]}.items():
        _run("data", cmd, inp, "-o", tmp / cmd, *args)
        out[cmd] = tmp / cmd
    rate_step([inp], tmp / "rate", judge_obj=_Judge(), pairs=20, heldout=0.2)
    out["rate"] = tmp / "rate"
    (tmp / "build.toml").write_text(f"""
[build]
inputs = ["{inp}"]
output = "{tmp / 'build'}"
workers = 1
[[steps]]
type = "filter"
min_words = 3
write_dropped = true
[[steps]]
type = "dedup"
threshold = 0.7
cluster_column = true
[[steps]]
type = "select"
method = "random"
max_docs = 10
""")
    _run("data", "build", tmp / "build.toml")
    out["build"] = tmp / "build"
    for step in ("01-filter", "02-dedup", "03-select"):
        out[f"build/{step}"] = tmp / "build" / ".hone" / "steps" / step
    cfg = CurateConfig(domain=DomainConfig(name="bio", keywords=["protein", "enzyme"], top_k=5))
    curate(cfg, sorted(inp.glob("*.jsonl")), tmp / "run")
    out["corpus"] = tmp / "run" / "corpus"
    for step in ("filter", "dedup", "domain"):
        out[f"corpus/{step}"] = tmp / "run" / "corpus" / ".hone" / "steps" / step
    return tmp, out


def _hf(d, cache):
    return datasets.load_dataset("parquet", data_dir=str(d), split="train", cache_dir=str(cache))


def _hone(d) -> list[dict]:
    return list(read_inputs([d]))


NAMES = ["dedup", "retrieve", "dsir", "select", "rate", "build", "build/01-filter", "build/02-dedup", "build/03-select",
         "corpus", "corpus/filter", "corpus/dedup", "corpus/domain"]


@pytest.mark.parametrize("name", NAMES)
def test_three_readers_read_the_kept_documents_once(outputs, name):
    tmp, out = outputs
    d = out[name]
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == \
        sorted(p.name for p in d.glob("part-*.parquet"))  # nothing but parts where readers look
    manifest = json.loads((d / ".hone" / "manifest.json").read_text())
    hone = _hone(d)
    ids = [r["id"] for r in hone]
    assert len(ids) == len(set(ids)) == manifest["totals"]["kept"] > 0
    frame = pd.read_parquet(d)
    table = ds.dataset(d, format="parquet").to_table()
    hf = _hf(d, tmp / "hf-cache")
    assert frame["id"].tolist() == table.column("id").to_pylist() == hf["id"] == ids
    columns = set().union(*(pq.read_schema(p).names for p in d.glob("part-*.parquet")))
    assert set(frame.columns) == set(table.column_names) == set(hf.column_names) == columns


def test_score_columns_survive_an_empty_first_part(outputs):
    """dedup's first part is empty (its input shard had no readable line); the readers take a
    directory's schema from its first file, so every part carries every column."""
    tmp, out = outputs
    parts = sorted(out["dedup"].glob("part-*.parquet"))
    assert pq.ParquetFile(parts[0]).metadata.num_rows == 0
    assert all("dup_cluster" in pq.read_schema(p).names for p in parts)
    clusters = {r["id"]: r["dup_cluster"] for r in _hone(out["dedup"])}
    assert dict(zip(*pd.read_parquet(out["dedup"])[["id", "dup_cluster"]].to_dict("list").values())) == clusters
    assert -1 in clusters.values() and any(c >= 0 for c in clusters.values())


def test_audit_files_live_in_dot_hone(outputs):
    _, out = outputs
    meta = out["dedup"] / ".hone"
    assert (meta / "quarantine" / "quarantine.jsonl").exists()
    assert [json.loads(x)["id"] for x in (meta / "dropped" / "dropped.jsonl").read_text().splitlines()] == \
        ["bcopy", "ccopy", "cshort"]  # near copies; "too short" twice
    corpus = out["corpus"] / ".hone"
    assert [json.loads(x)["id"] for x in (corpus / "dropped" / "filter.jsonl").read_text().splitlines()] == \
        ["bshort", "cshort"]
    assert (corpus / "quarantine" / "quarantine.jsonl").exists() and (corpus / "manifest.json").exists()
    build = out["build"] / ".hone"
    assert (build / "manifest.json").exists() and (build / "quarantine" / "quarantine.jsonl").exists()
    assert (out["build/01-filter"] / ".hone" / "dropped" / "dropped.jsonl").exists()


def test_an_output_is_an_input_of_the_next_command(outputs):
    """Hone recognises its own output by the manifest in .hone/: only the top parts are read."""
    tmp, out = outputs
    r = _run("data", "dedup", out["build"], "-o", tmp / "again", "--workers", "1")
    kept = json.loads((out["build"] / ".hone" / "manifest.json").read_text())["totals"]["kept"]
    assert r.output.strip().splitlines()[-1].startswith(f"dedup: {kept} in, {kept} kept, 0 dropped, 0 quarantined")


def test_unify_parts_types_a_column_by_its_values(tmp_path):
    """A part with no value in a score column (typed float64 by its writer) or an empty part
    takes the type the other parts give the column."""
    schema = pa.schema([("id", pa.string())])
    pq.write_table(pa.table({"id": pa.array([], pa.string())}, schema=schema), tmp_path / "part-00000.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "n": [1, 2]}), tmp_path / "part-00001.parquet")
    pq.write_table(pa.table({"id": ["c"], "n": pa.array([None], pa.float64())}), tmp_path / "part-00002.parquet")
    parts = sorted(tmp_path.glob("part-*.parquet"))
    unify_parts(parts)
    assert {str(pq.read_schema(p)) for p in parts} == {str(pa.schema([("id", pa.string()), ("n", pa.int64())]))}
    assert pd.read_parquet(tmp_path)["n"].tolist()[:2] == [1, 2]


def test_a_directory_written_by_an_older_hone(outputs, tmp_path):
    """Older Hone kept manifest.json, .work/, quarantine/ beside the parts: still read as a
    Hone output; a rerun into it moves to the new layout, and the readers can open it."""
    tmp, out = outputs
    old = tmp_path / "old"
    shutil.copytree(out["dedup"], old)
    (old / ".hone" / "manifest.json").rename(old / "manifest.json")
    (old / ".hone" / "manifest.json.done").rename(old / "manifest.json.done")
    (old / ".hone" / "quarantine").rename(old / "quarantine")
    (old / ".hone" / "dropped").rename(old / "dropped")
    (old / ".hone" / "work").rename(old / ".work")
    (old / ".hone").rmdir()
    assert [r["id"] for r in _hone(old)] == [r["id"] for r in _hone(out["dedup"])]
    _run("data", "dedup", tmp / "in", "-o", old, "--cluster-column", "--write-dropped", "--workers", "1")
    assert sorted(p.name for p in old.iterdir()) == [".hone", *sorted(p.name for p in old.glob("part-*.parquet"))]
    assert pd.read_parquet(old)["id"].tolist() == [r["id"] for r in _hone(out["dedup"])]


def test_an_older_run_directory_keeps_its_corpus(outputs, tmp_path):
    """A finished run from an older Hone (corpus/manifest.json, corpus/steps/) is not curated
    again; when it must be (another config), its old files go and corpus/ reads cleanly."""
    tmp, out = outputs
    run = tmp_path / "run"
    shutil.copytree(out["corpus"].parent, run)
    (run / "corpus" / ".hone" / "manifest.json").rename(run / "corpus" / "manifest.json")
    (run / "corpus" / ".hone" / "steps").rename(run / "corpus" / "steps")
    cfg = CurateConfig(domain=DomainConfig(name="bio", keywords=["protein", "enzyme"], top_k=5))
    inputs = sorted((tmp / "in").glob("*.jsonl"))
    assert curate(cfg, inputs, run) == json.loads((run / "corpus" / "manifest.json").read_text())
    cfg = CurateConfig(domain=DomainConfig(name="bio", keywords=["protein", "enzyme"], top_k=4))
    m = curate(cfg, inputs, run)
    assert sorted(p.name for p in (run / "corpus").iterdir()) == [".hone", "part-00000.parquet"]
    assert pd.read_parquet(run / "corpus")["id"].tolist() == [r["id"] for r in _hone(run / "corpus")]
    assert m["domains"]["bio"] == 4
