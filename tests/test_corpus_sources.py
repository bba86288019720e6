"""The packaged demo corpora: readers, the demo pool, and retrieval quality on it.

Gene Ontology and Jane Austen come from Debian packages (``hone fetch-data``); those tests
are skipped where ``data_dir()`` lacks them.
"""

import json
import time

import pytest

from hone.corpus.pipeline import curate
from hone.corpus.sources import (
    build_demo_pool,
    cut_text,
    data_dir,
    gene_ontology_docs,
    license_docs,
    stdlib_docs,
    wikipedia_docs,
)
from hone.corpus.steps.exact_dedup import normalize
from hone.errors import HoneError
from hone.recipe import CurateConfig, DomainConfig, PackagedData

HAS_DEBIAN = (data_dir() / "r-bioc-go.db").is_dir() and (data_dir() / "r-cran-janeaustenr").is_dir()
needs_debian = pytest.mark.skipif(not HAS_DEBIAN, reason="run `hone fetch-data` (Gene Ontology, Austen)")
KEYWORDS = ["gene", "protein", "cell", "enzyme", "catalysis", "biosynthetic process", "regulation",
            "membrane", "binding", "DNA", "RNA", "metabolic"]


def _jsonl(path):
    # not splitlines: U+2028 is text
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").split("\n") if ln]


def test_cut_text_at_whitespace():
    assert cut_text("alpha beta gamma", 12) == "alpha beta"
    assert cut_text("short", 100) == "short"
    assert len(cut_text("x" * 50, 10)) == 10


def test_pip_readers():
    wiki, lic, code = wikipedia_docs(), license_docs(), stdlib_docs()
    assert len(wiki) > 10_000 and len(lic) > 300 and len(code) > 500
    assert {d["meta"]["label"] for d in wiki} == {"biomedical", "general"}
    assert all(d["text"] and d["id"] for d in wiki + lic + code)
    assert not any("site-packages" in d["id"] or "/test/" in d["id"] for d in code)


def test_missing_debian_data_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HONE_DATA_DIR", str(tmp_path))
    with pytest.raises(HoneError, match="hone fetch-data"):
        gene_ontology_docs()


@pytest.fixture(scope="module")
def demo_pool(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, build_demo_pool(PackagedData(), out, seed=0)


@needs_debian
def test_demo_pool_counts_labels_and_no_overlap(demo_pool):
    out, summary = demo_pool
    cfg = PackagedData()
    pool = _jsonl(out / "pool" / "pool.jsonl")
    held = {n: _jsonl(out / "heldout" / f"{n}.jsonl") for n in ("domain", "general", "unseen")}
    assert summary["pool"] == {"wikipedia": 1500, "gene_ontology": 1500, "licenses": 150, "python_stdlib": 150}
    assert len(pool) == 3300 and [len(held[n]) for n in held] == [150, 60, 6]
    assert all(d["meta"]["label"] in ("biomedical", "general") for d in pool)
    assert {d["meta"]["label"] for d in held["unseen"]} == {"unseen"}
    assert all(d["source"] == "gene_ontology" for d in held["domain"])
    assert all(d["meta"]["topic"] != "Biology and health sciences" for d in held["general"])
    assert all(len(d["text"]) <= cfg.max_chars for docs in [pool, *held.values()] for d in docs)
    pool_ids, pool_texts = {d["id"] for d in pool}, {normalize(d["text"]) for d in pool}
    for docs in held.values():
        assert not pool_ids & {d["id"] for d in docs}
        assert not pool_texts & {normalize(d["text"]) for d in docs}


@needs_debian
def test_demo_pool_is_deterministic(demo_pool, tmp_path):
    out, _ = demo_pool
    small = PackagedData(wikipedia=20, gene_ontology=20, licenses=5, python_stdlib=5, heldout_unseen=2)
    build_demo_pool(small, tmp_path / "a", seed=3)
    build_demo_pool(small, tmp_path / "b", seed=3)
    for rel in ("pool/pool.jsonl", "heldout/domain.jsonl", "heldout/unseen.jsonl"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


@needs_debian
def test_retrieval_quality_on_the_demo_pool(demo_pool, tmp_path):
    out, _ = demo_pool
    cfg = CurateConfig(domain=DomainConfig(name="biomedical", keywords=KEYWORDS, top_k=1800))
    t0 = time.perf_counter()
    m = curate(cfg, [out / "pool" / "pool.jsonl"], tmp_path)
    seconds = time.perf_counter() - t0
    r = m["retrieval"]
    print(f"\nretrieval on the demo pool: precision {r['precision']:.3f} recall {r['recall']:.3f} "
          f"f1 {r['f1']:.3f} ({r['retrieved']} retrieved, {r['label_positives']} labelled) in {seconds:.1f}s")
    assert r["precision"] >= 0.8 and r["recall"] >= 0.8
    assert seconds < 30
