"""The tokenize stage, streaming: corpus Parquet -> token shards per domain, in flat memory.

The curated Parquet parts are read in record batches (``text`` and ``domain`` only). Each
domain's documents, in file order, are cut into chunks of about ``chunk_chars`` characters;
a chunk is shuffled, encoded in slices with ``tokenizer.encode_batch`` (the Rust tokenizer
uses every core), framed ``[BOS] ids EOS`` by the run's :class:`TokenConventions` and written
as its own shard (layout in :mod:`hone.tokens.shards`). Memory is a chunk per domain, whatever
the corpus size. The shuffle never holds the corpus: documents are shuffled within their
chunk, and the shards' reading order is a permutation drawn from the seed.

Every shard is written then renamed and recorded in ``shard-NNNNN.done`` with the text's
fingerprint and the settings; a rerun after a kill reads the corpus again, reuses every
recorded shard and encodes only the rest, so its output is byte-identical to an uninterrupted
run. Chunk 0 is shuffled by ``default_rng(seed)`` as the in-memory stage shuffled a whole
domain, so a domain of one chunk gives the same stream as before.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
from tokenizers import Tokenizer

from hone.errors import HoneError
from hone.rundir import atomic_path, is_done, mark_done, read_json, write_json
from hone.tokens.conventions import TokenConventions
from hone.tokens.shards import read_index, token_dtype, tokenizer_hash

CHUNK_CHARS = 1 << 24  # text per shard (~4M tokens of English): the stage's memory scales with this, not the corpus
ENCODE_CHARS = 1 << 22  # text per encode_batch call: fewer calls run faster, but its Encodings take ~80 bytes a token
READ_ROWS = 1024  # Parquet rows per record batch


def tokenize_corpus(corpus_dir: Path, tokenizer: Tokenizer, out_dir: Path, seed: int = 0,
                    conventions: TokenConventions | None = None, *, chunk_chars: int = CHUNK_CHARS) -> dict:
    """Tokenize every domain of the corpus into ``out_dir/train/<domain>/``; return each
    domain's index. Skipped when done with the same tokenizer and framing; resumes a killed run."""
    conv = conventions or TokenConventions.detect(tokenizer)
    marker = Path(out_dir) / "train"
    key = _settings(tokenizer, conv, seed, chunk_chars)
    if is_done(marker):
        done = read_json(Path(str(marker) + ".done"))
        if done.get("tokenizer_hash") == key["tokenizer_hash"] and done.get("framing") == _framing(conv):
            return {d: read_index(marker / d) for d in sorted(done.get("domains", {}))}
    files = corpus_files(corpus_dir)
    _remove_partial_files(marker)
    writers: dict[str, DomainWriter] = {}
    for domain, texts in domain_batches(files):
        if domain not in writers:
            writers[domain] = DomainWriter(marker / domain, tokenizer, conv, seed, chunk_chars, key)
        writers[domain].add(texts)
    summary = {domain: writers[domain].finish() for domain in sorted(writers)}
    mark_done(marker, {"tokenizer_hash": key["tokenizer_hash"], "framing": _framing(conv),
                       "domains": {k: v["tokens"] for k, v in summary.items()}})
    return summary


def write_shard(texts: list[str], tokenizer: Tokenizer, out_dir: Path, seed: int,
                conventions: TokenConventions | None = None, *, chunk_chars: int = CHUNK_CHARS) -> dict:
    """Tokenize a list of documents into the domain directory ``out_dir`` (shards + index),
    as the stage does one domain; return the index."""
    conv = conventions or TokenConventions.detect(tokenizer)
    writer = DomainWriter(Path(out_dir), tokenizer, conv, seed, chunk_chars,
                          _settings(tokenizer, conv, seed, chunk_chars))
    if texts:
        writer.add(pa.array(texts, type=pa.large_string()))
    return writer.finish()


def corpus_files(corpus_dir: Path) -> list[Path]:
    files = sorted(Path(corpus_dir).glob("*.parquet"))
    if not files:
        raise HoneError(f"{corpus_dir}: no Parquet files (run the curate stage first)")
    return files


