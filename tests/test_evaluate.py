"""Evaluation: perplexity and bits per byte against closed-form and brute-force references.

The brute-force reference scores each token of a document by its own forward pass over the
context its strided window gives it; the evaluator must match it while scoring every token
of every document exactly once."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from tokenizers import AddedToken, processors

from hone.errors import HoneError
from hone.evaluate import (
    cap_docs,
    compare,
    doc_bytes,
    encode_docs,
    evaluate_sets,
    read_texts,
    score,
    windows,
)
from hone.tokens import train_bpe
from hone.tokens.conventions import TokenConventions

TEXTS = ["the protein binds the gene", "a city by the river", "def f(x):\n    return x + 1"]
# A long document: many windows at the small sizes the tests use.
LONG = " ".join(TEXTS * 5)


class Uniform(torch.nn.Module):
    """Predicts every token with probability 1/V: ppl must be exactly V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab)


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS * 10, 300)


@pytest.fixture(scope="module")
def model(tok):
    from conftest import tiny_llama

    return tiny_llama(vocab=tok.get_vocab_size())


def quiet(_msg):
    pass


def brute_force_nll(model, context, ids, window, stride):
    """Summed NLL of ``ids`` after ``context``, one forward pass per token: token at position p
    of context + ids is predicted from the start of the first window that reaches it,
    k = max(0, ceil((p - W) / S)) windows in, i.e. positions kS .. p-1."""
    seq = list(context) + list(ids)
    total = 0.0
    with torch.no_grad():
        for p in range(len(context), len(seq)):
            start = max(0, -(-(p - window) // stride)) * stride
            assert p - start <= window and (p <= window or p - start >= window - stride)
            logits = model(torch.tensor([seq[start:p]]))[0, -1].double()
            total -= float(torch.log_softmax(logits, -1)[seq[p]])
    return total


def test_uniform_model_has_ppl_vocab_and_known_bpb(tok):
    r = evaluate_sets(Uniform(tok.get_vocab_size()), tok, {"s": TEXTS}, seq_len=64, log=quiet)["s"]
    n_tokens = sum(len(tok.encode(t).ids) for t in TEXTS)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert r["tokens"] == n_tokens and r["bytes"] == n_bytes
    assert r["ppl"] == pytest.approx(tok.get_vocab_size())
    assert r["bpb"] == pytest.approx(n_tokens * math.log2(tok.get_vocab_size()) / n_bytes)


@pytest.mark.parametrize("window,stride", [(16, 8), (16, 5), (12, 12), (9, 1)])
def test_strided_windows_equal_the_brute_force_reference(tok, model, window, stride):
    ids = encode_docs([LONG], tok)[0]
    assert len(ids) > 4 * window  # several windows, the last one partial
    context = TokenConventions.detect(tok).context()
    r = score(model, [ids], n_bytes=1, context=context, window=window, stride=stride, batch_size=3)
    assert r["tokens"] == len(ids)
    assert r["nll"] * r["tokens"] == pytest.approx(brute_force_nll(model, context, ids, window, stride), rel=1e-5)


@pytest.mark.parametrize("n_context", [1, 2])
def test_windows_score_every_token_exactly_once(n_context):
    context, ids = list(range(100, 100 + n_context)), list(range(37))
    for window, stride in [(4, 2), (8, 3), (8, 8), (40, 20), (3, 1)]:
        scored = []
        for toks, first in windows(ids, context, window, stride):
            assert len(toks) - 1 <= window  # the model never reads more than the window
            scored += toks[1 + first:]
        assert scored == ids


def test_padding_and_batching_do_not_change_the_score(tok, model):
    docs = encode_docs(TEXTS + [LONG], tok)
    context = TokenConventions.detect(tok).context()
    one = score(model, docs, n_bytes=1, context=context, window=16, batch_size=1)
    batched = score(model, docs, n_bytes=1, context=context, window=16, batch_size=5)
    assert batched["tokens"] == one["tokens"] == sum(map(len, docs))
    assert batched["nll"] == pytest.approx(one["nll"], rel=1e-5)


def test_no_cap_scores_every_token_of_every_document(tok, model):
    texts = TEXTS + [LONG, LONG[:200]]
    lines = []
    r = evaluate_sets(model, tok, {"s": texts}, seq_len=16, log=lines.append)["s"]
    assert r["tokens"] == r["tokens_total"] == sum(len(tok.encode(t).ids) for t in texts)
    assert r["docs"] == r["docs_total"] == len(texts)
    assert r["bytes"] == sum(len(t.encode()) for t in texts)
    assert r["capped"] is False and (r["window"], r["stride"]) == (16, 8)
    context = TokenConventions.detect(tok).context()
    reference = sum(brute_force_nll(model, context, ids, 16, 8) for ids in encode_docs(texts, tok))
    assert r["nll"] * r["tokens"] == pytest.approx(reference, rel=1e-5)
    assert "of" not in lines[0] and "capped" not in lines[0] and "2 in 16-token windows (stride 8)" in lines[0]


def test_a_cap_takes_whole_documents_in_a_seeded_order(tok, model):
    texts = [f"document {i}: " + TEXTS[i % 3] * (1 + i % 4) for i in range(30)]
    docs = encode_docs(texts, tok)
    cap = sum(map(len, docs)) // 3
    lines = []
    r = evaluate_sets(model, tok, {"s": texts}, max_tokens=cap, seq_len=32, seed=7, sources={"s": "held out"},
                      log=lines.append)["s"]
    order = list(range(30))
    random.Random(7).shuffle(order)
    taken, total = [], 0
    for i in order:  # whole documents until the next one would pass the cap
        if total + len(docs[i]) > cap:
            break
        taken.append(i)
        total += len(docs[i])
    assert (r["tokens"], r["docs"]) == (total, len(taken))
    assert (r["tokens_total"], r["docs_total"]) == (sum(map(len, docs)), 30)
    assert r["capped"] is True and r["tokens"] <= cap and r["source"] == "held out"
    assert taken != list(range(len(taken)))  # not file order
    assert r["bytes"] == sum(len(texts[i].encode()) for i in taken)
    assert (f"{total:,} of {sum(map(len, docs)):,} tokens, {len(taken)} of 30 docs "
            "(capped by eval.max_tokens_per_set)") in lines[0]
    again = evaluate_sets(model, tok, {"s": texts}, max_tokens=cap, seq_len=32, seed=7, log=quiet)["s"]
    other = evaluate_sets(model, tok, {"s": texts}, max_tokens=cap, seq_len=32, seed=8, log=quiet)["s"]
    assert again["nll"] == r["nll"] and other["nll"] != r["nll"]
    roomy = evaluate_sets(model, tok, {"s": texts}, max_tokens=10**9, seq_len=32, log=quiet)["s"]
    assert roomy["capped"] is False and roomy["tokens"] == roomy["tokens_total"]


def test_only_a_first_document_longer_than_the_cap_is_cut():
    docs = [list(range(50)), list(range(5)), list(range(7))]
    assert cap_docs(docs, None) == docs
    big_first = next(s for s in range(50) if _order(3, s)[0] == 0)
    assert cap_docs(docs, 10, seed=big_first) == [docs[0][:10]]
    small_first = next(s for s in range(50) if _order(3, s)[:2] == [1, 0])
    assert cap_docs(docs, 10, seed=small_first) == [docs[1]]  # stops at the long one: never a cut second document
    with pytest.raises(HoneError, match="max_tokens 0"):
        cap_docs(docs, 0)


def _order(n, seed):
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def test_bos_framing_for_a_tokenizer_that_adds_bos(tok):
    from conftest import tiny_llama

    bos_tok = train_bpe(TEXTS * 10, 300)
    bos_tok.add_special_tokens([AddedToken("<s>", special=True)])
    bos = bos_tok.token_to_id("<s>")
    bos_tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    model = tiny_llama(vocab=bos_tok.get_vocab_size())
    conv = TokenConventions.detect(bos_tok)
    assert conv.add_bos and conv.context() == [conv.eos_id, bos]

    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids):
            seen.append(ids[:, :2].tolist())
            return self.inner(ids)

    texts = [TEXTS[0], LONG]
    r = evaluate_sets(Recorder(), bos_tok, {"s": texts}, seq_len=16, log=quiet)["s"]  # conventions detected
    docs = encode_docs(texts, bos_tok)
    assert bos not in docs[0] and r["tokens"] == r["tokens_total"] == sum(map(len, docs))  # BOS is never scored
    assert [conv.eos_id, bos] in [row for batch in seen for row in batch]
    reference = sum(brute_force_nll(model, [conv.eos_id, bos], ids, 16, 8) for ids in docs)
    assert r["nll"] * r["tokens"] == pytest.approx(reference, rel=1e-5)
    explicit = evaluate_sets(model, bos_tok, {"s": texts}, seq_len=16, conventions=conv, log=quiet)["s"]
    assert explicit["nll"] == pytest.approx(r["nll"], rel=1e-6)
    plain = TokenConventions.detect(tok)
    without = evaluate_sets(model, bos_tok, {"s": texts}, seq_len=16, conventions=plain, log=quiet)["s"]
    assert without["nll"] != pytest.approx(r["nll"], rel=1e-6)


def test_the_llama_fused_loss_equals_the_logits_path(tok, model):
    class Wrapped(torch.nn.Module):  # not a Llama: scored through its logits
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids):
            return self.inner(ids)

    fused = evaluate_sets(model, tok, {"s": TEXTS + [LONG]}, seq_len=16, log=quiet)["s"]
    logits = evaluate_sets(Wrapped(), tok, {"s": TEXTS + [LONG]}, seq_len=16, log=quiet)["s"]
    assert fused["nll"] == pytest.approx(logits["nll"], rel=1e-5)


