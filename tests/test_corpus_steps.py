"""One step config for the recipe's [[curate.steps]] and the build file's [[steps]]; one runner."""

import json
import random

import pytest

from hone.corpus.build_config import load_build, run_build
from hone.corpus.pipeline import curate
from hone.corpus.write import read_corpus_table
from hone.errors import HoneError
from hone.recipe import parse_recipe

WORDS = "gene protein cell enzyme membrane binding river mountain music theatre history city".split()


def _pool(path, n=120, seed=0):
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(40))
        lines.append(json.dumps({"id": f"d{i}", "text": text}))
        if i % 10 == 0:  # near copies for MinHash
            lines.append(json.dumps({"id": f"c{i}", "text": text + " extra"}))
    lines.append("{not json")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_recipe_curate_steps_run_through_the_runner(tmp_path):
    pool = _pool(tmp_path / "pool.jsonl")
    recipe = parse_recipe({
        "data": {"inputs": [str(pool)]},
        "curate": {"domain": {"name": "bio", "keywords": ["gene"]},
                   "steps": [{"type": "filter", "min_words": 5},
                             {"type": "exact_dedup"},
                             {"type": "dedup", "threshold": 0.7},
                             {"type": "retrieve", "query": ["gene protein"], "top_k": 20, "name": "bio",
                              "keep_rest": True}]},
    })
    m = curate(recipe.curate, [pool], tmp_path / "run", text_field=recipe.data.text_field)
    t = m["totals"]
    assert t["docs_in"] == t["kept"] + t["dropped"] + t["quarantined"]
    assert t["quarantined"] == 1 and t["dropped"] > 0
    assert m["steps"]["03-dedup"]["dropped"]["near_duplicate"]["docs"] > 0
    table = read_corpus_table(tmp_path / "run" / "corpus")
    assert table.num_rows == t["kept"] == sum(m["domains"].values())
    assert m["domains"]["bio"] == 20
    assert curate(recipe.curate, [pool], tmp_path / "run", text_field="text") == m  # rerun: stored manifest


@pytest.mark.parametrize("step,field", [("dsir", "kk"), ("rate", "pairz"), ("select", "budget")])
def test_bad_field_in_build_step_is_one_line(tmp_path, step, field):
    extra = {"dsir": 'target = ["x"]\n', "rate": "", "select": ""}[step]
    f = tmp_path / "build.toml"
    f.write_text(f'[build]\ninputs = ["{tmp_path}/missing.jsonl"]\noutput = "{tmp_path}/out"\n\n'
                 f'[[steps]]\ntype = "filter"\n\n[[steps]]\ntype = "{step}"\n{extra}{field} = 1\n')
    with pytest.raises(HoneError) as e:
        load_build(f)
    msg = str(e.value)
    assert "\n" not in msg and f"steps.1.{step}.{field}" in msg and "unknown field" in msg
    assert not (tmp_path / "out").exists()


def test_bad_step_setting_fails_before_any_work(tmp_path):
    pool = _pool(tmp_path / "pool.jsonl")
    f = tmp_path / "build.toml"
    f.write_text(f'[build]\ninputs = ["{pool}"]\noutput = "{tmp_path}/out"\n\n[[steps]]\ntype = "filter"\n\n'
                 f'[[steps]]\ntype = "rate"\ncriterion = "xx"\n')
    with pytest.raises(HoneError, match=r"steps\.1\.rate: .*criterion"):
        run_build(load_build(f), log=lambda m: None)
    assert not (tmp_path / "out" / ".hone" / "steps" / "01-filter").exists()
