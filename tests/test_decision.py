"""The decision stage: layout, tokens and ratio from one budget (hone.mix.decision), `hone plan
--recipe` on a config-only Llama-3-8B, the bad inputs, the re-decision, and `hone run` with a
[budget] end to end (decision.json with measured values and errors, the report's first section)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from hone.errors import HoneError
from hone.mix.budget import Redecide, redecision
from hone.mix.decision import RATIOS, decide, recipe_cluster, recipe_shape, with_measured
from hone.plan.config import Constants
from hone.plan.search import search
from hone.recipe import load_recipe, parse_recipe
from hone.rundir import read_events

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "tie_word_embeddings": False}


def _law(E: float, C: float) -> dict:
    """A D-CPT surface E + C / (r + 0.1) (no token or size term), easy to solve by hand."""
    return {"params": {"E": E, "A": None, "alpha": None, "B": 0.0, "eta": 1.0, "beta": 0.5, "C": C, "gamma": 1.0,
                       "epsilon": 0.1, "n0": 1e8, "d0": 1e6}}


def _mixture(base_general: float) -> dict:
    # domain loss 2 + 1/(R + 0.1) falls with the ratio R; general loss 3 + 0.5/(1 - R + 0.1) rises.
    return {"laws": {"dcpt": {"law": "dcpt", "domain_loss": _law(2.0, 1.0), "general_loss": _law(3.0, 0.5)}},
            "chosen": {"law": "dcpt", "ratio_range": [0.0, 1.0]}, "loss_before": {"general_loss": base_general},
            "model_params": 8.03e9, "points": [], "schedule": {"ratio": 0.5, "upsample": None}}


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    d = tmp_path / "llama3-8b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA3_8B))
    return d


def _recipe(llama_dir: Path, mixture: Path | None = None, cluster: str = "4x8xH100", **budget):
    train = {"seq_len": 8192, "batch_size": 256}
    if mixture is not None:
        train["mixture"] = str(mixture)
    return parse_recipe({"data": {"packaged": {"wikipedia": 10}}, "curate": {"domain": {"keywords": ["gene"]}},
                         "model": {"source": "hf", "path": str(llama_dir)}, "train": train,
                         "cluster": {"spec": cluster}, "budget": budget or {"gpu_hours": 2000}})


def test_decision_matches_the_planner_and_the_law_by_hand(llama_dir):
    recipe = _recipe(llama_dir, gpu_hours=2000, general_tolerance=0.05)
    shape, cluster = recipe_shape(recipe), recipe_cluster(recipe)
    d = decide(recipe, shape, cluster, mixture=_mixture(3.0 + 0.5 / 1.1))
    # Layout: the fastest of the planner's searches over what hone train runs (recompute none/full, ZeRO 0/3).
    k = Constants.hone_trainer()
    best = max((p for rc in ("none", "full") for z in (0, 3)
                for p in search(shape, cluster, 8192, 256, k, fixed={"recompute": rc, "zero": z, **({"pp": 1} if z == 0
                                                                                                  else {})},
                                top=1).plans), key=lambda p: p["tokens_per_s"])
    assert {key: d["layout"][key] for key in ("tp", "pp", "dp", "micro_batch", "recompute", "zero")} == \
        {key: best[key] for key in ("tp", "pp", "dp", "micro_batch", "recompute", "zero")}
    step = best["step_time_s"]
    steps = math.floor(2000 / 32 * 3600 / step)
    assert d["steps"] == steps and d["tokens"] == steps * 8192 * 256
    p = d["predicted"]
    assert p["step_time_s"] == step and p["memory_gib_per_gpu"] == best["memory_gib_per_gpu"]
    assert p["gpu_hours"] == pytest.approx(steps * step * 32 / 3600) and p["gpu_hours"] <= 2000
    assert p["cost"] == pytest.approx(2.0 * p["gpu_hours"])
    # Ratio: general <= base + 0.05 <=> 0.5 / (1.1 - R) <= 0.5 / 1.1 + 0.05 <=> R <= 0.1089: 0.10 on the grid.
    assert d["ratio"] == pytest.approx(0.10)
    assert p["domain_loss"] == pytest.approx(2 + 1 / 0.2) and p["general_loss"] == pytest.approx(3 + 0.5 / 1.0)
    assert d["mixture"]["reference_general_loss"]["best"] == pytest.approx(3 + 0.5 / 1.1)
    assert set(p) == {"step_time_s", "tokens_per_s", "memory_gib_per_gpu", "hours", "gpu_hours", "cost",
                      "domain_loss", "general_loss"}
    # After training: the relative error of each prediction.
    measured = {**p, "step_time_s": step * 1.25, "domain_loss": 8.0}
    out = with_measured(d, measured)
    assert out["error"]["step_time_s"] == pytest.approx(1 / 1.25 - 1)
    assert out["error"]["domain_loss"] == pytest.approx((7.0 - 8.0) / 8.0)
    assert out["error"]["cost"] == 0


def test_tolerance_reference_best_and_every_ratio_passing(llama_dir):
    recipe = _recipe(llama_dir, gpu_hours=2000, general_tolerance=0.05, general_tolerance_reference="best")
    # A base far above every prediction (an instruct base): every ratio passes "base + 0.05" ...
    d = decide(recipe, recipe_shape(recipe), recipe_cluster(recipe), mixture=_mixture(9.0))
    assert d["mixture"]["every_ratio_passes"]["base"] is True
    assert any("does not constrain" in n for n in d["notes"])
    # ... and "best + 0.05" (best = 3 + 0.5/1.1 at R = 0) still picks R = 0.10.
    assert d["mixture"]["reference"] == "best" and d["ratio"] == pytest.approx(0.10)


def test_bad_inputs_are_one_line_naming_the_field(llama_dir):
    mixture = _mixture(3.0)  # base below every prediction: nothing is within 0.05 of it
    recipe = _recipe(llama_dir, gpu_hours=2000)
    with pytest.raises(HoneError, match=r"^budget\.general_tolerance: 0\.05 nats: no domain ratio") as e:
        decide(recipe, recipe_shape(recipe), recipe_cluster(recipe), mixture=mixture)
    tiny = _recipe(llama_dir, gpu_hours=0.01)
    with pytest.raises(HoneError, match=r"^budget\.gpu_hours: 0\.01 GPU-hours buys no optimizer step") as e:
        decide(tiny, recipe_shape(tiny), recipe_cluster(tiny))
    small = _recipe(llama_dir, cluster="1xA10G", tokens=10**9)
    with pytest.raises(HoneError, match=r"^cluster\.spec: 1xA10G: no layout of llama3-8b fits") as e:
        decide(small, recipe_shape(small), recipe_cluster(small))
    assert "\n" not in str(e.value)
    with pytest.raises(HoneError, match=r"budget: give exactly one of gpu_hours, tokens, days"):
        _recipe(llama_dir, gpu_hours=1, days=2)


def _budget_recipe_file(llama_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Issue 18's example as a user writes it: Llama-3-8B from its config.json alone, 4x8xH100,
    2,000 GPU-hours and a fitted mixture. (recipe file, mixture file)."""
    mixture = tmp_path / "mixture.json"
    mixture.write_text(json.dumps(_mixture(3.0 + 0.5 / 1.1)))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[data.packaged]\nwikipedia = 10\n[curate.domain]\nkeywords = ["gene"]\n'
                      f'[model]\nsource = "hf"\npath = "{llama_dir}"\n[train]\nseq_len = 8192\nbatch_size = 256\n'
                      f'mixture = "{mixture}"\n[cluster]\nspec = "4x8xH100"\n[budget]\ngpu_hours = 2000\n')
    return recipe, mixture