def test_bad_windows_and_empty_sets_are_one_line_errors(tok, model):
    with pytest.raises(HoneError, match="stride 17 must be between 1 and the window"):
        evaluate_sets(model, tok, {"s": TEXTS}, seq_len=16, stride=17, log=quiet)
    with pytest.raises(HoneError, match="window 1 is too short"):
        evaluate_sets(model, tok, {"s": TEXTS}, seq_len=1, log=quiet)
    with pytest.raises(HoneError, match=r"evaluation set 'e' \(somewhere\): no tokens to score in its 2 documents"):
        evaluate_sets(model, tok, {"e": ["", ""]}, seq_len=16, sources={"e": "somewhere"}, log=quiet)


def test_doc_bytes_counts_what_the_tokens_decode_to(tok):
    docs = encode_docs(TEXTS, tok)
    assert doc_bytes(tok, docs) == sum(len(t.encode()) for t in TEXTS)


def test_compare_reports_change_and_what_was_scored():
    cover = {"tokens": 5, "docs": 1, "tokens_total": 9, "docs_total": 2, "capped": True, "source": "x.jsonl",
             "window": 16, "stride": 8}
    table = compare({"d": {"ppl": 10.0, "bpb": 1.0, **cover}}, {"d": {"ppl": 8.0, "bpb": 0.9, **cover}})
    assert table["d"]["ppl_change"] == pytest.approx(-0.2)
    assert set(table["d"]) >= {"ppl_before", "ppl_after", "bpb_before", "bpb_after"}
    assert {k: table["d"][k] for k in cover} == cover


