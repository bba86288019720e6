"""`hone plan --recipe-out` writes a [train] that `hone train` runs, priced as the decision stage
prices it (Hone's trainer constants, the layouts the trainer has): its configuration is the
decision's, and its static memory is what `hone train --dry-run` finds on every rank of the
sharded model. Plain `hone plan` keeps Megatron-LM's constants and search space."""

from __future__ import annotations

import json
import tomllib

import pytest

from conftest import run_hone
from hone.mix.decision import choose_layout
from hone.plan.config import Constants
from hone.plan.hardware import load_cluster
from hone.plan.search import HONE_RECOMPUTE, HONE_ZERO
from hone.plan.shapes import load_shape
from hone.recipe import parse_recipe
from test_decision import LLAMA3_8B

ARGS = ("--seq", "8192", "--global-batch", "64", "--top", "8")


@pytest.fixture
def llama_config(tmp_path):
    d = tmp_path / "llama3-8b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA3_8B))
    return d / "config.json"


def _plan(capsys, tmp_path, config, *extra):
    out = tmp_path / "plan.json"
    code, stdout, stderr = run_hone(capsys, "plan", "--model", config, "--cluster", "2x8xH100", *ARGS,
                                    "--out", out, *extra)
    assert code == 0, stderr
    return json.loads(out.read_text()), stdout


def test_recipe_out_is_the_decisions_layout_and_the_dry_runs_memory(tmp_path, capsys, llama_config):
    from hone.train.dry_run import dry_run

    section = tmp_path / "train.toml"
    plan, stdout = _plan(capsys, tmp_path, llama_config, "--recipe-out", section)
    assert plan["trainer"] == "hone" and "priced for hone train" in stdout
    # Every configuration is one hone train runs: whole-layer recompute or none, ddp (no pipeline) or fsdp.
    for c in plan["configs"]:
        assert c["recompute"] in HONE_RECOMPUTE and c["zero"] in HONE_ZERO, c
        assert not (c["zero"] == 0 and c["pp"] > 1), c
    best = plan["configs"][0]
    # The same choice as the decision stage, which prices with the same function and constants.
    shape = load_shape(str(llama_config))
    decided = choose_layout(shape, load_cluster("2x8xH100"), 8192, 64, {}, Constants.hone_trainer())
    assert {k: decided[k] for k in ("tp", "pp", "dp", "micro_batch", "recompute", "zero", "vpp")} == \
        {k: best[k] for k in ("tp", "pp", "dp", "micro_batch", "recompute", "zero", "vpp")}
    assert decided["memory_gib_per_gpu"] == best["memory_gib_per_gpu"]
    # The written [train], joined to a recipe of this model, built sharded on the meta device for
    # the planned 16 ranks: its largest rank holds the bytes the plan's static terms predict.
    train = tomllib.loads(section.read_text())["train"]
    recipe = parse_recipe({"data": {"packaged": {"wikipedia": 10}}, "curate": {"domain": {"keywords": ["gene"]}},
                           "model": {"source": "hf", "path": str(llama_config.parent)}, "train": train})
    ranks = dry_run(recipe, best["gpus"], lambda m: None)["ranks"]
    held = max(sum(r.values()) for r in ranks) / 2**30
    mb = best["memory_breakdown"]
    planned = mb["weights"] + mb["grads"] + mb["optimizer"]
    assert planned == pytest.approx(held, rel=0.002), (planned, held)


def test_plain_plan_keeps_megatron_and_bad_choices_are_one_line(tmp_path, capsys, llama_config):
    plan, stdout = _plan(capsys, tmp_path, llama_config)
    assert plan["trainer"] == "megatron" and "priced for Megatron-LM" in stdout
    assert any(c["recompute"] == "selective" or c["zero"] in (1, 2) for c in plan["configs"])
    hone, _ = _plan(capsys, tmp_path, llama_config, "--trainer", "hone")
    assert hone["trainer"] == "hone" and hone["configs"][0]["tokens_per_s"] != plan["configs"][0]["tokens_per_s"]
    base = ("plan", "--model", llama_config, "--cluster", "2x8xH100", *ARGS, "--out", "")
    code, _, err = run_hone(capsys, *base, "--recipe-out", tmp_path / "t.toml", "--trainer", "megatron")
    assert code == 2 and "--recipe-out" in err and "--trainer hone" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t.toml").exists()
    code, _, err = run_hone(capsys, *base, "--trainer", "hone", "--fix", "recompute=selective")
    assert code == 2 and "--fix recompute=selective: recompute=selective: hone train recomputes whole layers" in err
    code, _, err = run_hone(capsys, *base, "--trainer", "deepspeed")
    assert code == 2 and "--trainer must be one of hone, megatron (got 'deepspeed')" in err
