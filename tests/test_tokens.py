"""Tokenize stage: streamed, sharded, resumable; shards round-trip to the documents, framed by
the conventions; the sharded view slices like a concatenation; the token ledger adds up."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from hone.errors import HoneError
from hone.rundir import read_json, write_json
from hone.tokens import (
    EOS_TOKEN,
    ShardedTokens,
    TokenConventions,
    doc_offsets,
    load_tokens,
    token_ledger,
    tokenize_corpus,
    train_bpe,
    write_shard,
)
from hone.tokens.tokenize import DomainWriter
from hone.train.data import TokenStream


def write_corpus(d, texts, domains, parts=1):
    d.mkdir(parents=True, exist_ok=True)
    n = len(texts)
    for p in range(parts):
        rows = slice(p * n // parts, (p + 1) * n // parts)
        pq.write_table(pa.table({"id": [str(i) for i in range(n)][rows], "text": texts[rows],
                                 "domain": domains[rows]}), d / f"part-{p:05d}.parquet", row_group_size=7)
    return d


@pytest.fixture
def corpus(tmp_path):
    texts = [f"the protein {i} binds the gene" for i in range(20)] + [f"a city of {i} people" for i in range(10)]
    domains = ["biomedical"] * 20 + ["general"] * 10
    return write_corpus(tmp_path / "corpus", texts, domains), texts, domains


@pytest.fixture
def big_corpus(tmp_path):
    """Three parts, two domains interleaved, ~30 documents per shard at chunk_chars 600."""
    rng = np.random.default_rng(3)
    texts = [f"doc {i} " + " ".join(rng.choice(["gene", "cell", "city", "river", "binds"], size=rng.integers(0, 6)))
             for i in range(400)]
    domains = [("biomedical" if rng.random() < 0.6 else "general") if i % 50 else None for i in range(400)]
    return write_corpus(tmp_path / "corpus", texts, domains, parts=3), texts, domains


def documents(domain_dir, tok, conv):
    """Each framed document of the domain's stream, decoded; checks the framing on the way."""
    arr = np.asarray(load_tokens(domain_dir))
    starts = doc_offsets(domain_dir)
    out = []
    for a, b in zip(starts, list(starts[1:]) + [len(arr)]):
        seg = arr[a:b].tolist()
        assert seg[-1] == conv.eos_id and conv.eos_id not in seg[:-1]
        if conv.add_bos:
            assert seg[0] == conv.bos_id
            seg = seg[1:]
        out.append(tok.decode(seg[:-1]))
    return out


def tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_bpe_has_eos_zero_and_round_trips():
    tok = train_bpe(["hello world, the protein binds", "def f(x):\n    return x"] * 20, 300)
    assert tok.token_to_id(EOS_TOKEN) == 0
    text = "the protein binds\n    return"
    assert tok.decode(tok.encode(text).ids) == text


def test_shards_hold_every_document_once(corpus, tmp_path):
    cdir, texts, domains = corpus
    tok = train_bpe(texts, 300)
    summary = tokenize_corpus(cdir, tok, tmp_path / "tokens", seed=1)
    assert set(summary) == {"biomedical", "general"}
    conv = TokenConventions.detect(tok)
    for domain in summary:
        ddir = tmp_path / "tokens" / "train" / domain
        index = read_json(ddir / "index.json")
        assert index == summary[domain]
        expected = sorted(t for t, dom in zip(texts, domains) if dom == domain)
        assert sorted(documents(ddir, tok, conv)) == expected
        assert index["tokens"] == len(load_tokens(ddir)) and index["dtype"] == "<u2"
        assert index["docs"] == len(expected) and index["chars"] == sum(map(len, expected))
        assert (index["eos_id"], index["bos_id"], index["add_bos"]) == (0, None, False)
        assert "doc_offsets" not in index  # offsets live in the shards' .idx.npy


def test_many_shards_round_trip_with_bos(big_corpus, tmp_path):
    cdir, texts, domains = big_corpus
    tok = train_bpe(texts, 300)
    tok.add_special_tokens(["<s>"])
    conv = TokenConventions.detect(tok, add_bos=True)
    summary = tokenize_corpus(cdir, tok, tmp_path / "tokens", seed=5, conventions=conv, chunk_chars=600)
    for domain, index in summary.items():
        ddir = tmp_path / "tokens" / "train" / domain
        assert len(index["shards"]) > 3 and isinstance(load_tokens(ddir), ShardedTokens)
        assert index["bos_id"] == tok.token_to_id("<s>") and index["add_bos"] is True
        expected = [t for t, d in zip(texts, domains) if (d or "general") == domain]
        got = documents(ddir, tok, conv)
        assert sorted(got) == sorted(expected)  # every document, once
        assert got != expected  # shuffled
        # The shards are read in a permuted order.
        assert [s["file"] for s in index["shards"]] != sorted(s["file"] for s in index["shards"])


