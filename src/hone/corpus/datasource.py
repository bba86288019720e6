"""A user's own corpus (a recipe's ``[[data.sources]]`` entry) made ready for training.

The source's inputs (files, directories or globs in any format ``hone data`` reads) run
through the curate stage's step runner (the ``[curate.filters]`` and exact dedup, each one
optional per source, every drop counted and unreadable lines quarantined); then the held-out
part is set apart by a seeded hash of each document's id (stable when the source grows) and
written as ``heldout/NAME.jsonl``, and the rest becomes ``sources/NAME/train/`` (Parquet, its
``domain`` column the source's name), which the tokenizer reads as one stream.

    summary = prepare_source(recipe.data.sources[0], recipe, Path("runs/kernel"), log=print)
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path
from typing import Callable

from hone.corpus.pipeline import curate
from hone.corpus.read import nonempty_parts, read_inputs
from hone.corpus.write import write_corpus
from hone.errors import HoneError
from hone.recipe import ExactDedupStep, FilterStep, Recipe, SourceConfig
from hone.rundir import (
    CORPUS_DIR,
    HELDOUT_DIR,
    SOURCES_DIR,
    clear_done,
    is_done,
    mark_done,
    read_json,
    source_train_dir,
    write_jsonl,
)

Log = Callable[[str], None]


def source_inputs(source: SourceConfig, index: int) -> list[Path]:
    """The source's input paths, globs expanded (sorted); a pattern or path matching nothing is an error."""
    paths: list[Path] = []
    for pattern in source.inputs:
        if glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if not Path(p).name.startswith("."))
            if not found:
                raise HoneError(f"data.sources[{index}] ({source.name}).inputs: {pattern}: no file matches")
            paths += found
        elif not Path(pattern).exists():
            raise HoneError(f"data.sources[{index}] ({source.name}).inputs: {pattern}: file not found")
        else:
            paths.append(Path(pattern))
    return paths


def _steps(source: SourceConfig, recipe: Recipe) -> list:
    steps: list = []
    if source.filter:
        steps.append(FilterStep(type="filter", write_dropped=recipe.curate.write_dropped,
                                **recipe.curate.filters.model_dump()))
    # Without dedup the step still keeps ids unique (the held-out split and the ledger count by id).
    steps.append(ExactDedupStep(type="exact_dedup", by_text=source.dedup, write_dropped=recipe.curate.write_dropped))
    return steps


def heldout_count(source: SourceConfig, n_docs: int, index: int) -> int:
    """Documents the source keeps out of training: its ``heldout`` count or fraction of ``n_docs``."""
    h = source.heldout
    k = round(h * n_docs) if isinstance(h, float) else int(h)
    if h and k == 0:
        k = 1  # a fraction asked for something: at least one document
    if k >= n_docs and h:
        raise HoneError(f"data.sources[{index}] ({source.name}).heldout: {h} would hold out {k} documents, but the "
                        f"source has {n_docs} after curation (none would be left to train on)")
    return k


def _order_key(seed: int, doc_id: str) -> bytes:
    return hashlib.sha1(f"{seed}:{doc_id}".encode("utf-8")).digest()


def prepare_source(source: SourceConfig, recipe: Recipe, workdir: Path, index: int = 0,
                   log: Log = lambda m: None) -> dict:
    """Curate the source, set its held-out part apart, write its training corpus; skipped when
    done with the same inputs and settings. Returns the source's summary (counts and paths)."""
    workdir = Path(workdir)
    inputs = source_inputs(source, index)
    text_field = source.text_field or recipe.data.text_field
    out = workdir / SOURCES_DIR / source.name
    cfg = recipe.curate.model_copy(update={"steps": _steps(source, recipe)})
    manifest = curate(cfg, inputs, out, text_field=text_field, log=log)
    train_dir, heldout_file = source_train_dir(workdir, source.name), workdir / HELDOUT_DIR / f"{source.name}.jsonl"
    key = hashlib.sha256(json.dumps([manifest["inputs"], manifest["config"], manifest["totals"], source.heldout,
                                     recipe.run.seed], sort_keys=True).encode()).hexdigest()
    if is_done(train_dir) and read_json(Path(str(train_dir) + ".done")).get("key") == key and heldout_file.exists():
        return read_json(Path(str(train_dir) + ".done"))["summary"]
    clear_done(train_dir)
    parts = nonempty_parts(sorted((out / CORPUS_DIR).glob("part-*.parquet")))
    docs = list(read_inputs(parts)) if parts else []
    if not docs:
        read = manifest["steps"]["read"]
        why = ", ".join(f"{r} {d['docs']}" for r, d in read.get("dropped", {}).items()) or "no documents"
        raise HoneError(f"data.sources[{index}] ({source.name}): no document left to train on in "
                        f"{', '.join(source.inputs)} ({why}; see {out / CORPUS_DIR})")
    k = heldout_count(source, len(docs), index)
    ranked = sorted(range(len(docs)), key=lambda i: _order_key(recipe.run.seed, docs[i]["id"]))
    held = set(ranked[:k])
    heldout = [{"id": docs[i]["id"], "text": docs[i]["text"]} for i in sorted(held)]
    train = [{**d, "domain": source.name} for i, d in enumerate(docs) if i not in held]
    write_corpus(train, train_dir)
    if heldout:
        write_jsonl(heldout_file, heldout)
    else:
        heldout_file.unlink(missing_ok=True)
    summary = {"name": source.name, "role": source.role, "weight": source.weight, "inputs": source.inputs,
               "docs_read": manifest["steps"]["read"].get("docs_in"),
               "docs_kept": len(docs), "docs_train": len(train), "docs_heldout": len(heldout),
               "chars_train": sum(len(d["text"]) for d in train),
               "dropped": {name: step.get("dropped", {}) for name, step in manifest["steps"].items()},
               "quarantined": manifest.get("quarantined", {}),
               "heldout_file": str(heldout_file) if heldout else None}
    mark_done(train_dir, {"key": key, "summary": summary})
    log(f"source {source.name}: {len(docs):,} documents after curation, {len(train):,} to train on, "
        f"{len(heldout):,} held out" + (f" -> {heldout_file}" if heldout else ""))
    return summary
