"""The curate stage end to end on a tiny corpus: manifest invariant, outputs, rerun skip."""

import json
import os

import pyarrow.parquet as pq
import pytest

from hone.corpus.pipeline import curate
from hone.corpus.write import read_corpus_table, write_corpus
from hone.errors import HoneError
from hone.recipe import CurateConfig, DomainConfig

BIO = ["The enzyme catalyzes the phosphorylation of a protein substrate inside the cell.",
       "Gene expression is controlled by transcription factors binding to promoter DNA sequences.",
       "Ribosomes translate messenger RNA into a chain of amino acids forming a protein."]
GEN = ["The river flows through the valley past the old stone bridge into the sea.",
       "Parliament passed the budget after a long debate about taxes and new roads.",
       "The orchestra played a symphony by Beethoven in the concert hall last night."]


def _inputs(tmp_path):
    rows = [{"id": f"b{i}", "text": t, "meta": {"label": "bio"}} for i, t in enumerate(BIO)]
    rows += [{"id": f"g{i}", "text": t, "meta": {"label": "general"}} for i, t in enumerate(GEN)]
    rows += [{"id": "dup", "text": BIO[0].upper()}, {"id": "short", "text": "too short"}]
    a = tmp_path / "a.jsonl"
    a.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"text": "Membrane proteins bind RNA and DNA in the cell nucleus of eukaryotes."}) + "\n")
    return [a, b]


def _cfg(**kw):
    return CurateConfig(domain=DomainConfig(name="bio", keywords=["protein", "gene", "RNA", "enzyme"],
                                            top_k=4, **kw))


def test_manifest_counts_and_invariant(tmp_path):
    m = curate(_cfg(), _inputs(tmp_path), tmp_path / "run")
    steps = m["steps"]
    for s in steps.values():
        assert s["docs_in"] == s["docs_out"] + sum(d["docs"] for d in s["dropped"].values())
        assert s["bytes_in"] == s["bytes_out"] + sum(d["bytes"] for d in s["dropped"].values())
    assert steps["read"]["docs_in"] == 10 and steps["read"]["dropped"]["bad_json"]["docs"] == 1
    assert steps["filter"]["dropped"] == {"too_few_words": {"docs": 1, "bytes": 9}}
    assert steps["dedup"]["dropped"]["exact_duplicate"]["docs"] == 1
    assert steps["domain"]["docs_out"] == steps["dedup"]["docs_out"] == 7
    assert m["domains"] == {"bio": 4, "general": 3}
    # b.jsonl's doc (retrieved) has no label: only the 6 labelled docs are scored.
    r = m["retrieval"]
    assert (r["labelled_docs"], r["retrieved"], r["precision"], r["recall"]) == (6, 3, 1.0, 1.0)


def test_outputs_parquet_dropped_quarantine(tmp_path):
    run = tmp_path / "run"
    curate(_cfg(), _inputs(tmp_path), run)
    table = read_corpus_table(run / "corpus")
    assert table.column_names == ["id", "text", "source", "domain", "meta", "domain_score"]
    rows = table.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows) == 7
    assert {r["domain"] for r in rows} == {"bio", "general"}
    assert all(isinstance(json.loads(r["meta"]), dict) for r in rows)
    assert next(r for r in rows if r["id"].endswith("b.jsonl:1"))["source"] == "b"  # path:line when no id
    meta = run / "corpus" / ".hone"
    dedup = [json.loads(ln) for ln in (meta / "dropped" / "dedup.jsonl").read_text().splitlines()]
    assert dedup[0]["id"] == "dup" and dedup[0]["duplicate_of"] == "b0"
    q = [json.loads(ln) for ln in (meta / "quarantine" / "quarantine.jsonl").read_text().splitlines()]
    assert q[0]["line"] == 9 and q[0]["reason"] == "bad_json" and q[0]["file"].endswith("a.jsonl")


def test_rerun_skips_only_when_inputs_and_config_match(tmp_path):
    inputs, run = _inputs(tmp_path), tmp_path / "run"
    first = curate(_cfg(), inputs, run)
    part = run / "corpus" / "part-00000.parquet"
    stamp = part.stat().st_mtime_ns
    assert curate(_cfg(), inputs, run) == first and part.stat().st_mtime_ns == stamp
    # A different config reruns.
    assert curate(_cfg(prf_docs=0), inputs, run)["config"]["domain"]["prf_docs"] == 0
    # A changed input reruns.
    with open(inputs[1], "a") as f:
        f.write(json.dumps({"text": "Another protein gene document about enzyme RNA binding."}) + "\n")
    os.utime(inputs[1], ns=(stamp + 10**9, stamp + 10**9))
    assert curate(_cfg(prf_docs=0), inputs, run)["steps"]["read"]["docs_in"] == 11


def test_write_dropped_off_and_reserved_name(tmp_path):
    cfg = CurateConfig(domain=DomainConfig(name="bio", keywords=["protein"]), write_dropped=False)
    curate(cfg, _inputs(tmp_path), tmp_path / "run")
    assert (tmp_path / "run" / "corpus" / ".hone" / "manifest.json").exists()
    assert not list((tmp_path / "run" / "corpus" / ".hone" / "dropped").glob("*.jsonl"))
    with pytest.raises(HoneError, match="reserved"):
        curate(CurateConfig(domain=DomainConfig(name="general", keywords=["x"])), _inputs(tmp_path), tmp_path / "r2")


def test_writer_shards_and_removes_stale(tmp_path):
    docs = [{"id": str(i), "text": "t", "source": "s", "domain": "general", "meta": {}, "domain_score": 0.0}
            for i in range(5)]
    assert [p.name for p in write_corpus(docs, tmp_path, rows_per_shard=2)] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    write_corpus(docs, tmp_path, rows_per_shard=10)
    assert [p.name for p in tmp_path.glob("part-*.parquet")] == ["part-00000.parquet"]
    assert pq.read_table(tmp_path / "part-00000.parquet").num_rows == 5
