"""`[mix] orders = K`: K data orders per ratio, their mean in runs.jsonl (sd and values
beside it), each order's points in mix/orders.jsonl, a re-run skips finished orders. Fast:
synthetic token shards, a 2-layer model, the evaluation replaced by a weight checksum."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from hone.errors import HoneError
from hone.recipe import load_recipe, shipped_recipe

SMALL = {"train.seq_len": 16, "train.batch_size": 4, "train.warmup_steps": 1, "mix.tokens": [64, 128],
         "mix.ratios": [0.5, 1.0], "mix.base_tokens": 0}


@pytest.fixture(autouse=True)
def one_thread():
    """Two-step runs of a 2-layer model: more threads only add overhead on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sweep(monkeypatch, workdir, orders, logs=None):
    import hone.mix.sweep as sweep

    # A stand-in for the held-out losses: a checksum of the weights, so runs that saw other data differ.
    monkeypatch.setattr(sweep, "_eval_losses", lambda recipe, model, tok, sets: {
        "general_loss": float(sum(p.detach().double().sum() for p in model.parameters())),
        "domain_loss": float(sum(p.detach().double().abs().sum() for p in model.parameters()))})
    recipe = load_recipe(shipped_recipe("tiny-cpu"), {**SMALL, "mix.orders": orders})
    return sweep.run_sweep(recipe, workdir, tiny_llama(), None, {},
                           log=(logs.append if logs is not None else lambda m: None))


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_orders_give_distinct_loaders(token_dirs, tmp_path):
    from hone.mix.sweep import _loader, order_seed

    recipe = load_recipe(shipped_recipe("tiny-cpu"), SMALL)
    starts = []
    for k in range(4):
        loader = _loader(recipe, tmp_path, 0.5, 16, order_seed(k))
        starts.append(tuple(s.pos for s in loader.streams.values()))
    assert starts[0] == (0, 0)  # order 0 is the plain single-order sweep
    assert len(set(starts)) == 4
    again = _loader(recipe, tmp_path, 0.5, 16, order_seed(2))
    assert tuple(s.pos for s in again.streams.values()) == starts[2]  # an order is reproducible


def test_orders_record_the_mean_and_resume_skips_finished_orders(token_dirs, tmp_path, monkeypatch):
    out = _sweep(monkeypatch, tmp_path, 3)
    rows = _rows(out)
    trained = [r for r in rows if r["tokens"] > 0]
    assert len(rows) == 2 + 2 * 2 and len(trained) == 4
    per_order = _rows(tmp_path / "mix" / "orders.jsonl")
    assert len(per_order) == 2 * 2 * 3
    for r in trained:
        mine = [o for o in per_order if o["ratio"] == r["ratio"] and o["tokens"] == r["tokens"]]
        assert sorted(o["order"] for o in mine) == [0, 1, 2]
        vals = [o["general_loss"] for o in sorted(mine, key=lambda o: o["order"])]
        assert r["orders"] == 3 and r["general_losses"] == vals
        assert len(set(vals)) == 3  # three data orders, three different runs
        assert r["general_loss"] == pytest.approx(np.mean(vals))
        assert r["general_loss_sd"] == pytest.approx(np.std(vals, ddof=1))
        assert r["domain_loss"] == pytest.approx(np.mean(r["domain_losses"]))
    # Order 0 is the single-order sweep's run.
    (tmp_path / "k1").mkdir()
    (tmp_path / "k1" / "tokens").symlink_to(tmp_path / "tokens")
    single = _rows(_sweep(monkeypatch, tmp_path / "k1", 1))
    for r in single:
        if r["tokens"] > 0:
            assert set(r) == {"model_params", "ratio", "tokens", "general_loss", "domain_loss"}
            o0 = next(o for o in per_order if (o["ratio"], o["tokens"], o["order"]) == (r["ratio"], r["tokens"], 0))
            assert r["general_loss"] == pytest.approx(o0["general_loss"], rel=1e-9)

    # Lose the mean line of (0.5, 128) and order 2's points of ratio 0.5: only order 2 runs again.
    text = out.read_text()
    out.write_text("".join(line + "\n" for line in text.splitlines()
                           if (json.loads(line)["ratio"], json.loads(line)["tokens"]) != (0.5, 128)))
    orders_path = tmp_path / "mix" / "orders.jsonl"
    orders_path.write_text("".join(json.dumps(o) + "\n" for o in per_order if (o["ratio"], o["order"]) != (0.5, 2)))
    logs = []
    _sweep(monkeypatch, tmp_path, 3, logs)
    trained_again = [m for m in logs if "tokens" in m and "[order" in m]
    assert trained_again and all("ratio 0.500" in m and "[order 2]" in m for m in trained_again)
    assert len(trained_again) == 1  # budget 64 is already in runs.jsonl: trained through, not evaluated
    again = _rows(out)
    assert len(again) == len(rows)
    redone = next(r for r in again if (r["ratio"], r["tokens"]) == (0.5, 128))
    lost = next(r for r in rows if (r["ratio"], r["tokens"]) == (0.5, 128))
    assert redone["general_losses"] == pytest.approx(lost["general_losses"], rel=1e-6)
    before = out.read_text()
    _sweep(monkeypatch, tmp_path, 3)
    assert out.read_text() == before  # nothing left to run


@pytest.mark.parametrize("value, message", [(0, "greater than or equal to 1"), (2.5, "valid integer"),
                                            ("three", "valid integer"), (65, "less than or equal to 64")])
def test_bad_orders_is_a_one_line_error(value, message):
    with pytest.raises(HoneError, match=f"mix.orders: .*{message}") as e:
        load_recipe(shipped_recipe("tiny-cpu"), {"mix.orders": value})
    assert "\n" not in str(e.value)
