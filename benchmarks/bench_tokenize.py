"""Tokenize stage: throughput and peak memory, streaming (now) against in-memory (before), at 1x and 4x.

Corpus: the packaged Wikipedia summaries (domain ``general``) and Gene Ontology definitions
(``biomedical``), shuffled together, repeated ``--copies`` times for 1x (4x: four times that),
written by the curate stage's own writer (``hone.corpus.write.write_corpus``: Parquet parts of
100,000 rows). Tokenizer: SmolLM2's, from the packaged GGUF.

Each (path, size) runs ``--repeats`` times, old and new alternating, each in a fresh process
(``--measure``) that loads the tokenizer (from a ``tokenizer.json``: reading the GGUF would set
a high-water mark of RSS above the stage's), notes its ``ru_maxrss`` (``base_rss_mb``: imports
and tokenizer) and CPU time, tokenizes, and reports wall and CPU seconds and the peak RSS
again; ``stage_rss_mb`` = peak - base is what the tokenization itself held; the fastest run is
reported. ``tokens_per_cpu_s`` (user + system time of all the process's threads) is the
throughput to compare on a shared machine, where wall time depends on the neighbours. The
parent never holds the corpus (a child writes it), since Linux carries a parent's peak RSS
across fork + exec. ``old`` is the pre-streaming stage, kept below as :func:`old_tokenize_corpus`
(read the whole corpus, one ``encode_batch``, one shard per domain). Outputs are compared: the
same tokens per domain, and ``same_stream`` (identical bytes; expected only when every domain
fits one chunk, e.g. ``--copies 1 --chunk-chars 20000000``).

    python benchmarks/bench_tokenize.py                 # 1x = 4 copies (~49M characters)
    python benchmarks/bench_tokenize.py --copies 1      # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from hone.rundir import atomic_path, write_json
from hone.tokens import eos_id, load_tokens, tokenize_corpus, tokenizer_hash
from hone.tokens.tokenize import CHUNK_CHARS

# --- the in-memory stage as it was before streaming (hone.tokens at a696ec0), the baseline -----


def old_read_corpus(corpus_dir: Path) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for f in sorted(Path(corpus_dir).glob("*.parquet")):
        table = pq.read_table(f, columns=["text", "domain"])
        for text, domain in zip(table.column("text").to_pylist(), table.column("domain").to_pylist()):
            groups.setdefault(domain or "general", []).append(text)
    return groups


def old_write_shard(texts: list[str], tokenizer, out_dir: Path, seed: int) -> dict:
    order = np.random.default_rng(seed).permutation(len(texts))
    dtype = np.dtype("<u2") if tokenizer.get_vocab_size() < 65536 else np.dtype("<u4")
    eos = eos_id(tokenizer)
    encoded = tokenizer.encode_batch([texts[i] for i in order], add_special_tokens=False)
    pieces, offsets, n = [], [], 0
    for enc in encoded:
        ids = enc.ids + [eos]
        offsets.append(n)
        pieces.append(np.asarray(ids, dtype=dtype))
        n += len(ids)
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "shard-00000.bin") as tmp:
        flat.tofile(tmp)
    index = {"dtype": dtype.str, "shards": [{"file": "shard-00000.bin", "tokens": int(n), "docs": len(offsets)}],
             "tokens": int(n), "docs": len(offsets), "doc_offsets": offsets, "eos_id": eos,
             "tokenizer_hash": tokenizer_hash(tokenizer)}
    write_json(out_dir / "index.json", index)
    return index


def old_tokenize_corpus(corpus_dir: Path, tokenizer, out_dir: Path, seed: int = 0) -> dict:
    return {domain: old_write_shard(texts, tokenizer, Path(out_dir) / "train" / domain, seed)
            for domain, texts in sorted(old_read_corpus(corpus_dir).items())}


# --- the benchmark -------------------------------------------------------------------------


def write_corpora(tmp: Path, copies: int) -> None:
    from hone.corpus import sources
    from hone.corpus.write import write_corpus
    from hone.model.gguf import smollm2_gguf_path, tokenizer_from_gguf

    # Saved as tokenizer.json: reading the GGUF would set a high-water mark of RSS above the stage's.
    tokenizer_from_gguf(smollm2_gguf_path()).save(str(tmp / "tokenizer.json"))
    docs = ([{**d, "domain": "general"} for d in sources.wikipedia_docs()]
            + [{**d, "domain": "biomedical"} for d in sources.gene_ontology_docs()])
    random.Random(0).shuffle(docs)
    info = {"base_docs": len(docs), "base_chars": sum(len(d["text"]) for d in docs)}
    for size in (1, 4):
        n = copies * size
        write_corpus([{**d, "id": f"{d['id']}#{c}"} for c in range(n) for d in docs], tmp / f"x{size}")
        info[f"x{size}"] = {"copies": n, "docs": n * info["base_docs"], "chars": n * info["base_chars"]}
    print(json.dumps(info))


def measure(path: str, corpus: Path, out: Path, chunk_chars: int) -> None:
    tok = Tokenizer.from_file(str(corpus.parent / "tokenizer.json"))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    base, cpu0 = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
    t0 = time.perf_counter()
    if path == "old":
        summary = old_tokenize_corpus(corpus, tok, out)
    else:
        summary = tokenize_corpus(corpus, tok, out, chunk_chars=chunk_chars)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime - cpu0
    tokens = sum(s["tokens"] for s in summary.values())
    print(json.dumps({"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "tokens": tokens,
                      "tokens_per_s": round(tokens / wall), "tokens_per_cpu_s": round(tokens / cpu),
                      "base_rss_mb": round(base, 1), "peak_rss_mb": round(peak, 1),
                      "stage_rss_mb": round(peak - base, 1),
                      "domains": {d: {"tokens": s["tokens"], "shards": len(s["shards"])} for d, s in summary.items()}}))


def same_bytes(a: Path, b: Path) -> bool:
    return all(np.array_equal(np.asarray(load_tokens(a / "train" / d.name)), np.asarray(load_tokens(d)))
               for d in sorted((b / "train").iterdir()) if d.is_dir())


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def run(cmd: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, *cmd], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=4, help="copies of Wikipedia + Gene Ontology in the 1x corpus")
    ap.add_argument("--chunk-chars", type=int, default=CHUNK_CHARS, help="the streaming path's chunk (shard) size")
    ap.add_argument("--sizes", default="1,4")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each (path, size); the fastest is reported")
    ap.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--write", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        return measure(args.measure[0], Path(args.measure[1]), Path(args.measure[2]), args.chunk_chars)
    if args.write:
        return write_corpora(Path(args.write), args.copies)
    results = {"machine": machine(), "chunk_chars": args.chunk_chars, "load_avg_1m_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results["corpus"] = run(["--write", str(tmp), "--copies", str(args.copies)])
        runs: dict[str, list[dict]] = {}
        for size in map(int, args.sizes.split(",")):
            for r in range(args.repeats):  # old, new, old, new ...: both see the same neighbours
                for path in ("old", "new"):
                    out = tmp / f"{path}-x{size}-{r}"
                    got = run(["--measure", path, str(tmp / f"x{size}"), str(out), "--chunk-chars",
                               str(args.chunk_chars)])
                    runs.setdefault(f"{path}_x{size}", []).append(got)
            for path in ("old", "new"):
                done = runs[f"{path}_x{size}"]
                results[f"{path}_x{size}"] = {**min(done, key=lambda g: g["seconds"]),
                                              "all_seconds": [g["seconds"] for g in done],
                                              "all_peak_rss_mb": [g["peak_rss_mb"] for g in done]}
            old, new = results[f"old_x{size}"], results[f"new_x{size}"]
            results[f"x{size}"] = {
                "same_tokens_per_domain": all(old["domains"][d]["tokens"] == new["domains"][d]["tokens"]
                                              for d in old["domains"]),
                "same_stream": same_bytes(tmp / f"old-x{size}-0", tmp / f"new-x{size}-0"),
                "throughput_new_over_old": round(new["tokens_per_s"] / old["tokens_per_s"], 3),
                "per_cpu_s_new_over_old": round(new["tokens_per_cpu_s"] / old["tokens_per_cpu_s"], 3),
                "stage_rss_new_over_old": round(new["stage_rss_mb"] / old["stage_rss_mb"], 3)}
        sizes = [int(s) for s in args.sizes.split(",")]
        if len(sizes) == 2:
            lo, hi = sizes
            results["growth_stage_rss"] = {p: round(results[f"{p}_x{hi}"]["stage_rss_mb"]
                                                    / results[f"{p}_x{lo}"]["stage_rss_mb"], 3) for p in ("old", "new")}
    results["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
