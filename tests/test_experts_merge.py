"""hone merge: parameter averaging (bitwise and weighted exactness), the ensemble's domain
posterior on clearly separated domains, `hone eval` of an ensemble, one-line errors."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_hone
from hone.errors import HoneError
from hone.experts.ensemble import EnsembleLM, load_model
from hone.experts.merge import average, ensemble, parse_weights

WORDS_A = "gene protein cell enzyme membrane binding catalysis kinase receptor ligand".split()
WORDS_B = "0 1 2 3 4 5 6 7 8 9 + - = ( ) ; [ ]".split()


def _texts(words: list[str], n: int, seed: int, sep: str = " ") -> list[str]:
    rng = random.Random(seed)
    return [sep.join(rng.choice(words) for _ in range(40)) for _ in range(n)]


def _train(model, ids: list[int], steps: int = 60, seq: int = 32, seed: int = 0):
    """A few AdamW steps on windows of ``ids``: enough for a tiny model to learn a unigram-ish law."""
    torch.manual_seed(seed)
    # Tiny models drift into denormal floats, which make CPU math ~10x slower; one thread, as
    # two threads spin-waiting on a loaded 2-core machine cost more than they give.
    flush = torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (8,))
        batch = torch.stack([data[s:s + seq + 1] for s in starts])
        loss, _ = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_flush_denormal(False) if flush else None
    torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def separated(tmp_path_factory):
    """Two tiny experts with one tokenizer: 'a' trained on words, 'b' on digits and symbols;
    held-out sets of each domain as JSON lines."""
    from conftest import tiny_llama
    from hone.model.hf import save_hf
    from hone.tokens import eos_id, train_bpe

    root = tmp_path_factory.mktemp("experts")
    texts = {"a": _texts(WORDS_A, 60, 0), "b": _texts(WORDS_B, 60, 1)}
    tok = train_bpe(texts["a"] + texts["b"], 300)
    eos = eos_id(tok)
    dirs = {}
    for i, (name, group) in enumerate(texts.items()):
        ids = [t for enc in tok.encode_batch(group[:50]) for t in enc.ids + [eos]]
        model = _train(tiny_llama(vocab=tok.get_vocab_size(), seed=0), ids, seed=i)
        dirs[name] = save_hf(model, tok, root / name / "final")
        held = root / f"{name}.jsonl"
        held.write_text("".join(json.dumps({"text": t}) + "\n" for t in group[50:]))
        dirs[f"{name}_heldout"] = held
    return {**dirs, "root": root, "tok": tok}


def test_merge_of_identical_experts_is_the_expert_bitwise(tmp_path):
    from conftest import tiny_llama
    from hone.model.hf import save_hf

    src = save_hf(tiny_llama(seed=3), None, tmp_path / "e")
    out = average([src, src, src], tmp_path / "m", [1, 1, 1])
    a, m = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == m.keys()
    assert all(torch.equal(a[k], m[k]) and a[k].dtype == m[k].dtype for k in a)
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert json.loads((out / "merge.json").read_text())["weights"] == pytest.approx([1 / 3] * 3)


def test_weighted_average_is_exact(tmp_path):
    from conftest import tiny_llama
    from hone.model.hf import load_hf, save_hf

    p1 = save_hf(tiny_llama(seed=1), None, tmp_path / "e1")
    p2 = save_hf(tiny_llama(seed=2), None, tmp_path / "e2")
    out = average([p1, p2], tmp_path / "m", parse_weights("3,1", 2))
    s1, s2, m = (load_file(str(p / "model.safetensors")) for p in (p1, p2, out))
    for k in s1:
        want = (0.75 * s1[k].double() + 0.25 * s2[k].double()).float()
        assert torch.equal(m[k], want), k
    model, _ = load_hf(out)  # the merged directory is an ordinary HF checkpoint
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 256)


def test_ensemble_of_one_expert_is_that_expert(separated, tmp_path):
    from hone.model.hf import load_hf

    ens, _ = load_model(ensemble([separated["a"]], tmp_path / "ens"))
    single, _ = load_hf(separated["a"])
    x = torch.tensor([[0, 5, 9, 17, 33, 2]])
    with torch.no_grad():
        assert torch.allclose(ens(x), torch.log_softmax(single(x), -1), atol=1e-5)


def test_posterior_picks_the_right_expert(separated, tmp_path):
    from hone.tokens import eos_id

    model, tok = load_model(ensemble([separated["a"], separated["b"]], tmp_path / "ens"))
    assert isinstance(model, EnsembleLM)
    eos = eos_id(tok)
    for k, name in enumerate(("a", "b")):
        text = json.loads(separated[f"{name}_heldout"].read_text().splitlines()[0])["text"]
        ids = torch.tensor([[eos] + tok.encode(text).ids[:40]])
        with torch.no_grad():
            w = model.log_posterior(ids).exp()[:, 0]  # [E, T]
        assert w[:, 0].tolist() == pytest.approx([0.5, 0.5])  # nothing seen yet: the prior
        assert float(w[k, 10:].min()) > 0.99, (name, w[k])


def test_prefix_cap_follows_a_change_of_domain(separated, tmp_path):
    from hone.tokens import eos_id

    tok = separated["tok"]
    a = tok.encode(json.loads(separated["a_heldout"].read_text().splitlines()[0])["text"]).ids[:40]
    b = tok.encode(json.loads(separated["b_heldout"].read_text().splitlines()[0])["text"]).ids[:12]
    ids = torch.tensor([[eos_id(tok)] + a + b])
    full, _ = load_model(ensemble([separated["a"], separated["b"]], tmp_path / "full"))
    capped, _ = load_model(ensemble([separated["a"], separated["b"]], tmp_path / "cap", prefix_cap=8))
    with torch.no_grad():
        assert float(full.log_posterior(ids).exp()[0, 0, -1]) > 0.5  # 40 tokens of 'a' still dominate
        assert float(capped.log_posterior(ids).exp()[1, 0, -1]) > 0.9  # the last 8 are 'b'


def test_smoothing_keeps_a_floor_under_every_expert(separated, tmp_path):
    model, tok = load_model(ensemble([separated["a"], separated["b"]], tmp_path / "s", smoothing=0.1))
    ids = torch.tensor([tok.encode(json.loads(separated["a_heldout"].read_text().splitlines()[0])["text"]).ids[:30]])
    with torch.no_grad():
        w = model.log_posterior(ids).exp()
    assert float(w.min()) >= 0.05 - 1e-6
    assert torch.allclose(w.sum(0), torch.ones_like(w[0]))


def test_cached_prior_follows_the_sample(separated, tmp_path, capsys):
    ens = tmp_path / "ens"
    code, err = hone(capsys, "merge", str(separated["a"]), str(separated["b"]), "-o", str(ens), "--method", "ensemble",
                     "--prior-data", str(separated["b_heldout"]))
    assert code == 0, err
    prior = [e["prior"] for e in json.loads((ens / "ensemble.json").read_text())["experts"]]
    assert prior[1] > 0.95 and sum(prior) == pytest.approx(1.0)  # a sample of 'b' text: b's expert first
    model, _ = load_model(ens)
    assert model.log_prior.exp().tolist() == pytest.approx(prior)


def hone(capsys, *args) -> tuple[int, str]:
    """(status, stderr) of `hone ARGS` run in this process."""
    code, _, err = run_hone(capsys, *args)
    return code, err


def test_hone_eval_scores_an_ensemble_no_worse_than_the_best_expert(separated, tmp_path, capsys):
    from hone.evaluate import evaluate_sets, read_texts
    from hone.model.hf import load_hf

    ens = tmp_path / "ens"
    code, err = hone(capsys, "merge", str(separated["a"]), str(separated["b"]), "-o", str(ens), "--method", "ensemble")
    assert code == 0, err
    manifest = json.loads((ens / "ensemble.json").read_text())
    assert [e["name"] for e in manifest["experts"]] == ["a", "b"]
    assert not list(ens.glob("*.safetensors")) and not list(ens.glob("*.bin"))  # a manifest, no weights
    out = tmp_path / "ens.json"
    code, err = hone(capsys, "eval", str(ens), "--data", f"a={separated['a_heldout']}", "--data",
                     f"b={separated['b_heldout']}", "-o", str(out), "--max-tokens", "600")
    assert code == 0, err
    results = {"ens": json.loads(out.read_text())}
    sets = {d: read_texts(separated[f"{d}_heldout"]) for d in ("a", "b")}
    for name in ("a", "b"):
        model, tok = load_hf(separated[name])
        results[name] = evaluate_sets(model, tok, sets, max_tokens=600, seq_len=512, batch_size=4, log=lambda m: None)
    for dom in ("a", "b"):
        best = min(results[e][dom]["nll"] for e in ("a", "b"))
        other = max(results[e][dom]["nll"] for e in ("a", "b"))
        ens_nll = results["ens"][dom]["nll"]
        # Bayesian mixture: each document loses at most log 2 nats against its best expert.
        bound = results["ens"][dom]["docs"] * math.log(2) / results["ens"][dom]["tokens"]
        assert ens_nll <= best + bound + 1e-6, (dom, ens_nll, best)
        assert ens_nll < other - 0.5  # and it is far from the wrong expert
        assert results["ens"][dom]["ppl"] <= results[dom][dom]["ppl"] * 1.1


def test_bad_input_is_one_line(separated, tmp_path, capsys):
    from conftest import tiny_llama
    from hone.model.hf import save_hf

    other = save_hf(tiny_llama(vocab=separated["tok"].get_vocab_size(), seed=0).float(), separated["tok"],
                    tmp_path / "o")
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HoneError, match="intermediate_size = 96 differs"):
        average([separated["a"], other], tmp_path / "m")
    with pytest.raises(HoneError, match="2 weights for 3 experts"):
        parse_weights("1,2", 3)
    with pytest.raises(HoneError, match="expected comma-separated numbers"):
        parse_weights("1,x", 2)
    with pytest.raises(HoneError, match="weights sum to 0"):
        parse_weights("0,0", 2)
    with pytest.raises(HoneError, match=">= 0"):
        parse_weights("1,-1", 2)
    cases = [
        (["merge", str(separated["a"]), str(tmp_path / "nope"), "-o", str(tmp_path / "x")],
         "expert directory not found"),
        (["merge", str(separated["a"]), str(separated["b"]), "-o", str(tmp_path / "x"), "--weights", "1"],
         "--weights: 1 weights for 2 experts"),
        (["merge", str(separated["a"]), str(other), "-o", str(tmp_path / "x")], "experts must share one architecture"),
        (["merge", str(separated["a"]), "-o", str(tmp_path / "x"), "--method", "vote"], "--method 'vote'"),
        (["eval", str(tmp_path / "nope"), "--data", f"a={separated['a_heldout']}"], "file not found"),
        (["merge", str(separated["a"]), str(separated["b"]), "-o", str(separated["a"])], "would replace the expert"),
        (["merge", str(separated["a"]), "-o", str(tmp_path / "x"), "--method", "ensemble", "--prior-data",
          str(tmp_path / "no.jsonl")], "evaluation set not found"),
    ]
    for args, msg in cases:
        code, err = hone(capsys, *args)
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], (args, err)
    assert not (tmp_path / "x").exists()
