"""Tokenize stage: shards round-trip to the documents, EOS-separated, per domain."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hone.errors import HoneError
from hone.rundir import read_json
from hone.tokens import EOS_TOKEN, load_tokens, tokenize_corpus, train_bpe


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    texts = [f"the protein {i} binds the gene" for i in range(20)] + [f"a city of {i} people" for i in range(10)]
    domains = ["biomedical"] * 20 + ["general"] * 10
    pq.write_table(pa.table({"id": [str(i) for i in range(30)], "text": texts, "domain": domains}),
                   d / "part-00000.parquet")
    return d, texts, domains


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
    for domain in summary:
        arr = np.asarray(load_tokens(tmp_path / "tokens" / "train" / domain))
        index = read_json(tmp_path / "tokens" / "train" / domain / "index.json")
        assert index["tokens"] == len(arr) and index["dtype"] == "<u2"
        docs = [tok.decode(list(map(int, seg))) for seg in np.split(arr, np.where(arr == 0)[0] + 1) if len(seg)]
        decoded = sorted(d.removesuffix(EOS_TOKEN) if d.endswith(EOS_TOKEN) else d for d in docs)
        expected = sorted(t for t, dom in zip(texts, domains) if dom == domain)
        assert decoded == expected
        assert len(index["doc_offsets"]) == len(expected)


def test_rerun_skips_and_new_tokenizer_redoes(corpus, tmp_path):
    cdir, texts, _ = corpus
    tok = train_bpe(texts, 300)
    tokenize_corpus(cdir, tok, tmp_path / "tokens")
    shard = tmp_path / "tokens" / "train" / "general" / "shard-00000.bin"
    mtime = shard.stat().st_mtime_ns
    tokenize_corpus(cdir, tok, tmp_path / "tokens")
    assert shard.stat().st_mtime_ns == mtime
    tokenize_corpus(cdir, train_bpe(texts, 290), tmp_path / "tokens")
    assert shard.stat().st_mtime_ns != mtime


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(HoneError, match="no Parquet files"):
        tokenize_corpus(tmp_path / "nothing", train_bpe(["a b c"] * 5, 260), tmp_path / "t")
    with pytest.raises(HoneError, match="token index not found"):
        load_tokens(tmp_path / "nothing")