def domain_batches(files: list[Path]) -> Iterator[tuple[str, pa.Array]]:
    """``(domain, texts)`` for each domain of each record batch, in file order; a missing or
    empty domain is ``general``. A batch that mixes domains is split by copying (``take``),
    so holding one domain's texts keeps no other domain's text alive."""
    for f in files:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if "text" not in names:
            raise HoneError(f"{f}: no 'text' column (a curated corpus has text and domain)")
        columns = ["text", "domain"] if "domain" in names else ["text"]
        for batch in pf.iter_batches(batch_size=READ_ROWS, columns=columns):
            texts = batch.column(0)
            if texts.null_count:
                raise HoneError(f"{f}: {texts.null_count} documents have no text (null)")
            raw = batch.column(1).to_pylist() if len(columns) == 2 else [None] * len(texts)
            domains = np.array([d or "general" for d in raw], dtype=object)
            for domain in sorted(set(domains.tolist())):
                rows = np.flatnonzero(domains == domain)
                yield domain, texts if len(rows) == len(texts) else texts.take(rows)


class DomainWriter:
    """Cuts one domain's documents into chunks, writes (or reuses) a shard per chunk, and
    writes the domain's ``index.json`` at :meth:`finish`."""

    def __init__(self, out_dir: Path, tokenizer: Tokenizer, conv: TokenConventions, seed: int, chunk_chars: int,
                 key: dict):
        if chunk_chars < 1:
            raise HoneError(f"chunk_chars {chunk_chars} must be at least 1")
        self.dir, self.tokenizer, self.conv, self.seed = Path(out_dir), tokenizer, conv, seed
        self.chunk_chars, self.key = chunk_chars, key
        self.dtype = token_dtype(tokenizer.get_vocab_size())
        self.pending: list[pa.Array] = []
        self.pending_chars = 0
        self.records: list[dict] = []
        self.dir.mkdir(parents=True, exist_ok=True)

    def add(self, texts: pa.Array) -> None:
        """Take documents in order; write every chunk they complete."""
        cum = np.cumsum(pc.utf8_length(texts).to_numpy(zero_copy_only=False).astype(np.int64))
        start, base = 0, 0  # base: characters of texts[:start]
        while start < len(texts):
            # The chunk closes at the first document that brings it to chunk_chars.
            end = int(np.searchsorted(cum, base + self.chunk_chars - self.pending_chars, side="left")) + 1
            if end > len(texts):
                self.pending.append(texts.slice(start))
                self.pending_chars += int(cum[-1]) - base
                return
            self.pending.append(texts.slice(start, end - start))
            self.pending_chars += int(cum[end - 1]) - base
            self._flush()
            start, base = end, int(cum[end - 1])

    def finish(self) -> dict:
        """Write the last chunk, then ``index.json`` with the shards in their permuted reading order."""
        if self.pending:
            self._flush()
        order = np.random.default_rng([self.seed, zlib.crc32(self.dir.name.encode())]).permutation(len(self.records))
        shards = [self.records[i] for i in order]
        index = {
            "format": 2,
            "dtype": self.dtype.str,
            "shards": [{k: s[k] for k in ("file", "offsets", "tokens", "docs", "chars")} for s in shards],
            "tokens": sum(s["tokens"] for s in shards),
            "docs": sum(s["docs"] for s in shards),
            "chars": sum(s["chars"] for s in shards),
            "eos_id": self.conv.eos_id,
            "bos_id": self.conv.bos_id,
            "add_bos": self.conv.add_bos,
            "conventions": self.conv.to_json(),
            "tokenizer_hash": self.key["tokenizer_hash"],
            "seed": self.seed,
            "chunk_chars": self.chunk_chars,
        }
        write_json(self.dir / "index.json", index)
        _remove_stale_shards(self.dir, len(self.records))
        return index

    def _flush(self) -> None:
        texts = pa.concat_arrays(self.pending)
        k = len(self.records)
        stem = self.dir / f"shard-{k:05d}"
        record = {"file": f"{stem.name}.bin", "offsets": f"{stem.name}.idx.npy", "docs": len(texts),
                  "chars": self.pending_chars, "fingerprint": _fingerprint(texts), "settings": self.key}
        self.pending, self.pending_chars = [], 0
        done = self._recorded(stem, record)
        if done is None:
            # Chunk 0 shuffles as the in-memory stage shuffled a whole domain (same stream for small corpora).
            rng = np.random.default_rng(self.seed if k == 0 else [self.seed, k])
            texts = texts.to_pylist()  # rebinding drops the Arrow copy of the chunk while it is encoded
            done = {**record, "tokens": self._write(texts, stem, rng)}
            mark_done(stem, done)
        self.records.append(done)

    def _recorded(self, stem: Path, record: dict) -> dict | None:
        """The shard's record when a finished shard of this very chunk and settings is on disk."""
        if not is_done(stem):
            return None
        done = read_json(Path(str(stem) + ".done"))
        same = all(done.get(k) == record[k] for k in record)
        bin_path, idx_path = self.dir / record["file"], self.dir / record["offsets"]
        if not same or not bin_path.is_file() or not idx_path.is_file():
            return None
        return done if bin_path.stat().st_size == done.get("tokens", -1) * self.dtype.itemsize else None

    def _write(self, texts: list[str], stem: Path, rng: np.random.Generator) -> int:
        """Encode the shuffled chunk slice by slice into ``stem.bin`` and its ``.idx.npy``; return its tokens."""
        order = rng.permutation(len(texts))
        starts, n = [], 0
        with atomic_path(stem.with_name(stem.name + ".bin")) as tmp, open(tmp, "wb") as f:
            for part in _slices(order, texts):
                ids, lengths = self._frame([texts[i] for i in part])
                f.write(ids.tobytes())
                starts.append(n + np.concatenate([[0], np.cumsum(lengths[:-1])]))
                n += int(lengths.sum())
        with atomic_path(stem.with_name(stem.name + ".idx.npy")) as tmp, open(tmp, "wb") as f:
            np.save(f, np.concatenate(starts).astype(np.int64))
        return n

    def _frame(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The documents' ids framed as ``conv.document`` frames them (``[BOS] ids EOS``), flat,
        and each framed length; the frame tokens are placed with numpy, not per document."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        sizes = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=self.dtype, count=int(sizes.sum()))
        *head, eos = self.conv.document([])  # [BOS] EOS or EOS
        lengths = sizes + len(head) + 1
        ends = np.cumsum(lengths)
        out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=self.dtype)
        body = np.ones(len(out), dtype=bool)
        for j, token in enumerate(head):
            out[ends - lengths + j], body[ends - lengths + j] = token, False
        out[ends - 1], body[ends - 1] = eos, False
        out[body] = ids
        return out, lengths


