"""The sweep's price (hone.mix.sweep.sweep_estimate), which `hone mix sweep` prints and the
decision stage counts in the budget: what is left read from mix/, priced by hand from a probe."""

from __future__ import annotations

import json

from hone.mix.sweep import Probe, sweep_estimate, sweep_left
from hone.recipe import load_recipe, shipped_recipe
from hone.rundir import mark_done

# 2 s per proxy step, 3 s per train call (start-up and save), 5 s per evaluation of both sets.
PROBE = Probe(step_s=2.0, call_s=3.0, eval_s=5.0, checkpoint_bytes=1000)


def _recipe():
    # 128 x 8 = 1,024 tokens per step: the budgets are steps 1 and 2; one general-only base step.
    return load_recipe(shipped_recipe("tiny-cpu"), {"train.seq_len": 128, "train.batch_size": 8,
                                                    "mix.ratios": [0.0, 0.5, 1.0], "mix.tokens": [1024, 2048],
                                                    "mix.base_tokens": 1024})


def _write_runs(mixdir, points):
    mixdir.mkdir(parents=True, exist_ok=True)
    (mixdir / "runs.jsonl").write_text("".join(
        json.dumps({"model_params": 1, "ratio": r, "tokens": t, "general_loss": 5.0, "domain_loss": 5.0}) + "\n"
        for r, t in points))


def test_estimate_prices_only_what_is_left(tmp_path):
    recipe = _recipe()
    # Nothing done: 3 runs of 2 budgets, each 2 steps + 2 calls + 2 evaluations = 2*2 + 2*3 + 2*5 = 20 s;
    # the base's 1 step and 1 call = 5 s; the base's evaluation (tokens-0 lines) 5 s.
    fresh = sweep_estimate(recipe, tmp_path, PROBE)
    assert fresh["seconds"] == 3 * 20 + 5 + 5
    assert (fresh["runs_pending"], fresh["runs_total"], fresh["points_pending"], fresh["lines_done"]) == (3, 3, 6, 0)
    assert fresh["line"].startswith("mix: estimate: 3 of 3 proxy runs to do (3 ratios x 1 order), 2,048 tokens = "
                                    "2 steps each + 1 general-only base step, 6 points | 2 s/step measured")
    assert "about 1m10s" in fresh["line"]
    # Ratio 0 finished, ratio 0.5 has its base line and the first budget, ratio 1 nothing.
    _write_runs(tmp_path / "mix", [(0.0, 0), (0.0, 1024), (0.0, 2048), (0.5, 0), (0.5, 1024)])
    left = sweep_left(recipe, tmp_path)
    assert left.pending == [(0.5, 0, [2048]), (1.0, 0, [1024, 2048])] and left.base_rows and left.base_steps == 1
    # Ratio 0.5 trains both budgets again from the base but evaluates one: 20 - 5; ratio 1: 20.
    est = sweep_estimate(recipe, tmp_path, PROBE)
    assert est["seconds"] == (20 - 5) + 20 + 5 + 5
    assert (est["runs_pending"], est["points_pending"], est["lines_done"]) == (2, 3, 5)
    # The base trained (its done marker) and every base line written: neither is priced again.
    mark_done(tmp_path / "mix" / "base")
    _write_runs(tmp_path / "mix", [(0.0, 0), (0.0, 1024), (0.0, 2048), (0.5, 0), (0.5, 1024), (1.0, 0)])
    assert sweep_estimate(recipe, tmp_path, PROBE)["seconds"] == (20 - 5) + 20
