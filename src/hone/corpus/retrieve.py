"""Domain finding by BM25 retrieval with pseudo-relevance feedback (Query-of-CC style).

The query is a weighted bag of terms from the seed keywords and example documents. A
first BM25 pass ranks the pool; the ``prf_docs`` best documents are read and their
``prf_terms`` highest tf·idf terms are added to the query; a second pass gives every
document its final ``domain_score``. The ``top_k`` best-scoring documents (score > 0)
become the domain.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import bm25s
import numpy as np

from hone.recipe import DomainConfig

K1 = 1.2
B = 0.75
EXPANSION_WEIGHT = 0.5  # an expansion term counts at most half a seed term (Rocchio's beta)


@dataclass
class Retrieval:
    scores: np.ndarray  # final BM25 score of every document, in input order
    selected: np.ndarray  # bool mask: the top_k documents assigned to the domain
    query: dict[str, float]  # seed terms and their weights
    expansion: dict[str, float]  # terms added by pseudo-relevance feedback


def tokenize(texts: list[str]) -> list[list[str]]:
    """Lowercase word tokens without English stopwords (bm25s's tokenizer; no stemming)."""
    if not texts:
        return []
    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


def seed_query(keywords: list[str], examples: list[str]) -> dict[str, float]:
    """Keyword terms weigh 1; an example's terms weigh the share of examples that hold them."""
    query: dict[str, float] = {}
    for term in (t for toks in tokenize(keywords) for t in toks):
        query[term] = 1.0
    example_tokens = tokenize(examples)
    df = Counter(t for toks in example_tokens for t in set(toks))
    for term, n in df.items():
        query[term] = max(query.get(term, 0.0), n / len(example_tokens))
    return query


class Index:
    """A BM25 index over the pool plus the document frequencies feedback needs."""

    def __init__(self, tokens: list[list[str]]):
        self.tokens = tokens
        self.df = Counter(t for toks in tokens for t in set(toks))
        self.bm25 = bm25s.BM25(k1=K1, b=B)
        # bm25s rejects an empty vocabulary; a pool with no words matches nothing anyway.
        self.empty = not self.df
        if not self.empty:
            self.bm25.index(tokens, show_progress=False)

    def idf(self, term: str) -> float:
        n, df = len(self.tokens), self.df.get(term, 0)
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    def score(self, query: dict[str, float]) -> np.ndarray:
        scores = np.zeros(len(self.tokens), dtype=np.float64)
        for term, weight in query.items():
            if not self.empty and term in self.df:
                scores += weight * self.bm25.get_scores([term])
        return scores


def with_plurals(query: dict[str, float], vocab: Counter) -> dict[str, float]:
    """Add singular/plural forms of the seed terms found in the pool (bm25s has no stemmer
    without PyStemmer; "proteins" must still match the seed "protein")."""
    out = dict(query)
    for term, weight in query.items():
        forms = (term + "s", term + "es", term[:-1] if term.endswith("s") else "")
        for form in forms:
            if form and form in vocab and form not in out:
                out[form] = weight
    return out


def feedback_terms(index: Index, top: np.ndarray, exclude: set[str], n_terms: int) -> dict[str, float]:
    """The ``n_terms`` terms with the highest summed tf·idf over the feedback documents."""
    weight: Counter[str] = Counter()
    for i in top:
        toks = index.tokens[i]
        for term, tf in Counter(toks).items():
            if term not in exclude and index.df[term] > 1:  # a term in one doc finds nothing new
                weight[term] += tf / len(toks) * index.idf(term)
    best = weight.most_common(n_terms)
    top_w = best[0][1] if best else 1.0
    return {t: EXPANSION_WEIGHT * w / top_w for t, w in best}


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """The k best positive scores; ties go to the earlier document (stable sort)."""
    order = np.argsort(-scores, kind="stable")[:k]
    mask = np.zeros(len(scores), dtype=bool)
    mask[order[scores[order] > 0]] = True
    return mask


def retrieve(texts: list[str], cfg: DomainConfig) -> Retrieval:
    """Score every text against the domain seeds; select the top_k as the domain."""
    index = Index(tokenize(texts))
    query = with_plurals(seed_query(cfg.keywords, cfg.examples), index.df)
    scores = index.score(query)
    expansion: dict[str, float] = {}
    if cfg.prf_docs and cfg.prf_terms and scores.any():
        top = np.argsort(-scores, kind="stable")[:cfg.prf_docs]
        top = top[scores[top] > 0]
        expansion = feedback_terms(index, top, set(query), cfg.prf_terms)
        scores = index.score({**query, **expansion})
    return Retrieval(scores, top_k_mask(scores, cfg.top_k), query, expansion)
