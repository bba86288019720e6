"""Downstream tasks through lm-evaluation-harness: accuracy against a hand computation, the
packaged tasks built deterministically, `hone eval --tasks`, and bad task files in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_hone, tiny_llama
from hone.cli.eval import load_scored_model
from hone.corpus.tasks import CHOICES, MASK, PACKAGED_TASKS, build_packaged_tasks, write_task
from hone.errors import HoneError
from hone.evaluate_tasks import (
    _shared_context_scores,
    _tree_scores,
    check_task_file,
    compare_tasks,
    continuation_scores,
    encode_pair,
    run_tasks,
)
from hone.tokens import train_bpe
from hone.tokens.conventions import TokenConventions
from model_dirs import write_model_dir

pytest.importorskip("lm_eval")

WORDS = ["protein", "gene", "cell", "river", "city", "kernel", "enzyme", "membrane", "binding", "tissue"]
QUESTIONS = [f"Which word names a {w} thing" for w in WORDS[:8]]
ITEMS = [{"question": q, "choices": [WORDS[(i + k) % 10] for k in range(CHOICES)], "label": i % CHOICES}
         for i, q in enumerate(QUESTIONS)]
PROMPT = "Q: {{question}}\nA:"


@pytest.fixture(scope="module")
def tok():
    return train_bpe([" ".join(WORDS)] * 20 + QUESTIONS * 5 + ["Q: A:"] * 5, 300)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(vocab=tok.get_vocab_size(), seed=3).eval()


def conventions(tok) -> TokenConventions:
    return TokenConventions.detect(tok)


def hand_scores(model, tok, conv, items) -> tuple[list[float], list[float], list[float]]:
    """acc and acc_norm per item, and every choice's log-likelihood: each from a forward pass of
    its own (no batching, no padding, no cache), after the prompt and lm-eval's delimiter " "."""
    acc, norm, every = [], [], []
    for item in items:
        context = PROMPT.replace("{{question}}", item["question"])
        ctx = tok.encode(context, add_special_tokens=False).ids
        lls = []
        for choice in item["choices"]:
            whole = tok.encode(context + " " + choice, add_special_tokens=False).ids
            assert whole[:len(ctx)] == ctx  # the split this hand computation relies on
            ids = conv.context() + whole
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).float()[0], -1)
            n = len(whole) - len(ctx)
            targets = torch.tensor(ids[-n:])
            lls.append(float(logp[-n:].gather(1, targets[:, None]).sum()))
        every += lls
        best = max(range(CHOICES), key=lambda i: lls[i])
        best_norm = max(range(CHOICES), key=lambda i: lls[i] / len(item["choices"][i]))
        acc.append(float(best == item["label"]))
        norm.append(float(best_norm == item["label"]))
    return acc, norm, every


def stderr(xs: list[float]) -> float:
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


