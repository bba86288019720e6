"""Throughput and peak memory of `hone data build` on the whole packaged pool, and on it twice.

Pool: every packaged source of ``hone.corpus.sources`` (Wikipedia vital summaries, Gene
Ontology definitions, SPDX license texts, the Python standard library, Jane Austen; run
``hone fetch-data`` first for the two Debian ones), as JSON lines in shards of about 8 MB.
``x2`` is the same pool written twice (ids suffixed): twice the input, every document with
an exact copy for dedup to find.

Recipes (executor local, all cores):
- ``stream``: filter (recipe defaults) → MinHash dedup (threshold 0.8): the sharded steps,
  which read in batches, so a worker's memory should not grow with the input;
- ``full``: filter → DSIR toward 300 Gene Ontology definitions (k = 10% of the input
  documents; streaming over shards) → dedup → random selection under a 500k-token budget
  (select holds what reaches it, here about 10% of the input, in memory).

Each (recipe, input) runs in a fresh process (``--measure``) that calls ``run_build``
in-process: its own ``ru_maxrss`` is the main process (whole-pool steps, the global dedup
pass), ``RUSAGE_CHILDREN`` the largest worker. MB/s per core = input MB / wall s / cores.
Prints one JSON line.

    python benchmarks/corpus_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARD_BYTES = 8 << 20


def pool_docs() -> list[dict]:
    from hone.corpus import sources

    docs = []
    for fn in (sources.wikipedia_docs, sources.gene_ontology_docs, sources.license_docs, sources.stdlib_docs,
               sources.austen_docs):
        docs += [{"id": d["id"], "text": d["text"], "source": d["source"]} for d in fn()]
    return docs


def write_shards(docs: list[dict], out: Path, copies: int) -> float:
    """JSON lines in ~8 MB shards; returns MB written."""
    out.mkdir(parents=True)
    k, f, size, total = 0, None, 0, 0
    for c in range(copies):
        for d in docs:
            line = (json.dumps({**d, "id": f"{d['id']}#{c}"}, ensure_ascii=False) + "\n").encode("utf-8")
            if f is None or size >= SHARD_BYTES:
                if f is not None:
                    f.close()
                f, size, k = open(out / f"pool-{k:03d}.jsonl", "wb"), 0, k + 1
            f.write(line)
            size += len(line)
            total += len(line)
    f.close()
    return total / 1e6


def write_pool(tmp: Path) -> None:
    from hone.corpus import sources

    docs, go = pool_docs(), sources.gene_ontology_docs()
    (tmp / "target.jsonl").write_text("".join(json.dumps({"text": d["text"]}) + "\n"
                                              for d in go[::len(go) // 300][:300]))
    print(json.dumps({"docs": len(docs), "mb": {c: write_shards(docs, tmp / f"x{c}", c) for c in (1, 2)}}))


def recipe(inputs: Path, output: Path, kind: str, target: Path, ndocs: int) -> str:
    dedup = '[[steps]]\ntype = "dedup"\nthreshold = 0.8\n'
    steps = '[[steps]]\ntype = "filter"\n\n'
    if kind == "full":  # DSIR before dedup, so that it too reads the doubled input
        steps += (f'[[steps]]\ntype = "dsir"\ntarget = "{target}"\nk = {ndocs // 10}\n\n{dedup}'
                  f'\n[[steps]]\ntype = "select"\nmethod = "random"\nbudget_tokens = 500000\n')
    else:
        steps += dedup
    return f'[build]\ninputs = ["{inputs}"]\noutput = "{output}"\n\n{steps}'


def measure(recipe_path: str) -> None:
    """One build in this process; print wall, CPU and peak RSS (this process, largest worker)."""
    from hone.corpus.build_config import load_build, run_build

    t0 = time.perf_counter()
    m = run_build(load_build(recipe_path), log=lambda msg: print(msg, file=sys.stderr))
    wall = time.perf_counter() - t0
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"seconds": round(wall, 2), "cpu_seconds": round(me.ru_utime + me.ru_stime + kids.ru_utime
                                                                       + kids.ru_stime, 2),
                      "main_maxrss_mb": round(me.ru_maxrss / 1024, 1),
                      "worker_maxrss_mb": round(kids.ru_maxrss / 1024, 1),
                      "totals": m["totals"],
                      "step_seconds": {k: v["manifest"]["seconds"] for k, v in zip(
                          [d.split("/")[-1] for d in m["step_dirs"]],
                          [{"manifest": json.loads((Path(d) / ".hone" / "manifest.json").read_text())}
                           for d in m["step_dirs"]])}}))


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="stream,full")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--write-pool", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        return measure(args.measure)
    if args.write_pool:
        return write_pool(Path(args.write_pool))
    results = {"machine": machine(), "load_avg_1m_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # In a child: Linux carries a process's peak RSS across fork + exec, so the measured
        # processes must be started by a parent that never held the pool.
        p = subprocess.run([sys.executable, __file__, "--write-pool", str(tmp)], capture_output=True, text=True,
                           check=True)
        info = json.loads(p.stdout)
        results["docs"], mb, target = info["docs"], {int(k): v for k, v in info["mb"].items()}, tmp / "target.jsonl"
        for kind in args.recipes.split(","):
            for c in (1, 2):
                rp = tmp / f"{kind}-x{c}.toml"
                rp.write_text(recipe(tmp / f"x{c}", tmp / f"out-{kind}-x{c}", kind, target, results["docs"] * c))
                p = subprocess.run([sys.executable, __file__, "--measure", str(rp)], capture_output=True, text=True,
                                   check=True)
                r = json.loads(p.stdout.strip().splitlines()[-1])
                cores = os.cpu_count() or 1
                r.update(input_mb=round(mb[c], 1), mb_per_s=round(mb[c] / r["seconds"], 2),
                         mb_per_s_per_core=round(mb[c] / r["seconds"] / cores, 2),
                         mb_per_cpu_s=round(mb[c] / r["cpu_seconds"], 2))
                results[f"{kind}_x{c}"] = r
    results["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