def test_one_chunk_is_the_in_memory_stream(corpus, tmp_path):
    """A domain that fits one chunk tokenizes exactly as the in-memory stage did (the demo's
    streams and results do not move)."""
    cdir, texts, domains = corpus
    tok = train_bpe(texts, 300)
    tokenize_corpus(cdir, tok, tmp_path / "tokens", seed=4)
    for domain in ("biomedical", "general"):
        docs = [t for t, d in zip(texts, domains) if d == domain]
        order = np.random.default_rng(4).permutation(len(docs))
        old = [i for j in order for i in tok.encode(docs[j], add_special_tokens=False).ids + [0]]
        assert np.asarray(load_tokens(tmp_path / "tokens" / "train" / domain)).tolist() == old


def test_resume_after_a_kill_is_byte_identical(big_corpus, tmp_path, monkeypatch):
    cdir, texts, _ = big_corpus
    tok = train_bpe(texts, 300)
    tokenize_corpus(cdir, tok, tmp_path / "whole", seed=2, chunk_chars=600)

    real_write, calls = DomainWriter._write, []

    def dies_at_the_fifth_shard(self, chunk, stem, rng):
        calls.append(stem.name)
        if len(calls) == 5:
            (stem.parent / f".{stem.name}.bin.partial.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return real_write(self, chunk, stem, rng)

    monkeypatch.setattr(DomainWriter, "_write", dies_at_the_fifth_shard)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(cdir, tok, tmp_path / "resumed", seed=2, chunk_chars=600)
    assert not (tmp_path / "resumed" / "train.done").exists()
    monkeypatch.setattr(DomainWriter, "_write", real_write)
    encoded = []
    monkeypatch.setattr(DomainWriter, "_write",
                        lambda self, *a: encoded.append(a[1].name) or real_write(self, *a))
    tokenize_corpus(cdir, tok, tmp_path / "resumed", seed=2, chunk_chars=600)
    whole = tree_bytes(tmp_path / "whole")
    assert tree_bytes(tmp_path / "resumed") == whole
    assert len(encoded) == sum(f.endswith(".bin") for f in whole) - 4  # the four finished shards were reused


def test_rerun_skips_and_new_tokenizer_redoes(corpus, tmp_path):
    cdir, texts, _ = corpus
    tok = train_bpe(texts, 300)
    tokenize_corpus(cdir, tok, tmp_path / "tokens")
    shard = tmp_path / "tokens" / "train" / "general" / "shard-00000.bin"
    mtime = shard.stat().st_mtime_ns
    assert tokenize_corpus(cdir, tok, tmp_path / "tokens")["general"]["tokens"] > 0
    assert shard.stat().st_mtime_ns == mtime
    tokenize_corpus(cdir, train_bpe(texts, 290), tmp_path / "tokens")
    assert shard.stat().st_mtime_ns != mtime


def test_a_changed_corpus_is_not_served_stale_shards(big_corpus, tmp_path):
    cdir, texts, domains = big_corpus
    tok = train_bpe(texts, 300)
    tokenize_corpus(cdir, tok, tmp_path / "tokens", chunk_chars=600)
    (tmp_path / "tokens" / "train.done").unlink()  # as when the curate stage reruns
    fewer = write_corpus(tmp_path / "fewer", texts[:120], domains[:120])
    summary = tokenize_corpus(fewer, tok, tmp_path / "tokens", chunk_chars=600)
    conv = TokenConventions.detect(tok)
    for domain, index in summary.items():
        ddir = tmp_path / "tokens" / "train" / domain
        assert sorted(documents(ddir, tok, conv)) == sorted(t for t, d in zip(texts[:120], domains[:120])
                                                            if (d or "general") == domain)
        assert len(list(ddir.glob("shard-*.bin"))) == len(index["shards"])  # no stale shard left


def test_large_vocab_is_uint32(tmp_path):
    vocab = {EOS_TOKEN: 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 70_000)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS_TOKEN])
    texts = ["w69999 w3", "w65536 w65535 w70"]
    index = write_shard(texts, tok, tmp_path / "d", seed=0)
    assert index["dtype"] == "<u4"
    arr = np.asarray(load_tokens(tmp_path / "d"))
    assert arr.dtype == np.dtype("<u4") and sorted(arr.tolist()) == sorted([69999, 3, 0, 65536, 65535, 70, 0])


