"""The ``retrieve`` step: BM25 retrieval (:mod:`hone.corpus.retrieve`) of the documents closest
to seed queries or example documents, with pseudo-relevance feedback or LLM query expansion."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

from hone.corpus.read import Quarantine, StepStats, expand_inputs, read_shard
from hone.corpus.retrieve import retrieve
from hone.corpus.runner import finish_output, keep_or_drop, prepare_output, run_key, step_manifest
from hone.corpus.write import ShardWriter
from hone.errors import HoneError
from hone.recipe import DomainConfig

LLM_HELP = "needs an OpenAI-compatible endpoint: set HONE_LLM_URL (and HONE_LLM_KEY or OPENAI_API_KEY, HONE_LLM_MODEL)"


def llm_queries(seeds: list[str], n: int = 10) -> list[str]:
    """Query-of-CC bootstrapping: ask an OpenAI-compatible chat endpoint for more search
    queries about the seeds. The key comes from the environment and is never logged."""
    url = os.environ.get("HONE_LLM_URL")
    if not url:
        raise HoneError(f"--expand llm {LLM_HELP}")
    key = os.environ.get("HONE_LLM_KEY") or os.environ.get("OPENAI_API_KEY") or ""
    prompt = ("Seed topics or questions:\n" + "\n".join(f"- {s[:500]}" for s in seeds) +
              f"\n\nWrite {n} more short search queries (keywords or questions) that would find documents on "
              "the same subject. One per line, no numbering, nothing else.")
    body = json.dumps({"model": os.environ.get("HONE_LLM_MODEL", "gpt-4o-mini"),
                       "messages": [{"role": "user", "content": prompt}], "temperature": 0.7}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            content = json.loads(resp.read())["choices"][0]["message"]["content"]
    except Exception as e:  # network, HTTP status, unexpected JSON: one line, no key in it
        raise HoneError(f"LLM query expansion failed at {url}: {type(e).__name__}: {str(e)[:200]}") from None
    lines = [ln.strip().lstrip("-*0123456789. ").strip() for ln in content.splitlines()]
    return [ln for ln in lines if ln][:n]


def top_k_notes(top_k: int, docs: int, picked: int) -> list[str]:
    """A top_k beyond the pool is no error, but the run takes fewer documents than it asked for: say so."""
    if top_k <= docs:
        return []
    return [f"top_k {top_k:,} is more than the {docs:,} documents read: took {picked:,} (those with a positive score)"]


def retrieve_step(inputs: list, out_dir: Path, *, text_field: str = "text", executor=None,
                  query: list[str] = (), examples: list[str] = (), top_k: int = 1000, expand: str = "prf",
                  name: str = "domain", keep_rest: bool = False, prf_docs: int = 10, prf_terms: int = 30) -> dict:
    """BM25 retrieval of the ``top_k`` documents closest to the queries / example documents.

    Not retrieved documents are dropped (``not_retrieved``), or with ``keep_rest`` kept with
    domain ``general``. BM25 needs the whole pool's statistics: this step holds the texts.
    """

    if expand not in ("none", "prf", "llm"):
        raise HoneError(f"expand must be none, prf or llm (got {expand!r})")
    t0, out_dir, shards = time.perf_counter(), Path(out_dir), expand_inputs(inputs)
    query, examples = list(query), list(examples)
    if not query and not examples:
        raise HoneError("retrieve needs --query TEXT or --examples FILE")
    config = {"step": "retrieve", "query": query, "examples": examples, "top_k": top_k, "expand": expand,
              "name": name, "keep_rest": keep_rest, "prf_docs": prf_docs, "prf_terms": prf_terms,
              "text_field": text_field}
    work, done = prepare_output(out_dir, run_key(shards, config))
    if done is not None:
        return done
    work.mkdir(parents=True, exist_ok=True)
    extra = llm_queries(query + examples) if expand == "llm" else []
    read, step, q = StepStats(), StepStats(), Quarantine(work / "quarantine-00000.jsonl")
    docs = [d for sh in shards for d in read_shard(sh, text_field, q, read)]
    q.close()
    cfg = DomainConfig(name=name, keywords=query + extra, examples=examples, top_k=top_k,
                       prf_docs=prf_docs if expand != "none" else 0, prf_terms=prf_terms)
    result = retrieve([d["text"] for d in docs], cfg)
    verdicts = []
    for doc, score, picked in zip(docs, result.scores, result.selected):
        if picked or keep_rest:
            doc["domain"], doc["domain_score"] = (name if picked else "general"), float(score)
        verdicts.append(None if picked or keep_rest else "not_retrieved")
    writer = ShardWriter(out_dir / "part-00000.parquet")
    writer.write(list(keep_or_drop(docs, verdicts, step)))
    writer.close()
    manifest = step_manifest("retrieve", shards, read, step, config, ["part-00000.parquet"], t0,
                             query={"seed_terms": result.query, "expansion_terms": result.expansion,
                                    "llm_queries": extra},
                             notes=top_k_notes(top_k, len(docs), int(result.selected.sum())))
    return finish_output(out_dir, manifest, [out_dir / "part-00000.parquet"], [work / "quarantine-00000.jsonl"])
