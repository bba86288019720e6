"""Selection: ZIP greedy, quality-temperature sampling, random, budgets, quotas, the command, build."""

import json
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from hone.cli.select import register
from hone.corpus.steps.select import SelectConfig, _Stream, count_tokens, quality_order, select_docs, zip_order
from hone.errors import HoneError

rng = np.random.default_rng(0)
VOCAB = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 6)) for _ in range(5000)]
DISTINCT = [" ".join(rng.choice(VOCAB, 30)) for _ in range(20)]
REPEATED = ["the same sentence about the same thing again and again " * 3 + str(i) for i in range(20)]


def _cli():
    app, data = typer.Typer(), typer.Typer()
    register(data)
    app.add_typer(data, name="data")
    return app


def test_running_compressor_copy_equals_compressing_the_concatenation():
    s = _Stream()
    parts = [t.encode() for t in DISTINCT[:5]]
    for p in parts[:4]:
        s.add(p)
    assert s.packed_with(parts[4]) == len(zlib.compress(b"".join(parts), 9))


def test_zip_prefers_diverse_documents():
    texts = REPEATED + DISTINCT
    order = zip_order(texts, None, k1=40, k2=10, k3=5)
    assert sorted(order) == list(range(40))  # without a budget: every document, once
    first = order[:20]
    assert sum(i >= 20 for i in first) >= 18  # the distinct documents come first


def test_zip_selection_is_less_redundant_than_random():
    texts = REPEATED * 2 + DISTINCT
    docs = [{"text": t} for t in texts]
    _, zinfo = select_docs([dict(d) for d in docs], SelectConfig(method="zip", max_docs=15, k1=60, k2=20, k3=5))
    _, rinfo = select_docs([dict(d) for d in docs], SelectConfig(method="random", max_docs=15, seed=1))
    assert zinfo["compression_ratio_selected"] < rinfo["compression_ratio_selected"]


def test_budget_is_respected_and_docs_ranked():
    docs = [{"text": t} for t in DISTINCT]
    verdicts, info = select_docs(docs, SelectConfig(method="zip", budget_tokens=100, k1=20, k2=10, k3=3))
    kept = [d for d, v in zip(docs, verdicts) if v is None]
    assert info["tokens_selected"] == sum(d["n_tokens"] for d in kept) <= 100 and len(kept) == 3
    assert sorted(d["zip_rank"] for d in kept) == [0, 1, 2]
    assert set(verdicts) == {None, "over_budget"}


def test_quality_temperature():
    q = np.arange(100, dtype=float)
    assert quality_order(q, 0.0)[:5].tolist() == [99, 98, 97, 96, 95]
    cold = np.mean([quality_order(q, 0.3, seed=s)[:10].mean() for s in range(20)])
    hot = np.mean([quality_order(q, 20.0, seed=s)[:10].mean() for s in range(20)])
    assert cold > 85 and 30 < hot < 70  # τ → 0 is top-k, τ → ∞ is uniform
    docs = [{"text": "a b", "quality": float(i)} for i in range(10)]
    verdicts, _ = select_docs(docs, SelectConfig(method="quality", temperature=0, budget_tokens=6))
    assert [i for i, v in enumerate(verdicts) if v is None] == [7, 8, 9]
    with pytest.raises(HoneError, match="hone data rate"):
        select_docs([{"text": "a"}], SelectConfig(method="quality", max_docs=1))


def test_quotas_split_the_budget_by_domain():
    docs = [{"text": "x y", "domain": "bio" if i < 10 else "general"} for i in range(20)]
    docs.append({"text": "x y", "domain": "law"})
    verdicts, info = select_docs(docs,
                                 SelectConfig(method="random", budget_tokens=20, quotas={"bio": 0.7, "general": 0.3}))
    kept = [d["domain"] for d, v in zip(docs, verdicts) if v is None]
    assert kept.count("bio") == 7 and kept.count("general") == 3 and verdicts[-1] == "not_in_quota"
    assert info["groups"]["bio"]["budget_tokens"] == 14


def test_token_counts_whitespace_or_tokenizer(tmp_path):
    from hone.tokens import train_bpe

    assert count_tokens(["a b  c", ""]).tolist() == [3, 0]
    tok = train_bpe(DISTINCT * 3, 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    n = count_tokens(["w1 w2 w3"], str(tmp_path))
    assert n[0] == len(tok.encode("w1 w2 w3", add_special_tokens=False).ids)
    with pytest.raises(HoneError, match="tokenizer not found"):
        count_tokens(["a"], str(tmp_path / "nope.json"))


def test_config_errors():
    for bad in ({"method": "best"}, {"temperature": -1}, {"k1": 5, "k2": 10}, {"quotas": {"a": 0.8, "b": 0.5}}):
        with pytest.raises(HoneError, match="select"):
            SelectConfig(**bad)


def test_select_command(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": t}) + "\n" for t in REPEATED + DISTINCT) + "not json\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(_cli(), ["data", "select", str(pool), "-o", str(out), "--method", "zip",
                                    "--budget-tokens", "300", "--k1", "40", "--k2", "10", "--k3", "5"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / ".hone" / "manifest.json").read_text())
    t = m["totals"]
    assert t["docs_in"] == 41 and t["quarantined"] == 1 and t["docs_in"] == t["kept"] + t["dropped"] + t["quarantined"]
    assert m["select"]["tokens_selected"] <= 300
    rows = pq.read_table(out / "part-00000.parquet").to_pylist()
    assert len(rows) == t["kept"] and all(x["zip_rank"] is not None for x in rows)
    r = CliRunner().invoke(_cli(), ["data", "select", str(pool), "-o", str(tmp_path / "o2")])
    assert r.exit_code != 0 and "--budget-tokens" in str(r.exception)
    r = CliRunner().invoke(_cli(), ["data", "select", str(pool), "-o", str(tmp_path / "o3"), "--max-docs", "2",
                                    "--quota", "bio"])
    assert r.exit_code != 0 and "DOMAIN=SHARE" in str(r.exception)


def test_build_runs_dsir_then_select(tmp_path):
    from hone.cli import app

    pool = tmp_path / "pool.jsonl"
    bio = [f"protein gene enzyme cell membrane {w} {v} RNA" for w, v in zip(VOCAB[:15], VOCAB[15:30])]
    pool.write_text("".join(json.dumps({"text": t}) + "\n" for t in bio + DISTINCT))
    target = tmp_path / "target.txt"
    target.write_text("protein gene enzyme\n\ncell membrane RNA protein")
    recipe = tmp_path / "build.toml"
    recipe.write_text(f"""
[build]
inputs = ["{pool}"]
output = "{tmp_path / 'built'}"

[[steps]]
type = "dsir"
target = "{target}"
k = 12
deterministic = true
pseudo_count = 0.001  # eleven target n-grams: the default smoothing would drown them

[[steps]]
type = "select"
method = "random"
budget_tokens = 40
""")
    r = CliRunner().invoke(app, ["data", "build", str(recipe)])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "built" / ".hone" / "manifest.json").read_text())
    assert list(m["steps"]) == ["01-dsir/read", "01-dsir/dsir", "02-select/select"]
    assert m["totals"]["docs_in"] == 35 and m["totals"]["kept"] == 5
    rows = pq.read_table(m["final_shards"][0]).to_pylist()
    assert all(x["text"].startswith("protein") for x in rows)
    assert pq.read_table(tmp_path / "built" / "part-00000.parquet").to_pylist() == rows  # OUTPUT: the last step's
