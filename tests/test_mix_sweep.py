"""`hone mix sweep` on the tiny recipe: runs.jsonl lines, resume skips finished points, a
lost point is measured again with the same value. Needs the packaged demo data."""

import json

import pytest

from hone.corpus.sources import data_dir
from hone.recipe import load_recipe, shipped_recipe

pytestmark = pytest.mark.skipif(
    not (data_dir() / "r-bioc-go.db.done").exists() or not (data_dir() / "r-cran-janeaustenr.done").exists(),
    reason="demo data not fetched (bash setup.sh test fetches it)")


def test_sweep_writes_runs_and_resumes(tmp_path):
    from hone.pipeline import sweep_mixture as run_sweep

    recipe = load_recipe(shipped_recipe("tiny-cpu"), {"mix.ratios": [0.0, 0.5, 1.0], "mix.tokens": [1024, 2048],
                                                     "mix.base_tokens": 1024, "eval.max_tokens_per_set": 300,
                                                     "data.packaged.wikipedia": 100, "data.packaged.gene_ontology": 100,
                                                     "curate.domain.top_k": 100, "model.random.vocab": 512})
    out = run_sweep(recipe, tmp_path, log=lambda m: None)
    assert out == tmp_path / "mix" / "runs.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 * 3  # tokens 0 (the base) and two budgets per ratio
    assert all(set(r) == {"model_params", "ratio", "tokens", "general_loss", "domain_loss"} for r in rows)
    assert sorted({r["tokens"] for r in rows}) == [0, 1024, 2048]
    base = [r for r in rows if r["tokens"] == 0]
    assert len({(r["general_loss"], r["domain_loss"]) for r in base}) == 1
    text = out.read_text()
    run_sweep(recipe, tmp_path, log=lambda m: None)
    assert out.read_text() == text  # nothing re-run
    lost = [line for line in text.splitlines()
            if json.loads(line)["ratio"] == 0.5 and json.loads(line)["tokens"] == 1024]
    out.write_text("".join(line + "\n" for line in text.splitlines() if line not in lost))
    run_sweep(recipe, tmp_path, log=lambda m: None)
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(again) == len(rows)
    redone = next(r for r in again if r["ratio"] == 0.5 and r["tokens"] == 1024)
    assert redone == pytest.approx(json.loads(lost[0]), rel=1e-5)


def test_sweep_bad_eval_set_name(tmp_path):
    from hone.errors import HoneError
    from hone.pipeline import sweep_mixture as run_sweep

    recipe = load_recipe(shipped_recipe("tiny-cpu"), {"mix.domain_set": "nope"})
    with pytest.raises(HoneError, match="mix.domain_set: no evaluation set named 'nope'"):
        run_sweep(recipe, tmp_path, log=lambda m: None)
