"""DSIR: hashed n-gram features, importance weights, Gumbel top-k, the step and its command."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from hone.cli.select import register
from hone.corpus.steps.dsir import DsirConfig, NgramHasher, dsir_scores, dsir_select, dsir_step, gumbel_top_k
from hone.errors import HoneError

BIO = ["The enzyme catalyzes phosphorylation of a protein substrate in the cell membrane of yeast.",
       "Gene expression is controlled by transcription factors binding promoter DNA sequences in cells.",
       "Ribosomes translate messenger RNA into a chain of amino acids, forming a new protein in the cell.",
       "The mitochondrial membrane protein transports ions; mutations in its gene cause a rare disease."]
GEN = ["The river flows through the valley past the old stone bridge into the sea at dawn.",
       "Parliament passed the budget after a long debate about taxes and new roads in the north.",
       "The orchestra played a symphony by Beethoven in the concert hall last night for the city.",
       "The football team won the cup final after extra time in front of a large crowd of fans."]
TARGET = ["Protein and gene: the enzyme in the cell membrane; transcription of DNA, RNA and amino acids.",
          "A gene mutation alters a protein in cells; ribosomes, mitochondrial ions, phosphorylation, disease."]


def test_features_count_unigrams_and_ordered_bigrams():
    h = NgramHasher(1 << 20)
    x = h.features(["a b", "b a", "a b a b"])
    assert x.shape == (3, 1 << 20)
    assert x[0].sum() == 3 and x[2].sum() == 7  # n words + (n - 1) bigrams
    assert (x[0] != x[1]).nnz > 0  # "a b" and "b a" differ in their bigram
    assert (h.features(["A, b!"]) != x[0]).nnz == 0  # lowercased, punctuation is not a word


def test_target_like_documents_weigh_more():
    logw = dsir_scores(BIO + GEN, ["A protein gene in the cell; RNA and DNA and enzyme activity."])
    assert logw[:4].min() > logw[4:].max()


def test_gumbel_top_k_is_without_replacement_and_skips_minus_inf():
    logw = np.array([0.0, -np.inf, 1.0, 2.0, -np.inf])
    for seed in range(20):
        idx = gumbel_top_k(logw, 5, seed=seed)
        assert sorted(idx.tolist()) == [0, 2, 3]
    assert gumbel_top_k(logw, 2, deterministic=True).tolist() == [3, 2]


def test_gumbel_top_1_draws_proportionally_to_the_weights():
    logw = np.log([0.2, 0.3, 0.5])
    counts = np.bincount([gumbel_top_k(logw, 1, seed=s)[0] for s in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.2, 0.3, 0.5], atol=0.03)


def test_select_drops_short_docs_and_marks_domain():
    docs = [{"text": t} for t in BIO + GEN + ["protein gene"]]
    verdicts, info = dsir_select(docs, BIO[:2], DsirConfig(k=3, deterministic=True, name="bio"))
    assert verdicts[-1] == "too_short" and "domain_score" not in docs[-1]
    kept = [i for i, v in enumerate(verdicts) if v is None]
    assert len(kept) == 3 and set(kept) <= {0, 1, 2, 3}
    assert all(docs[i]["domain"] == "bio" for i in kept)
    assert verdicts.count("not_sampled") == 5 and info["eligible"] == 8


def test_config_errors_are_one_line():
    with pytest.raises(HoneError, match="dsir.k"):
        DsirConfig(k=0)
    with pytest.raises(HoneError, match="unknown field 'kk'"):
        dsir_step(["x.jsonl"], "out", target=["a b c"], kk=3)


def _pool(tmp_path):
    f = tmp_path / "pool.jsonl"
    f.write_text("".join(json.dumps({"text": t, "topic": "bio" if t in BIO else "gen"}) + "\n" for t in BIO + GEN)
                 + "{broken\n" + json.dumps({"text": "too short"}) + "\n")
    return f


def _cli():
    app = typer.Typer()
    data = typer.Typer()
    register(data)
    app.add_typer(data, name="data")
    return app


def test_dsir_command_writes_parquet_and_manifest(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text(TARGET[0] + "\n\n" + TARGET[1])
    out, pool = tmp_path / "out", _pool(tmp_path)
    r = CliRunner().invoke(_cli(), ["data", "dsir", str(pool), "--target", str(target), "-o", str(out),
                                    "--k", "3", "--deterministic", "--name", "bio"])
    assert r.exit_code == 0, r.output
    assert "dsir: 10 in, 3 kept, 6 dropped, 1 quarantined" in r.output
    m = json.loads((out / ".hone" / "manifest.json").read_text())
    t = m["totals"]
    assert t["docs_in"] == t["kept"] + t["dropped"] + t["quarantined"]
    not_sampled_bytes = m["steps"]["dsir"]["dropped"]["not_sampled"]["bytes"]
    assert m["steps"]["dsir"]["dropped"] == {"not_sampled": {"docs": 5, "bytes": not_sampled_bytes},
                                             "too_short": {"docs": 1, "bytes": 9}}
    rows = pq.read_table(out / "part-00000.parquet").to_pylist()
    assert {json.loads(x["meta"])["topic"] for x in rows} == {"bio"} and {x["domain"] for x in rows} == {"bio"}
    assert all(np.isfinite(x["domain_score"]) for x in rows)
    # the same run again is skipped and gives the same manifest
    again = dsir_step([pool], out, target=str(target), k=3, deterministic=True,
                      name="bio", buckets=10_000, min_words=5, length_norm=True, seed=0)
    assert again["seconds"] == m["seconds"]


def test_dsir_command_missing_target_is_one_line(tmp_path):
    r = CliRunner().invoke(_cli(), ["data", "dsir", str(_pool(tmp_path)), "--target", str(tmp_path / "nope.txt"),
                                    "-o", str(tmp_path / "o"), "--k", "2"])
    assert r.exit_code != 0 and isinstance(r.exception, HoneError) and "nope.txt" in str(r.exception)


def test_streaming_step_over_shards_matches_the_in_memory_selection(tmp_path):
    from hone.corpus.executor import LocalExecutor

    rng = np.random.default_rng(7)
    vocab = " ".join(BIO + GEN).replace(".", "").replace(",", "").replace(";", "").split()
    docs = [{"id": f"d{i}", "text": " ".join(rng.choice(vocab, size=int(rng.integers(2, 40))))} for i in range(300)]
    for k in range(3):  # three shards; a bad line in each
        (tmp_path / f"p{k}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[k * 100:(k + 1) * 100])
                                              + "{bad\n")
    cfg = DsirConfig(k=40, seed=3, name="bio")
    verdicts, _ = dsir_select([dict(d) for d in docs], TARGET, cfg)
    want = [d["id"] for d, v in zip(docs, verdicts) if v is None]
    m = dsir_step(sorted(tmp_path.glob("p*.jsonl")), tmp_path / "out", target=TARGET, executor=LocalExecutor(2),
                  k=40, seed=3, name="bio")
    got = [r["id"] for p in m["shards"] for r in pq.read_table(tmp_path / "out" / p).to_pylist()]
    assert got == want and len(m["shards"]) == 3
    t, reasons = m["totals"], m["steps"]["dsir"]["dropped"]
    assert (t["docs_in"], t["kept"], t["quarantined"]) == (303, 40, 3)
    assert reasons["too_short"]["docs"] == sum(v == "too_short" for v in verdicts)