def _slices(order: np.ndarray, texts: list[str]) -> Iterator[np.ndarray]:
    """``order`` cut into runs of about ENCODE_CHARS characters (one encode_batch call each)."""
    cum = np.cumsum([len(texts[i]) for i in order])
    start = 0
    while start < len(order):
        end = max(start + 1, int(np.searchsorted(cum, (cum[start - 1] if start else 0) + ENCODE_CHARS, side="right")))
        yield order[start:end]
        start = end


def _framing(conv: TokenConventions) -> dict:
    return {"eos_id": conv.eos_id, "bos_id": conv.bos_id, "add_bos": conv.add_bos}


def _settings(tokenizer: Tokenizer, conv: TokenConventions, seed: int, chunk_chars: int) -> dict:
    """What a shard's bytes depend on besides its text."""
    return {"tokenizer_hash": tokenizer_hash(tokenizer), **_framing(conv), "seed": int(seed),
            "chunk_chars": int(chunk_chars)}


def _fingerprint(texts: pa.Array) -> str:
    """xxh3 of a chunk's documents (text and boundaries): a recorded shard is reused only for the same text."""
    h = xxhash.xxh3_64()
    for part in _text_buffers(texts):
        h.update(part)
    return h.hexdigest()


def _text_buffers(texts: pa.Array) -> Iterator[bytes]:
    """The document lengths then the UTF-8 bytes of ``texts``, independent of its buffers' layout."""
    texts = texts.cast(pa.large_string())
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[texts.offset:texts.offset + len(texts) + 1]
    yield np.diff(offsets).tobytes()
    data = texts.buffers()[2]
    if data is not None:
        yield memoryview(data)[int(offsets[0]):int(offsets[-1])]


def _remove_partial_files(train_dir: Path) -> None:
    """Temporary files of shards a killed run was writing."""
    if train_dir.is_dir():
        for tmp in train_dir.glob("*/.shard-*.tmp"):
            tmp.unlink(missing_ok=True)


def _remove_stale_shards(domain_dir: Path, n: int) -> None:
    """Shards numbered ``n`` and above, left by an earlier, larger corpus."""
    for path in domain_dir.glob("shard-*"):
        number = path.name.split(".")[0].removeprefix("shard-")
        if number.isdigit() and int(number) >= n:
            path.unlink(missing_ok=True)
