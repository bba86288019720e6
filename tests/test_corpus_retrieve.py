"""BM25 retrieval with pseudo-relevance feedback finds planted domain documents."""

import numpy as np

from hone.corpus.retrieve import retrieve, seed_query, with_plurals
from hone.recipe import DomainConfig

DOMAIN = [
    "The enzyme catalyzes the phosphorylation of a protein kinase substrate in the cell.",
    "Protein folding in the endoplasmic reticulum is assisted by chaperone enzymes.",
    "Gene expression is controlled by transcription factors binding to promoter DNA.",
    "The kinase transfers phosphate to substrate proteins, a reaction catalyzed in the cytoplasm.",
    "Ribosomes translate messenger RNA into a chain of amino acids, a protein.",
    "Chaperone proteins help the folding of kinase substrates after translation.",
]
# Documents with no seed keyword: only feedback terms (kinase, chaperone, substrate) find them.
HIDDEN = [
    "Kinase activity toward a chaperone substrate was measured by phosphorylation.",
    "A chaperone stabilizes the kinase and its substrate during folding.",
]
GENERAL = [
    "The river flows through the valley past the old stone bridge into the sea.",
    "Parliament passed the budget after a long debate about taxes and roads.",
    "The orchestra played a symphony by Beethoven in the concert hall.",
    "Football fans filled the stadium to watch the final match of the season.",
    "The recipe calls for flour, butter, sugar and two eggs baked for an hour.",
    "Mountains in the north are covered with snow for most of the winter.",
    "def main():\n    print('hello world')\n    return 0",
    "Permission is hereby granted to copy and distribute this software freely.",
]


def test_finds_planted_domain_docs_exactly():
    texts = GENERAL[:4] + DOMAIN + GENERAL[4:] + HIDDEN
    cfg = DomainConfig(name="bio", keywords=["protein", "enzyme", "gene", "RNA"], top_k=8, prf_docs=4, prf_terms=5)
    r = retrieve(texts, cfg)
    truth = np.array([t in DOMAIN or t in HIDDEN for t in texts])
    assert len(r.scores) == len(texts)
    assert (r.selected == truth).all()  # precision and recall 1.0
    assert r.expansion and set(r.expansion).isdisjoint(r.query)
    assert {"kinase", "chaperone", "substrate"} & set(r.expansion)


def test_without_feedback_keyword_free_docs_score_zero():
    texts = DOMAIN + GENERAL + HIDDEN
    cfg = DomainConfig(name="bio", keywords=["protein", "enzyme", "gene", "RNA"], top_k=8, prf_docs=0)
    r = retrieve(texts, cfg)
    assert r.expansion == {}
    assert (r.scores[-2:] == 0).all() and not r.selected[-2:].any()


def test_seed_query_and_plural_forms():
    q = seed_query(["biosynthetic process", "the gene"], ["Binding to a protein.", "Binding to DNA."])
    assert q["biosynthetic"] == q["process"] == q["gene"] == 1.0
    assert q["binding"] == 1.0 and q["protein"] == 0.5 and "the" not in q
    assert with_plurals({"gene": 1.0}, {"genes": 3, "gene": 1})["genes"] == 1.0


def test_empty_and_unmatched_pool():
    cfg = DomainConfig(name="bio", keywords=["protein"], top_k=3)
    assert retrieve([], cfg).selected.size == 0
    r = retrieve(["a", "the river"], cfg)
    assert not r.selected.any() and (r.scores == 0).all()
