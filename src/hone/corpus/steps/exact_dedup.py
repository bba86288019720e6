"""Exact deduplication on a hash of the normalized text.

Normalizing (lowercase, punctuation removed, whitespace collapsed) catches copies that
differ only in case, spacing or punctuation. The first occurrence is kept; later ones are
dropped with reason ``exact_duplicate`` and the id of the document that survived.
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from pathlib import Path

from hone.corpus.read import Quarantine, StepStats, batched, expand_inputs, read_shard
from hone.corpus.runner import finish_output, prepare_output, run_decide, run_key, step_manifest
from hone.corpus.write import ShardWriter
from hone.rundir import write_jsonl

_PUNCT = re.compile(r"[^\w\s]|_")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _PUNCT.sub("", text)).strip()


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


class ExactDedup:
    """Call it on each document in order: None (first seen) or (reason, detail) for a copy.

    Documents whose id was already kept are dropped too (``duplicate_id``): the corpus
    ``id`` column must stay unique.
    """

    def __init__(self, by_text: bool = True) -> None:
        self.by_text = by_text  # False: only keep ids unique (curate.exact_dedup = false)
        self.seen: dict[bytes, str] = {}
        self.ids: set[str] = set()

    def __call__(self, doc: dict) -> tuple[str, dict] | None:
        if doc["id"] in self.ids:
            return "duplicate_id", {}
        if self.by_text:
            h = text_hash(doc["text"])
            if (first := self.seen.get(h)) is not None:
                return "exact_duplicate", {"duplicate_of": first}
            self.seen[h] = doc["id"]
        self.ids.add(doc["id"])
        return None


BATCH = 1024  # documents per Parquet batch


def exact_dedup_step(inputs: list, out_dir: Path, *, text_field: str = "text", executor=None,
                     by_text: bool = True, write_dropped: bool = False) -> dict:
    """The ``exact_dedup`` step: ``ExactDedup`` over every shard in input order (one process:
    the first copy anywhere wins), one output shard per input shard; ``write_dropped`` keeps
    the removed documents (with ``duplicate_of``) in OUT/.hone/dropped/dropped.jsonl."""
    t0, out_dir, shards = time.perf_counter(), Path(out_dir), expand_inputs(inputs)
    config = {"step": "exact_dedup", "by_text": by_text, "text_field": text_field}
    if write_dropped:  # (absent when off: the key of runs made before the option existed)
        config["write_dropped"] = True
    work, done = prepare_output(out_dir, run_key(shards, config))
    if done is not None:
        return done
    work.mkdir(parents=True, exist_ok=True)
    read, step, q = StepStats(), StepStats(), Quarantine(work / "quarantine-00000.jsonl")
    decide, parts = ExactDedup(by_text=by_text), []
    dropped: list[dict] | None = [] if write_dropped else None
    for i, sh in enumerate(shards):
        writer = ShardWriter(out_dir / f"part-{i:05d}.parquet")
        for batch in batched(read_shard(sh, text_field, q, read), BATCH):
            writer.write(list(run_decide(batch, decide, step, dropped)))
        parts.append(writer.close().name)
    q.close()
    write_jsonl(work / "dropped-00000.jsonl", dropped or [])
    manifest = step_manifest("exact_dedup", shards, read, step, config, parts, t0)
    return finish_output(out_dir, manifest, [out_dir / p for p in parts], [work / "quarantine-00000.jsonl"],
                         [work / "dropped-00000.jsonl"])
