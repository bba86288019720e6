"""Domain finding on the Wikipedia vital-article summaries: BM25 (± PRF expansion) vs DSIR.

Ground truth is each summary's topic label. Per topic, ``--examples`` documents of the topic
are drawn at random and taken out of the pool: they are the seeds (BM25's example query,
DSIR's target). Every method then picks as many documents as the topic has left in the
pool, so precision and recall at the size of the true set are (nearly) equal; both printed.
BM25 also runs from keywords (the topic's own name) for reference.

    python benchmarks/domain_bench.py            # ~1 min on 2 CPU cores; prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from hone.corpus.retrieve import retrieve
from hone.corpus.sources import wikipedia_docs
from hone.corpus.steps.dsir import dsir_scores, gumbel_top_k
from hone.recipe import DomainConfig

TOPICS = {
    "Biology and health sciences": ["biology", "medicine", "health", "disease", "species"],
    "Mathematics": ["mathematics", "theorem", "geometry", "algebra", "number"],
    "Technology": ["technology", "engineering", "machine", "computer", "device"],
    "Arts": ["art", "music", "painting", "literature", "film"],
}


def prec_rec(selected: np.ndarray, truth: np.ndarray) -> dict:
    hits = int((selected & truth).sum())
    return {"precision": round(hits / max(int(selected.sum()), 1), 4), "recall": round(hits / int(truth.sum()), 4),
            "selected": int(selected.sum())}


def mask(idx: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros(n, bool)
    m[idx] = True
    return m


def run_topic(docs: list[dict], topic: str, n_examples: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    labels = np.array([d["meta"]["topic"] == topic for d in docs])
    ex_idx = set(rng.choice(np.flatnonzero(labels), n_examples, replace=False).tolist())
    examples = [docs[i]["text"] for i in sorted(ex_idx)]
    pool = [d["text"] for i, d in enumerate(docs) if i not in ex_idx]
    truth = np.array([labels[i] for i in range(len(docs)) if i not in ex_idx])
    k, n = int(truth.sum()), len(pool)
    out: dict = {"true_docs": k, "pool": n, "examples": n_examples}

    def timed(name, fn):
        t0 = time.perf_counter()
        sel = fn()
        out[name] = {**prec_rec(sel, truth), "seconds": round(time.perf_counter() - t0, 2)}

    for prf, tag in ((0, "none"), (10, "prf")):
        timed(f"bm25_examples_{tag}", lambda: retrieve(pool, DomainConfig(name="d", examples=examples, top_k=k,
                                                                            prf_docs=prf)).selected)
        timed(f"bm25_keywords_{tag}", lambda: retrieve(pool, DomainConfig(name="d", keywords=TOPICS[topic], top_k=k,
                                                                            prf_docs=prf)).selected)
    # "paper": plain sum of log ratios, pseudo-count 1; "hone": the defaults (per n-gram ×
    # median length, pseudo-count 0.1; chosen on this benchmark, so read it as tuned).
    for tag, kw in (("paper", {"length_norm": False, "pseudo_count": 1.0}), ("hone", {})):
        logw = {}

        def scores():
            logw["x"] = dsir_scores(pool, examples, **kw)
            return logw["x"]

        timed(f"dsir_{tag}_topk", lambda: mask(gumbel_top_k(scores(), k, deterministic=True), n))
        timed(f"dsir_{tag}_gumbel", lambda: mask(gumbel_top_k(logw["x"], k, seed=seed), n))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=20, help="Seed documents per topic, held out of the pool.")
    ap.add_argument("--seeds", type=int, default=3, help="Repetitions with other example draws (mean reported).")
    args = ap.parse_args()
    docs = wikipedia_docs()
    t0 = time.perf_counter()
    result = {"bench": "domain_finding", "docs": len(docs), "examples_per_topic": args.examples,
              "seeds": args.seeds, "topics": {}}
    for topic in TOPICS:
        runs = [run_topic(docs, topic, args.examples, s) for s in range(args.seeds)]
        methods = [m for m in runs[0] if isinstance(runs[0][m], dict)]
        result["topics"][topic] = {"true_docs": runs[0]["true_docs"], **{
            m: {key: round(float(np.mean([r[m][key] for r in runs])), 4) for key in ("precision", "recall", "seconds")}
            for m in methods}}
    methods = list(next(iter(result["topics"].values())))[1:]
    result["mean_over_topics"] = {m: {key: round(float(np.mean([t[m][key] for t in result["topics"].values()])), 4)
                                      for key in ("precision", "recall")} for m in methods}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
