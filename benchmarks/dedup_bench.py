"""MinHash near-dedup: `hone data dedup` (CLI start-up included) vs datasketch and DataTrove.

Base documents: the packaged Wikipedia summaries, Python stdlib files and license texts;
injected near-duplicates: copies of random base documents with 1-10% of words replaced.
Every side uses word 5-gram shingles (hone.corpus.minhash.WORD_RE), 128 permutations and
threshold 0.8; datasketch runs MinHash.update_batch + MinHashLSH insert/query (one process:
it has no parallel mode). DataTrove (when installed: pip install datatrove) runs its four
MinHash stages (signatures, buckets, cluster, filter) with the LocalPipelineExecutor on
all cores, as a subprocess like hone, with the same word tokenizer, lowercasing only, and
hone's 21 bands x 6 rows (its default is 14 x 8). Prints one JSON line.

    python benchmarks/dedup_bench.py --copies 2000 --shards 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from hone.corpus.minhash import WORD_RE
from hone.corpus.sources import license_docs, stdlib_docs, wikipedia_docs

BANDS = [(0.5, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 0.95), (0.95, 1.01)]


def shingles(text: str, n: int = 5) -> set[str]:
    w = WORD_RE.findall(text.lower())
    if len(w) < n:
        return {" ".join(w)} if w else set()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def build_docs(copies: int, seed: int) -> tuple[list[dict], dict[str, str]]:
    rng = random.Random(seed)
    base = [{"id": d["id"], "text": d["text"]} for d in wikipedia_docs() + stdlib_docs() + license_docs()]
    docs, truth = list(base), {}
    for k, src in enumerate(rng.sample(base, copies)):
        words = src["text"].split(" ")
        for i in rng.sample(range(len(words)), max(1, int(rng.uniform(0.01, 0.10) * len(words)))):
            words[i] = f"w{rng.randrange(10**9)}"
        docs.append({"id": f"copy{k}", "text": " ".join(words)})
        truth[f"copy{k}"] = src["id"]
    rng.shuffle(docs)
    return docs, truth


def run_hone(inputs: Path, out: Path) -> tuple[float, set[str]]:
    hone = Path(sys.executable).parent / "hone"
    t0 = time.perf_counter()
    subprocess.run([str(hone), "data", "dedup", str(inputs), "-o", str(out), "--threshold", "0.8",
                    "--ngram", "5", "--num-perm", "128"], check=True, capture_output=True)
    secs = time.perf_counter() - t0
    kept = {i for p in sorted(out.glob("part-*.parquet")) for i in pq.read_table(p, columns=["id"])["id"].to_pylist()}
    return secs, kept


def run_datasketch(inputs: Path) -> tuple[float, set[str]]:
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    docs = [json.loads(line) for p in sorted(inputs.glob("*.jsonl")) for line in open(p, encoding="utf-8")]
    lsh, sigs = MinHashLSH(threshold=0.8, num_perm=128), []
    for i, d in enumerate(docs):
        m = MinHash(num_perm=128)
        m.update_batch([s.encode("utf-8") for s in shingles(d["text"])])
        lsh.insert(i, m)
        sigs.append(m)
    parent = list(range(len(docs)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    kept = {d["id"] for i, d in enumerate(docs) if find(i) == i}
    return time.perf_counter() - t0, kept


def run_datatrove(inputs: Path, work: Path) -> tuple[float, set[str]] | None:
    try:
        import datatrove  # noqa: F401
    except ImportError:
        return None
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--datatrove-run", str(inputs), str(work)], check=True,
                   capture_output=True)
    secs = time.perf_counter() - t0
    import gzip

    kept = {json.loads(line)["id"] for p in sorted((work / "out").glob("*.jsonl.gz"))
            for line in gzip.open(p, "rt", encoding="utf-8")}
    return secs, kept


def datatrove_main(inputs: str, work: str) -> None:
    """DataTrove's MinHash pipeline (its documented 4-stage example) with hone's shingles."""
    import xxhash
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashes import xxhash as dt_xxhash
    from datatrove.utils.text import TextNormConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    # DataTrove 0.10 hands str to xxhash, which xxhash 4 refuses: encode first (UTF-8).
    dt_xxhash.xxhash64 = lambda data: xxhash.xxh64_intdigest(data.encode("utf-8") if isinstance(data, str) else data)

    class HoneWords(WordTokenizer):  # the same words as hone and the datasketch baseline
        def word_tokenize(self, text):
            return WORD_RE.findall(text)

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [m.span() for m in WORD_RE.finditer(text)]

    norm = TextNormConfig(lowercase=True, norm_whitespace=False, remove_punctuation=False,
                          norm_unicode_diacritics=False, norm_numbers=False)
    cfg = MinhashConfig(n_grams=5, num_buckets=21, hashes_per_bucket=6, norm_config=norm)
    shards, cores, w = len(list(Path(inputs).glob("*.jsonl"))), os.cpu_count() or 1, Path(work)
    read = lambda: JsonlReader(inputs, glob_pattern="*.jsonl")  # noqa: E731
    stages = [
        ([read(), MinhashDedupSignature(output_folder=str(w / "sigs"), config=cfg, language=HoneWords())], shards),
        ([MinhashDedupBuckets(input_folder=str(w / "sigs"), output_folder=str(w / "buckets"), config=cfg)],
         cfg.num_buckets),
        ([MinhashDedupCluster(input_folder=str(w / "buckets"), output_folder=str(w / "remove_ids"), config=cfg)], 1),
        ([read(), MinhashDedupFilter(input_folder=str(w / "remove_ids")), JsonlWriter(str(w / "out"))], shards),
    ]
    for k, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(tasks, cores),
                              logging_dir=str(w / f"logs{k}"), start_method="fork").run()


def quality(docs: list[dict], truth: dict[str, str], kept: set[str], sets: dict[str, set[str]]) -> dict:
    recall = {}
    for lo, hi in BANDS:
        pairs = [(c, o) for c, o in truth.items() if lo <= _j(sets[c], sets[o]) < hi]
        found = sum(not (c in kept and o in kept) for c, o in pairs)
        recall[f"{lo:.2f}-{min(hi, 1.0):.2f}"] = {"pairs": len(pairs),
                                                  "recall": round(found / len(pairs), 4) if pairs else None}
    high = [(c, o) for c, o in truth.items() if _j(sets[c], sets[o]) >= 0.85]
    index = defaultdict(list)
    for d in docs:
        if d["id"] in kept:
            for s in sets[d["id"]]:
                index[s].append(d["id"])
    removed = [d["id"] for d in docs if d["id"] not in kept]
    ok = 0
    for rid in removed:  # a removal is right when some kept document has Jaccard >= 0.5 with it
        cands = {k for s in sets[rid] for k in index.get(s, ())}
        ok += any(_j(sets[rid], sets[k]) >= 0.5 for k in cands)
    return {"removed": len(removed), "precision": round(ok / len(removed), 4) if removed else None,
            "recall_j_ge_0.85": round(sum(not (c in kept and o in kept) for c, o in high) / len(high), 4),
            "recall_by_jaccard": recall}


def _j(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="Runs of each tool, interleaved; medians reported.")
    ap.add_argument("--datatrove-run", nargs=2, metavar=("INPUTS", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.datatrove_run:
        return datatrove_main(*args.datatrove_run)
    # Bytecode compiled once, as `pip install` does: this sandbox sets PYTHONDONTWRITEBYTECODE,
    # which would otherwise make every `hone` start-up compile the package from source.
    import compileall

    import hone

    compileall.compile_dir(Path(hone.__file__).parent, quiet=1)
    docs, truth = build_docs(args.copies, args.seed)
    secs: dict[str, list[float]] = defaultdict(list)
    kept: dict[str, set[str]] = {}
    load = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "in"
        inputs.mkdir()
        for k in range(args.shards):
            with open(inputs / f"shard-{k}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(d) + "\n" for d in docs[k::args.shards])
        mb = sum(p.stat().st_size for p in inputs.iterdir()) / 1e6
        for r in range(args.repeat):
            load.append(os.getloadavg()[0])
            runs = {"hone": lambda: run_hone(inputs, Path(tmp) / f"out{r}"),
                    "datasketch": lambda: run_datasketch(inputs),
                    "datatrove": lambda: run_datatrove(inputs, Path(tmp) / f"datatrove{r}")}
            for name, fn in runs.items():
                res = fn()
                if res is not None:
                    secs[name].append(res[0])
                    kept[name] = res[1]
    sets = {d["id"]: shingles(d["text"]) for d in docs}
    out = {"docs": len(docs), "mb": round(mb, 1), "injected_copies": len(truth), "cores": os.cpu_count(),
           "repeat": args.repeat, "load_avg_1m_before_each_round": [round(x, 2) for x in load]}
    for name in ("hone", "datasketch", "datatrove"):
        if name not in secs:
            out[name] = "not installed (pip install datatrove)"
            continue
        med = statistics.median(secs[name])
        out[name] = {"seconds": round(med, 2), "all_seconds": [round(x, 2) for x in secs[name]],
                     "docs_per_s": round(len(docs) / med), **quality(docs, truth, kept[name], sets)}
    out["speedup"] = round(out["datasketch"]["seconds"] / out["hone"]["seconds"], 2)
    if isinstance(out["datatrove"], dict):
        out["speedup_vs_datatrove"] = round(out["datatrove"]["seconds"] / out["hone"]["seconds"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