def test_sharded_view_slices_like_a_concatenation(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 60_000, size=n).astype("<u2") for n in (5, 1, 17, 3, 40)]
    for i, p in enumerate(parts):
        p.tofile(tmp_path / f"s{i}.bin")
    view = ShardedTokens([tmp_path / f"s{i}.bin" for i in range(5)], [len(p) for p in parts], np.dtype("<u2"))
    flat = np.concatenate(parts)
    assert len(view) == len(flat) and view.dtype == flat.dtype and view.shape == flat.shape
    for a in range(len(flat) + 1):
        for b in range(a, len(flat) + 2):
            assert np.array_equal(view[a:b], flat[a:b]), (a, b)
    for key in (slice(None), slice(-7, None), slice(3, 50, 4), slice(None, None, -3), slice(10, 2)):
        assert np.array_equal(view[key], flat[key]), key
    assert view[21] == flat[21] and view[-1] == flat[-1]
    assert np.array_equal(view[[0, 65, 6, 22]], flat[[0, 65, 6, 22]]) and np.array_equal(np.asarray(view), flat)
    with pytest.raises(IndexError):
        view[len(flat)]
    # TokenStream walks the view as it walks the flat array, across shard boundaries and wraps.
    a, b = TokenStream(view, 8), TokenStream(flat, 8)
    for _ in range(40):
        assert np.array_equal(a.next_window(), b.next_window())


def test_legacy_and_union_indexes_still_read(tmp_path):
    """An index without side files (the experts' union stream, older run directories)."""
    d = tmp_path / "legacy"
    d.mkdir()
    np.arange(12, dtype="<u2").tofile(d / "shard-00000.bin")
    write_json(d / "index.json", {"dtype": "<u2", "shards": [{"file": "shard-00000.bin", "tokens": 12, "docs": 2}],
                                  "tokens": 12, "docs": 2, "doc_offsets": [0, 5], "eos_id": 0})
    assert load_tokens(d).tolist() == list(range(12))
    assert doc_offsets(d).tolist() == [0, 5]


def test_bad_input_is_a_clear_error(tmp_path):
    tok = train_bpe(["a b c"] * 5, 260)
    with pytest.raises(HoneError, match="no Parquet files"):
        tokenize_corpus(tmp_path / "nothing", tok, tmp_path / "t")
    with pytest.raises(HoneError, match="token index not found"):
        load_tokens(tmp_path / "nothing")
    (tmp_path / "c").mkdir()
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c" / "part-0.parquet")
    with pytest.raises(HoneError, match="no 'text' column"):
        tokenize_corpus(tmp_path / "c", tok, tmp_path / "t")
    write_shard(["a b", "c"], tok, tmp_path / "d", seed=0)
    shard = tmp_path / "d" / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(HoneError, match="partial shard"):
        load_tokens(tmp_path / "d")


def brute_force(n, seq_len, windows):
    """Walk a TokenStream of n tokens for ``windows`` windows; count by marking every token."""
    stream = TokenStream(np.arange(n), seq_len)
    hits = np.zeros(n, dtype=np.int64)
    trained = 0
    for _ in range(windows):
        w = stream.next_window()
        hits[w] += 1
        trained += len(w) - 1
    reached = np.zeros(n, dtype=bool)  # what a whole pass reaches
    probe = TokenStream(np.arange(n), seq_len)
    while probe.epoch == 0:
        reached[probe.next_window()] = True
    return stream, trained, int((hits > 0).sum()), int((~reached).sum())


@pytest.mark.parametrize("n,seq_len", [(9, 8), (17, 8), (20, 8), (100, 7), (64, 1), (33, 32)])
def test_ledger_matches_a_walk_of_the_stream(n, seq_len):
    per_pass = (n - 1) // seq_len
    for windows in range(3 * per_pass + 2):
        stream, trained, seen, cut = brute_force(n, seq_len, windows)
        ledger = token_ledger(n, seq_len, stream.pos, stream.epoch)
        assert (ledger["trained"], ledger["distinct"], ledger["cut"]) == (trained, seen, cut), windows
        assert ledger["tokens_in"] == ledger["distinct"] + ledger["cut"] + ledger["unused"] == n
        assert ledger["windows"] == windows and ledger["unused"] >= 0


def test_ledger_rejects_impossible_states():
    with pytest.raises(HoneError, match="no window"):
        token_ledger(8, 8, 0, 0)
    with pytest.raises(HoneError, match="not a window start"):
        token_ledger(100, 8, 12, 0)
    with pytest.raises(HoneError, match="not a window start"):
        token_ledger(100, 8, 104, 0)
