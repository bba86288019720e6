"""QuRating: both-order judging, Bradley–Terry, the fast rater, the judges, the step and command."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from hone.cli.select import register
from hone.corpus.steps import rate as rate_mod
from hone.corpus.steps.rate import (
    LocalJudge,
    OpenAIJudge,
    RateConfig,
    confident,
    fit_bradley_terry,
    judge_both_orders,
    p_b_from_response,
    pairwise_accuracy,
    question,
    rate_docs,
    sample_pairs,
)
from hone.errors import HoneError

RICH = ["photosynthesis", "mitochondria", "thermodynamics", "electromagnetism", "chromosome", "equilibrium",
        "polymerase", "isotope", "catalyst", "wavelength", "membrane", "enzyme", "neutron", "molecule"]
PLAIN = ["nice", "good", "thing", "stuff", "really", "very", "fun", "day", "lot", "okay", "cool", "big"]


def make_docs(n=120, seed=0):
    """Documents whose 'quality' is the share of technical words (the fake judge's criterion)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        share = rng.uniform()
        words = [rng.choice(RICH) if rng.uniform() < share else rng.choice(PLAIN) for _ in range(40)]
        docs.append({"id": str(i), "text": " ".join(words), "share": share})
    return docs


class FakeJudge:
    """P(B better) from the technical-word share, plus a bias toward the first position."""

    name = "fake"

    def __init__(self, bias=0.1):
        self.bias, self.calls = bias, 0

    @staticmethod
    def value(t):
        w = t.split()
        return sum(x in RICH for x in w) / max(len(w), 1)

    def __call__(self, pairs, q):
        self.calls += len(pairs)
        d = np.array([self.value(b) - self.value(a) for a, b in pairs])
        return np.clip(1 / (1 + np.exp(-12 * d)) - self.bias, 0, 1)


def test_criteria_named_and_custom():
    assert "educational value" in question("educational_value")
    assert "expertise" in question("Required Expertise")
    assert question("Which text is more about cardiology?") == "Which text is more about cardiology?"
    with pytest.raises(HoneError, match="criterion"):
        question("vibes")


def test_both_orders_cancel_position_bias():
    class AlwaysB:
        name = "b"

        def __call__(self, pairs, q):
            return np.full(len(pairs), 0.8)

    texts = ["enzyme enzyme", "nice nice"]
    assert judge_both_orders(AlwaysB(), texts, np.array([[0, 1]]), "q")[0] == pytest.approx(0.5)
    assert judge_both_orders(FakeJudge(bias=0.0), texts, np.array([[1, 0]]), "q")[0] > 0.99
    assert confident(np.array([0.1, 0.5, 0.8, np.nan])).tolist() == [True, False, True, False]


def test_sample_pairs_distinct_and_capped():
    rng = np.random.default_rng(0)
    p = sample_pairs(10, 30, rng)
    assert len(p) == 30 and len({tuple(x) for x in p}) == 30 and (p[:, 0] < p[:, 1]).all()
    assert len(sample_pairs(4, 100, rng)) == 6 and len(sample_pairs(1, 5, rng)) == 0


def test_bradley_terry_recovers_the_order():
    rng = np.random.default_rng(1)
    true = np.linspace(-2, 2, 12)
    pairs = sample_pairs(12, 60, rng)
    p = 1 / (1 + np.exp(-(true[pairs[:, 1]] - true[pairs[:, 0]])))
    s = fit_bradley_terry(12, pairs, p, l2=1e-4)
    assert abs(s.mean()) < 1e-6
    assert np.corrcoef(s, true)[0, 1] > 0.97
    assert pairwise_accuracy(s, pairs, p) > 0.95


def test_rate_docs_scores_everything_and_reports_agreement():
    docs = make_docs()
    judge = FakeJudge()
    verdicts, info = rate_docs(docs, judge, RateConfig(pairs=200, chunk_words=16, seed=0))
    assert verdicts == [None] * len(docs)
    q = np.array([d["quality"] for d in docs])
    assert np.corrcoef(q, [d["share"] for d in docs])[0, 1] > 0.8
    assert info["pairs_judged"] == {"train": 160, "heldout": 40}
    assert judge.calls == 2 * 200  # both orders
    assert info["rater_heldout_accuracy"] > 0.8 and info["pairs_confident"]["heldout"] > 10


def test_no_confident_pairs_is_a_one_line_error():
    class Unsure:
        name = "unsure"

        def __call__(self, pairs, q):
            return np.full(len(pairs), 0.5)

    with pytest.raises(HoneError, match="confident"):
        rate_docs(make_docs(30), Unsure(), RateConfig(pairs=20))


def test_long_documents_are_scored_per_chunk_weighted_by_words():
    docs = make_docs()
    rate_docs(docs, FakeJudge(), RateConfig(pairs=200, chunk_words=16))
    rater = rate_mod.NgramRater().fit([d["text"] for d in docs], np.array([d["share"] for d in docs]))
    a, b = docs[0]["text"], docs[1]["text"]
    long_doc = " ".join(a.split()[:32] + b.split()[:16])  # chunks of 16: a, a, b
    expect = (2 * rater.predict([" ".join(a.split()[:16]), " ".join(a.split()[16:32])]).sum() / 2
              + rater.predict([" ".join(b.split()[:16])])[0]) / 3
    assert rater.score_docs([long_doc], 16)[0] == pytest.approx(expect)


def test_p_b_from_logprobs_and_from_the_answer():
    lp = {"choices": [{"message": {"content": "B"}, "logprobs": {"content": [{"token": "B", "logprob": -0.1,
          "top_logprobs": [{"token": "B", "logprob": np.log(0.7)}, {"token": "A", "logprob": np.log(0.3)}]}]}}]}
    assert p_b_from_response(lp) == pytest.approx(0.7)
    assert p_b_from_response({"choices": [{"message": {"content": "A."}}]}) == 0.0
    assert np.isnan(p_b_from_response({"choices": [{"message": {"content": "Neither"}}]}))


class _Handler(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.seen.append({"auth": self.headers.get("Authorization"), "body": body})
        if body.get("logprobs"):  # this server has no logprobs: the judge must fall back
            self.send_response(400)
            self.end_headers()
            return
        prompt = body["messages"][0]["content"]
        a, b = prompt.split("Text A:\n")[1].split("\n\nText B:\n")
        b = b.split("\n\nQuestion:")[0]
        answer = "B" if FakeJudge.value(b) > FakeJudge.value(a) else "A"
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def test_openai_judge_against_a_local_endpoint(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret")
        judge = rate_mod.make_judge(f"openai:http://127.0.0.1:{server.server_port}/v1", api_key_env="MY_JUDGE_KEY",
                                    model="m")
        assert isinstance(judge, OpenAIJudge) and "sk-secret" not in judge.name
        p = judge([("nice day", "enzyme molecule"), ("enzyme isotope", "fun stuff")], "q")
        assert p.tolist() == [1.0, 0.0] and judge.logprobs is False
        assert all(s["auth"] == "Bearer sk-secret" for s in _Handler.seen)
    finally:
        server.shutdown()
        server.server_close()
    judge.timeout = 5
    with pytest.raises(HoneError) as e:  # the server is gone: one line, no key in it
        judge([("a", "b")], "q")
    assert "sk-secret" not in str(e.value) and "\n" not in str(e.value)


def test_local_judge_on_a_tiny_random_model():
    from conftest import tiny_llama
    from hone.tokens import train_bpe

    texts = [d["text"] for d in make_docs(20)] + ["Text A B Question: Answer with a single letter, A or B."]
    tok = train_bpe(texts * 3, 300)
    judge = LocalJudge(tiny_llama(vocab=tok.get_vocab_size()), tok, excerpt_tokens=8, batch_size=3)
    pairs = [(texts[i], texts[i + 1]) for i in range(5)]
    p = judge(pairs, question("educational_value"))
    assert p.shape == (5,) and ((p > 0) & (p < 1)).all()
    one = np.concatenate([judge([pr], "q") for pr in pairs[:2]])
    assert np.allclose(judge(pairs[:2], "q"), one, atol=1e-5)  # right padding does not change the answer


def test_bad_judge_spec_and_config():
    with pytest.raises(HoneError, match="--judge"):
        rate_mod.make_judge("gpt4")
    with pytest.raises(HoneError, match="rate.pairs"):
        RateConfig(pairs=1)


def test_rate_command(tmp_path, monkeypatch):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in make_docs(60)))
    monkeypatch.setattr(rate_mod, "make_judge", lambda spec, **kw: FakeJudge())
    app, data = typer.Typer(), typer.Typer()
    register(data)
    app.add_typer(data, name="data")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["data", "rate", str(pool), "-o", str(out), "--judge", "local:fake",
                                 "--criterion", "facts_and_trivia", "--pairs", "80"])
    assert r.exit_code == 0, r.output
    assert "rater agreement on held-out pairs" in r.output and "rate: 60 in, 60 kept" in r.output
    m = json.loads((out / ".hone" / "manifest.json").read_text())
    assert m["rate"]["criterion"] == "facts_and_trivia" and m["totals"]["kept"] == 60
    assert all(isinstance(x, float) for x in pq.read_table(out / "part-00000.parquet").column("quality").to_pylist())