class Generic(torch.nn.Module):
    """The tiny Llama behind a module that is not Hone's Llama (as the transformers backend is):
    scored from whole logits, (context, choice) pairs batched, instead of a shared KV cache."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return self.inner(ids)


@pytest.mark.parametrize("path", ["llama_kv_cache", "generic_logits"])
def test_lm_eval_accuracy_equals_the_hand_computation(model, tok, tmp_path, path):
    yaml = write_task(tmp_path, "tiny_mc", ITEMS, PROMPT, "a tiny test task")
    conv = conventions(tok)
    scored = model if path == "llama_kv_cache" else Generic(model)
    # batch_size 3: batches mix lengths, so padding must not change a score
    got = run_tasks(scored, tok, conv, [str(yaml)], batch_size=3, log=lambda s: None)["tiny_mc"]
    acc, norm, lls = hand_scores(model, tok, conv, ITEMS)
    pairs = [encode_pair(tok, PROMPT.replace("{{question}}", it["question"]), " " + c)
             for it in ITEMS for c in it["choices"]]
    scores = continuation_scores(scored, pairs, prefix=conv.context(), max_len=512, batch_size=3, pad_id=conv.pad)
    assert [s for s, _ in scores] == pytest.approx(lls, abs=1e-4)
    assert got["n"] == len(ITEMS)
    assert got["acc"] == pytest.approx(sum(acc) / len(acc))
    assert got["acc_norm"] == pytest.approx(sum(norm) / len(norm))
    assert got["acc_stderr"] == pytest.approx(stderr(acc))
    assert got["acc_norm_stderr"] == pytest.approx(stderr(norm))
    assert 0 < sum(acc) < len(acc) or 0 < sum(norm) < len(norm)  # the task separates something


def test_questions_batched_with_their_choices_score_as_one_at_a_time(model):
    """Several questions per forward, each with its choices in the same row (a tree mask), give the
    scores of reading each question once into a KV cache its choices share."""
    g = torch.Generator().manual_seed(0)
    items = [(torch.randint(1, 250, (n,), generator=g).tolist(),
              [torch.randint(1, 250, (m,), generator=g).tolist() for m in ms])
             for n, ms in ((5, (1, 3, 2, 4)), (17, (2, 2)), (9, (6, 1, 1)))]
    with torch.no_grad():
        batched = _tree_scores(model, items, pad_id=0)
        single = [_shared_context_scores(model, ctx, conts, pad_id=0) for ctx, conts in items]
    for b_item, s_item in zip(batched, single):
        assert [x for x, _ in b_item] == pytest.approx([x for x, _ in s_item], abs=1e-5)
        assert [g for _, g in b_item] == [g for _, g in s_item]


def test_compare_tasks_gives_the_change_in_points():
    before = {"t": {"acc": 0.25, "acc_stderr": 0.1, "acc_norm": 0.5, "acc_norm_stderr": 0.1, "n": 8}}
    after = {"t": {"acc": 0.5, "acc_stderr": 0.12, "acc_norm": 0.375, "acc_norm_stderr": 0.1, "n": 8},
             "only_after": {"acc": 1.0, "n": 1}}
    row = compare_tasks(before, after)
    assert set(row) == {"t"}
    assert row["t"]["acc_change"] == pytest.approx(0.25) and row["t"]["acc_norm_change"] == pytest.approx(-0.125)
    assert row["t"]["acc_stderr_after"] == 0.12 and row["t"]["n"] == 8


def heldout_docs():
    domain = [{"id": f"GO:{i}", "text": f"term {i} binding: the binding of thing {i} to term {i} binding targets",
               "meta": {"term": f"term {i} binding"}} for i in range(12)]
    general = [{"id": f"wiki:T{i}", "text": f"Title{i} is a place number {i}. Title{i} has a river.",
                "meta": {"title": f"Title{i}"}} for i in range(9)]
    return domain, general


def write_heldout(root):
    (root / "heldout").mkdir(parents=True)
    for name, docs in zip(("domain", "general"), heldout_docs()):
        (root / "heldout" / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return root / "heldout"


def test_packaged_tasks_are_deterministic_with_four_choices_and_the_right_answer(tmp_path):
    heldout = write_heldout(tmp_path)
    built = build_packaged_tasks(heldout, tmp_path / "a", items=10, seed=7)
    assert built == {"hone_go_term": 10, "hone_wiki_title": 9}  # 9 general documents: all of them
    again = build_packaged_tasks(heldout, tmp_path / "b", items=10, seed=7)
    other = build_packaged_tasks(heldout, tmp_path / "c", items=10, seed=8)
    assert again == built == other
    domain, general = heldout_docs()
    answers = {d["id"]: d["meta"].get("term") or d["meta"].get("title") for d in domain + general}
    for spec in PACKAGED_TASKS:
        rows = [json.loads(x) for x in (tmp_path / "a" / f"{spec.name}.jsonl").read_text().splitlines()]
        assert rows == [json.loads(x) for x in (tmp_path / "b" / f"{spec.name}.jsonl").read_text().splitlines()]
        assert rows != [json.loads(x) for x in (tmp_path / "c" / f"{spec.name}.jsonl").read_text().splitlines()]
        assert len({r["id"] for r in rows}) == len(rows)
        for r in rows:
            assert len(r["choices"]) == CHOICES == len(set(r["choices"]))
            assert r["choices"][r["label"]] == answers[r["id"]]
            assert answers[r["id"]].lower() not in r["question"].lower() and MASK in r["question"]
        assert {r["label"] for r in rows} != {rows[0]["label"]}  # the answer's place varies
        assert check_task_file(tmp_path / "a" / f"{spec.name}.yaml") == spec.name


def test_a_file_that_is_not_an_lm_eval_task_is_one_line_naming_it(tmp_path, model, tok):
    bad = tmp_path / "notatask.yaml"
    bad.write_text("dataset_path: json\nfoo: 1\n")
    with pytest.raises(HoneError, match="notatask.yaml: not an lm-eval task file"):
        check_task_file(bad)
    garbage = tmp_path / "garbage.yaml"
    garbage.write_text("task: [unclosed\n")
    with pytest.raises(HoneError, match="garbage.yaml: not an lm-eval task file"):
        run_tasks(model, tok, conventions(tok), [str(garbage)], log=lambda s: None)
    with pytest.raises(HoneError, match="'no_such_task': no such lm-eval task"):
        run_tasks(model, tok, conventions(tok), ["no_such_task"], include=[tmp_path / "none"], log=lambda s: None)


def test_hone_eval_tasks_on_a_model_directory(tmp_path, capsys):
    path = write_model_dir(tmp_path / "llama", "llama3")
    yaml = write_task(tmp_path / "tasks", "tiny_mc", ITEMS, PROMPT, "a tiny test task")
    out = tmp_path / "eval.json"
    code, stdout, err = run_hone(capsys, "eval", path, "--tasks", yaml, "--base", path, "-o", out)
    assert code == 0, err
    table = json.loads((tmp_path / "eval_tasks.json").read_text())
    model, tok, conv = load_scored_model(str(path))
    ref = run_tasks(model, tok, conv, [str(yaml)], log=lambda s: None)["tiny_mc"]
    row = table["tiny_mc"]
    assert row["acc_after"] == pytest.approx(ref["acc"]) and row["acc_norm_after"] == pytest.approx(ref["acc_norm"])
    assert row["acc_change"] == 0 and row["n"] == len(ITEMS)  # the same model on both sides
    code, _, err = run_hone(capsys, "eval", path, "--tasks", tmp_path / "eval_tasks.json")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "eval_tasks.json" in err


def test_the_report_shows_task_accuracy_beside_perplexity(tmp_path):
    from hone.report import write_report
    from hone.rundir import write_json

    write_json(tmp_path / "eval.json", {"domain": {"ppl_before": 40.0, "ppl_after": 20.0, "bpb_before": 1.2,
                                                   "bpb_after": 1.0, "ppl_change": -0.5, "tokens": 100, "docs": 3}})
    before = {"hone_go_term": {"acc": 0.30, "acc_stderr": 0.03, "acc_norm": 0.32, "acc_norm_stderr": 0.03, "n": 150},
              "hone_wiki_title": {"acc": 0.80, "acc_stderr": 0.05, "n": 60}}
    after = {"hone_go_term": {"acc": 0.50, "acc_stderr": 0.04, "acc_norm": 0.52, "acc_norm_stderr": 0.04, "n": 150},
             "hone_wiki_title": {"acc": 0.78, "acc_stderr": 0.05, "n": 60}}
    write_json(tmp_path / "eval_tasks.json", compare_tasks(before, after))
    html = write_report(tmp_path).read_text()
    assert html.index('id="eval-table"') < html.index('id="tasks-table"')
    table = html[html.index('id="tasks-table"'):]
    table = table[:table.index("</table>")]
    # the gain of 0.20 is 4 standard errors of the difference (0.05): coloured; the drop of 0.02 is noise
    assert '<td class="good">+0.200 ± 0.050</td>' in table
    assert '<td class="">-0.020 ± 0.071</td>' in table
    assert "0.300 ± 0.030" in table and "0.520" in table


def test_without_lm_eval_the_error_names_the_extra(monkeypatch, model, tok):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(HoneError, match=r"lm-evaluation-harness .*pip install 'hone\[eval\]'"):
        run_tasks(model, tok, conventions(tok), ["anything"], log=lambda s: None)