def test_bad_eval_file_names_the_line(tmp_path):
    p = tmp_path / "set.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + "{broken\n")
    with pytest.raises(HoneError, match=r"set.jsonl:2: not a JSON object"):
        read_texts(p)
    with pytest.raises(HoneError, match="evaluation set not found"):
        read_texts(tmp_path / "none.jsonl")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_score_on_device_matches_cpu(tok, device):
    from conftest import tiny_llama

    model = tiny_llama(vocab=tok.get_vocab_size())
    cpu = evaluate_sets(model, tok, {"s": TEXTS + [LONG]}, seq_len=16, log=quiet)["s"]
    dev = evaluate_sets(model.to(device), tok, {"s": TEXTS + [LONG]}, seq_len=16, log=quiet)["s"]
    assert dev["ppl"] == pytest.approx(cpu["ppl"], rel=1e-4)


def test_cross_entropy_reference_is_the_log_softmax(tok, model):
    """The brute-force helper's own footing: its NLL of a short document (one window) is the
    cross-entropy of one forward pass over the whole framed document."""
    ids = encode_docs([TEXTS[0]], tok)[0]
    context = TokenConventions.detect(tok).context()
    seq = torch.tensor([context + ids])
    with torch.no_grad():
        direct = F.cross_entropy(model(seq[:, :-1])[0], seq[0, 1:], reduction="sum")
    assert brute_force_nll(model, context, ids, 64, 32) == pytest.approx(float(direct), rel=1e-5)