def test_plan_recipe_prices_llama3_8b_from_its_config(llama_dir, tmp_path):
    from typer.testing import CliRunner

    from hone.cli import app

    recipe, mixture = _budget_recipe_file(llama_dir, tmp_path)
    out = tmp_path / "decision.json"
    result = CliRunner().invoke(app, ["plan", "--recipe", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    d = json.loads(out.read_text())
    assert d["model"]["name"] == "llama3-8b" and d["cluster"]["nodes"] == 4 and d["layout"]["gpus"] == 32
    assert d["predicted"]["gpu_hours"] <= 2000 and d["ratio"] == pytest.approx(0.10)
    assert "step_time_s" in result.output and "tokens:" in result.output
    bad = CliRunner().invoke(app, ["plan", "--recipe", str(recipe).replace("recipe.toml", "none.toml")])
    assert bad.exit_code != 0
    # The shipped mixture (fitted up to 40,960 tokens on a 135M proxy) gives negative losses at 65B
    # tokens: no loss is predicted, the mixture's own ratio is kept, and it says so.
    shipped = ROOT / "recipes" / "demo-biomed.mixture.json"
    recipe.write_text(recipe.read_text().replace(str(mixture), str(shipped)))
    result = CliRunner().invoke(app, ["plan", "--recipe", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    d = json.loads(out.read_text())
    assert d["predicted"]["domain_loss"] is None and d["ratio"] == json.loads(shipped.read_text())["schedule"]["ratio"]
    assert any("no fitted law gives positive losses" in n for n in d["notes"])


def test_plan_recipe_as_a_fresh_process(llama_dir, tmp_path):
    """`hone plan --recipe` as a user starts it: the lazy CLI loads `plan` alone, which imports
    no torch (tests/test_layers.py checks that; benchmarks/cli_start.py times it)."""
    recipe, _ = _budget_recipe_file(llama_dir, tmp_path)
    out = subprocess.run([sys.executable, "-m", "hone.cli", "plan", "--recipe", str(recipe), "-o",
                          str(tmp_path / "d.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "step_time_s" in out.stdout and json.loads((tmp_path / "d.json").read_text())["layout"]["gpus"] == 32


def test_redecide_records_the_tokens_the_remaining_budget_buys(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "budget-cpu.toml")
    decision = {"steps": 100, "tokens": 100 * 1024, "predicted": {"step_time_s": 0.1}}
    hook = Redecide(recipe, tmp_path, decision, log=lambda m: None)
    for step in range(1, 12):
        hook({"step": step, "step_s": 0.2})  # twice the predicted step time
    (event,) = [e for e in read_events(tmp_path) if e.get("kind") == "redecide" or e.get("event") == "redecide"]
    # 10 s of training in the budget; 7 steps of 0.2 s spent -> 43 more steps: 50 in all.
    assert event["steps"] == 50 and event["tokens"] == 50 * 1024 and event["applied"] is False
    assert redecision(decision, 7, 0.1)["steps"] == 100  # on time: the same count
    # A resumed run under the same decision finds its event and records no second one.
    again = Redecide(recipe, tmp_path, decision, log=lambda m: None)
    for step in range(8, 20):
        again({"step": step, "step_s": 0.3})
    assert len([e for e in read_events(tmp_path) if e.get("kind") == "redecide"]) == 1
    # Under another decision (another token count) the comparison is made again: 10 s at 0.3 s
    # per step after 7 steps of 0.3 s -> floor((10 - 2.1) / 0.3) = 26 more, 33 in all.
    other = {**decision, "tokens": 100 * 1024 + 1}
    third = Redecide(recipe, tmp_path, other, log=lambda m: None)
    for step in range(1, 12):
        third({"step": step, "step_s": 0.3})
    events = [e for e in read_events(tmp_path) if e.get("kind") == "redecide"]
    assert len(events) == 2 and events[-1]["steps"] == 33 and events[-1]["previous_tokens"] == 100 * 1024 + 1


def test_budget_run_end_to_end_fills_measured_and_error(tmp_path):
    from hone.pipeline import run_recipe

    text = (ROOT / "recipes" / "budget-cpu.toml").read_text()
    for old, new in (("wikipedia = 300", "wikipedia = 80"), ("gene_ontology = 300", "gene_ontology = 80"),
                     ("top_k = 360", "top_k = 80"), ("tokens = [4096, 8192, 16384]", "tokens = [1024, 2048, 3072]"),
                     ("gpu_hours = 0.03", "tokens = 24576"), ("heldout_domain = 40", "heldout_domain = 8"),
                     ("heldout_general = 20", "heldout_general = 6"), ("max_tokens_per_set = 2000",
                                                                       "max_tokens_per_set = 300")):
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "budget.toml"
    path.write_text(text.replace('workdir = "runs/budget-cpu"', f'workdir = "{tmp_path / "run"}"'))
    recipe = load_recipe(path)
    run_recipe(recipe, log=lambda m: None)
    run = tmp_path / "run"
    d = json.loads((run / "plan" / "decision.json").read_text())
    assert d["tokens"] == 24576 and d["steps"] == 24 and d["sweep"]["points"] == 16
    assert 0.25 <= d["ratio"] <= 1.0 and d["ratio"] in [pytest.approx(r) for r in RATIOS]
    for key, p in d["predicted"].items():
        m = d["measured"][key]
        assert p is not None and m is not None, key
        assert d["error"][key] == pytest.approx((p - m) / m), key
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 24 and metrics[-1]["tokens"] == 24576
    html = (run / "report.html").read_text()
    assert "The decision" in html and html.index("The decision") < html.index("Perplexity before")


def test_layout_recipe_fields_are_kept(llama_dir):
    recipe = _recipe(llama_dir, gpu_hours=2000)
    train = recipe.train.model_copy(update={"layout": "recipe", "tp": 8, "micro_batch": 1,
                                            "activation_checkpointing": True, "data_parallel": "fsdp"})
    recipe = recipe.model_copy(update={"train": train})
    d = decide(recipe, recipe_shape(recipe), recipe_cluster(recipe))
    lay = d["layout"]
    assert (lay["tp"], lay["pp"], lay["dp"], lay["micro_batch"], lay["recompute"], lay["zero"]) == \
        (8, 1, 4, 1, "full", 3)
    assert lay["train"]["activation_checkpointing"] is True and lay["train"]["data_parallel"] == "fsdp"
