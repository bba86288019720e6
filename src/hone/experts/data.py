"""Each expert's corpus, held-out set and token streams, and the interleaved union stream that
the seed phase and the joint baseline train on.

An expert's documents come from the curated corpus: by its ``source`` column (e.g. the
packaged ``licenses``) and/or by BM25 retrieval from the expert's keywords. A document is
held out of *all* training when a hash of its id falls below ``heldout_fraction``: the rule
looks at the document only, so every expert, the seed and the joint model agree on it, and
adding an expert later changes nothing for the others.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import xxhash

from hone.corpus.retrieve import retrieve
from hone.errors import HoneError
from hone.recipe import DomainConfig, ExpertDomain, ExpertsConfig
from hone.rundir import atomic_path, read_json, write_json, write_jsonl
from hone.tokens import write_shard

GENERAL = "general"  # the loader's name for the stream of everything else


def read_curated(workdir: Path) -> list[dict]:
    """id, text, source of every curated document, in file order."""
    files = sorted((Path(workdir) / "corpus").glob("*.parquet"))
    if not files:
        raise HoneError(f"{Path(workdir) / 'corpus'}: no Parquet files (run the curate stage first)")
    docs = []
    for f in files:
        t = pq.read_table(f, columns=["id", "text", "source"]).to_pydict()
        docs += [{"id": i, "text": x, "source": s} for i, x, s in zip(t["id"], t["text"], t["source"])]
    return docs


def is_heldout(doc_id: str, fraction: float) -> bool:
    return xxhash.xxh64_intdigest(doc_id.encode()) / 2**64 < fraction


def select(docs: list[dict], spec: ExpertDomain) -> np.ndarray:
    """Mask of the documents that belong to the expert: its sources, plus its retrieval top_k."""
    mask = np.array([d["source"] in spec.sources for d in docs], dtype=bool)
    if spec.keywords or spec.examples:
        cfg = DomainConfig(name=spec.name, keywords=spec.keywords, examples=spec.examples, top_k=spec.top_k)
        mask |= retrieve([d["text"] for d in docs], cfg).selected
    if not mask.any():
        what = f"sources {spec.sources}" if spec.sources else "its keywords"
        raise HoneError(f"experts.domain {spec.name!r}: no curated document matches {what}")
    return mask


def build_expert_data(workdir: Path, edir: Path, spec: ExpertDomain, cfg: ExpertsConfig, tokenizer, seed: int) -> dict:
    """Write ``edir/heldout.jsonl`` and ``edir/tokens/train/{NAME,general}/``; return counts."""
    docs = read_curated(workdir)
    mask = select(docs, spec)
    held = np.array([is_heldout(d["id"], cfg.heldout_fraction) for d in docs], dtype=bool)
    train_docs = [d["text"] for d, m, h in zip(docs, mask, held) if m and not h]
    if not train_docs:
        raise HoneError(f"experts.domain {spec.name!r}: every matching document is held out; add data")
    summary = {"docs": int(mask.sum()), "train_docs": len(train_docs)}
    domain_index = write_shard(train_docs, tokenizer, edir / "tokens" / "train" / spec.name, seed)
    summary["train_tokens"] = domain_index["tokens"]
    if spec.domain_ratio < 1:
        general = [d["text"] for d, m, h in zip(docs, mask, held) if not m and not h]
        summary["general_tokens"] = write_shard(general, tokenizer, edir / "tokens" / "train" / GENERAL, seed)["tokens"]
    if spec.eval_set is None:
        rows = [{"id": d["id"], "text": d["text"], "source": d["source"]}
                for d, m, h in zip(docs, mask, held) if m and h][:cfg.heldout_max_docs]
        if not rows:
            raise HoneError(f"experts.domain {spec.name!r}: no held-out document (raise experts.heldout_fraction "
                            f"or give eval_set)")
        write_jsonl(edir / "heldout.jsonl", rows)
        summary["heldout_docs"] = len(rows)
    return summary


def heldout_path(edir: Path, spec: ExpertDomain) -> Path:
    return Path(spec.eval_set) if spec.eval_set else edir / "heldout.jsonl"


def training_rows(loader, steps: int) -> list[np.ndarray]:
    """The input rows ``[batch, seq_len]`` of the first ``steps`` batches a loader serves."""
    return [loader.next_batch()[0].numpy() for _ in range(steps)]


def interleave(batches: dict[str, list[np.ndarray]], counts: dict[str, int]) -> list[np.ndarray]:
    """Take ``counts[name]`` batches of each source, spread evenly: at every point the share of
    each source is as close to its final share as whole batches allow (deterministic)."""
    total = sum(counts.values())
    taken = {k: 0 for k in counts}
    out = []
    for i in range(total):
        # The source furthest behind its quota goes next; ties go to the first listed.
        name = max(counts, key=lambda k: (counts[k] * (i + 1) / total - taken[k], -list(counts).index(k)))
        out.append(batches[name][taken[name]])
        taken[name] += 1
    return out


def write_union_stream(rows: list[np.ndarray], out_dir: Path, eos: int, tokenizer_hash: str) -> dict:
    """One flat token stream whose consecutive ``seq_len`` windows are exactly ``rows`` (in order),
    so a ratio-1 loader with the same batch size replays those batches."""
    flat = np.concatenate([r.reshape(-1) for r in rows] + [np.array([eos])])
    dtype = np.dtype("<u2") if flat.max() < 65536 else np.dtype("<u4")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "shard-00000.bin") as tmp:
        flat.astype(dtype).tofile(tmp)
    index = {"dtype": dtype.str, "shards": [{"file": "shard-00000.bin", "tokens": int(len(flat)), "docs": 0}],
             "tokens": int(len(flat)), "docs": 0, "doc_offsets": [], "eos_id": int(eos),
             "tokenizer_hash": tokenizer_hash}
    write_json(out_dir / "index.json", index)
    return index


def read_done(path: Path) -> dict | None:
    return read_json(path) if Path(path).exists() else None
