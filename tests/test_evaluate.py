"""Evaluation: perplexity and bits per byte against closed-form references."""

import json
import math

import pytest
import torch

from hone.errors import HoneError
from hone.evaluate import compare, encode_docs, read_texts, score
from hone.tokens import train_bpe

TEXTS = ["the protein binds the gene", "a city by the river", "def f(x):\n    return x + 1"]


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


def test_uniform_model_has_ppl_vocab_and_known_bpb(tok):
    docs = encode_docs(TEXTS, tok, max_tokens=10_000, seq_len=64)
    result = score(Uniform(tok.get_vocab_size()), docs, batch_size=2)
    n_tokens = sum(len(tok.encode(t).ids) for t in TEXTS)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert result["tokens"] == n_tokens and result["bytes"] == n_bytes
    assert result["ppl"] == pytest.approx(tok.get_vocab_size())
    assert result["bpb"] == pytest.approx(n_tokens * math.log2(tok.get_vocab_size()) / n_bytes)


def test_padding_does_not_change_the_score(tok):
    from conftest import tiny_llama

    model = tiny_llama(vocab=tok.get_vocab_size())
    docs = encode_docs(TEXTS, tok, max_tokens=10_000, seq_len=64)
    one = score(model, docs, batch_size=1)
    batched = score(model, docs, batch_size=3)
    assert batched["ppl"] == pytest.approx(one["ppl"], rel=1e-5)


def test_token_budget_and_window(tok):
    docs = encode_docs(TEXTS, tok, max_tokens=5, seq_len=64)
    assert sum(len(ids) - 1 for ids, _ in docs) == 5
    docs = encode_docs(TEXTS, tok, max_tokens=1000, seq_len=4)
    assert all(len(ids) <= 4 for ids, _ in docs)


def test_compare_reports_change():
    table = compare({"d": {"ppl": 10.0, "bpb": 1.0, "tokens": 5, "docs": 1}},
                    {"d": {"ppl": 8.0, "bpb": 0.9, "tokens": 5, "docs": 1}})
    assert table["d"]["ppl_change"] == pytest.approx(-0.2)
    assert set(table["d"]) >= {"ppl_before", "ppl_after", "bpb_before", "bpb_after"}


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

    docs = encode_docs(TEXTS, tok, max_tokens=10_000, seq_len=64)
    model = tiny_llama(vocab=tok.get_vocab_size())
    cpu = score(model, docs, batch_size=2)
    dev = score(model.to(device), docs, batch_size=2)
    assert dev["ppl"] == pytest.approx(cpu["ppl"], rel=1e-4)


def test_eval_cli_scores_each_set_and_the_change_against_a_base(tok, tmp_path):
    """`hone eval MODEL --data NAME=PATH... --base BASE -o eval.json`: ppl, bpb, change per set."""
    import subprocess
    import sys

    from conftest import tiny_llama
    from hone.model.hf import save_hf

    save_hf(tiny_llama(vocab=tok.get_vocab_size(), seed=0), tok, tmp_path / "base")
    save_hf(tiny_llama(vocab=tok.get_vocab_size(), seed=1), tok, tmp_path / "tuned")
    for name, texts in (("bio", TEXTS[:1] * 3), ("web", TEXTS[1:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "eval.json"
    args = [sys.executable, "-m", "hone.cli", "eval", str(tmp_path / "tuned"), "--data",
            f"bio={tmp_path / 'bio.jsonl'}",
            "--data", f"web={tmp_path / 'web.jsonl'}", "--base", str(tmp_path / "base"), "-o", str(out)]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    table = json.loads(out.read_text())
    assert set(table) == {"bio", "web"}
    for row in table.values():
        assert row["ppl_change"] == pytest.approx(row["ppl_after"] / row["ppl_before"] - 1)
        assert row["bpb_change"] == pytest.approx(row["bpb_after"] / row["bpb_before"] - 1)
        assert row["ppl_before"] != row["ppl_after"]  # two different models
    r = subprocess.run(args[:4] + [str(tmp_path / "nowhere")] + args[5:], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nowhere" in r.stderr and "Traceback" not in r.stderr
