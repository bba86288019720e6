"""hone branch on packaged corpora with a very small random model: experts as independent,
resumable jobs; a domain added later trains only its own expert (the others' files are
unchanged byte for byte); the joint baseline sees the experts' batches; experts/eval.json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hone.errors import HoneError

RECIPE = """
[run]
name = "t"
seed = 0
[data.packaged]
wikipedia = 40
gene_ontology = 60
licenses = 40
python_stdlib = 40
max_chars = 800
heldout_domain = 5
heldout_general = 5
heldout_unseen = 1
[curate.domain]
name = "bio"
keywords = ["gene", "protein", "cell"]
top_k = 60
[model]
source = "random"
[model.random]
layers = 1
hidden = 32
heads = 2
kv_heads = 1
ffn = 64
vocab = 300
[train]
seq_len = 32
batch_size = 4
max_tokens = 384
lr = 3e-3
warmup_steps = 1
checkpoint_every = 1
log_every = 1
threads = 1
[eval]
max_tokens_per_set = 200
seq_len = 64
batch_size = 8
[experts]
seed_tokens = 128
heldout_fraction = 0.15
heldout_max_docs = 5
[[experts.domain]]
name = "legal"
sources = ["licenses"]
[[experts.domain]]
name = "code"
sources = ["python_stdlib"]
max_tokens = 256
"""

BIO = """
[[experts.domain]]
name = "bio"
keywords = ["gene", "protein", "enzyme", "cell"]
top_k = 50
branch_from = ["legal", "code"]
branch_weights = [3, 1]
"""


def _recipe(tmp_path: Path, text: str):
    from hone.recipe import load_recipe

    path = tmp_path / "r.toml"
    path.write_text(text)
    return load_recipe(path), path


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def branched(tmp_path_factory):
    from hone.pipeline import branch_experts as run_branch

    tmp = tmp_path_factory.mktemp("branch")
    recipe, path = _recipe(tmp, RECIPE)
    logs: list[str] = []
    out = run_branch(recipe, tmp / "run", recipe_path=path, with_joint=True, log=logs.append)
    return {"tmp": tmp, "run": tmp / "run", "out": out, "logs": logs, "path": path}


def test_branch_trains_each_expert_joint_and_compares(branched):
    root = branched["run"] / "experts"
    for name in ("legal", "code"):
        done = json.loads((root / name / "expert.json").read_text())
        assert (root / name / "final" / "model.safetensors").exists()
        assert (root / name / "heldout.jsonl").exists()
        assert (root / name / "launch" / "slurm.sbatch").read_text().count("hone.train.worker --workdir") == 1
        # The expert's run directory is one the training engine (and torchrun) resumes by itself.
        rec = json.loads((root / name / "recipe.json").read_text())["recipe"]
        assert rec["model"] == {**rec["model"], "source": "hf"} and rec["curate"]["domain"]["name"] == name
        assert done["tokens"] == {"legal": 384, "code": 256}[name]
    joint = json.loads((root / "joint" / "expert.json").read_text())
    assert joint["tokens"] == 384 + 256 and joint["domains"] == {"legal": 3, "code": 2}
    out = json.loads((root / "eval.json").read_text())
    assert list(out["models"]) == ["base", "seed", "legal", "code", "average", "ensemble", "joint"]
    assert set(out["sets"]) == {"legal", "code", "general"}
    assert out["cost"]["ensemble"]["forward_passes_per_token"] == 2
    assert out["cost"]["average"]["tokens"] == out["cost"]["joint"]["tokens"] == 640
    assert (root / "merged" / "ensemble" / "ensemble.json").exists()
    assert (root / "merged" / "average" / "model.safetensors").exists()
    html = (branched["run"] / "report.html").read_text()
    assert "<h2>Domain experts</h2>" in html and 'id="experts-table"' in html
    assert html.count("<tr><td>") >= 7 and "http" not in html.split("Domain experts")[1]


def test_held_out_documents_are_in_no_training_stream(branched):
    from hone.experts.data import is_heldout, read_curated

    docs = read_curated(branched["run"])
    held = {json.loads(x)["id"] for n in ("legal", "code")
            for x in (branched["run"] / "experts" / n / "heldout.jsonl").read_text().splitlines()}
    assert held and all(is_heldout(i, 0.15) for i in held)
    assert {d["id"] for d in docs} >= held


def test_adding_a_domain_trains_only_the_new_expert(branched):
    from hone.pipeline import branch_experts as run_branch

    root = branched["run"] / "experts"
    before = {n: _digests(root / n) for n in ("legal", "code", "seed")}
    recipe, path = _recipe(branched["tmp"], RECIPE + BIO)
    logs: list[str] = []
    run_branch(recipe, branched["run"], recipe_path=path, log=logs.append)
    for n, digests in before.items():
        assert _digests(root / n) == digests, n
    assert any(line.startswith("[legal] finished earlier") for line in logs)
    assert not any(line.startswith("[legal] step") or line.startswith("[code] step") for line in logs)
    assert (root / "bio" / "expert.json").exists()
    # BTM's later branching: the new expert starts from the 3:1 average of the earlier two.
    from safetensors.torch import load_file

    from hone.experts.merge import average_state_dicts

    start = root / "bio" / "branch_point"
    assert json.loads((root / "bio" / "recipe.json").read_text())["recipe"]["model"]["path"] == str(start.resolve())
    want = average_state_dicts([load_file(str(root / n / "final" / "model.safetensors")) for n in ("legal", "code")],
                               [0.75, 0.25])
    got = load_file(str(start / "model.safetensors"))
    assert all(bool((got[k] == want[k]).all()) for k in want)
    out = json.loads((root / "eval.json").read_text())
    assert out["domains"] == ["legal", "code", "bio"] and out["cost"]["ensemble"]["forward_passes_per_token"] == 3


def test_an_expert_stops_and_resumes_on_its_own(tmp_path):
    from hone.pipeline import branch_experts as run_branch

    recipe, path = _recipe(tmp_path, RECIPE.replace("seed_tokens = 128", "seed_tokens = 0"))
    logs: list[str] = []
    run_branch(recipe, tmp_path / "run", recipe_path=path, only=["legal"], prepare_only=True, log=logs.append)
    legal = tmp_path / "run" / "experts" / "legal"
    assert any(f"-m hone.train.worker --workdir {legal}" in line for line in logs)
    assert any("--only legal --resume" in line for line in logs)
    assert (legal / "recipe.json").exists() and not (legal / "checkpoints").exists()
    run_branch(recipe, tmp_path / "run", recipe_path=path, only=["code"], max_steps=1, evaluate=False,
               log=lambda m: None)
    code = tmp_path / "run" / "experts" / "code"
    assert (code / "checkpoints").exists() and not (code / "expert.json").exists()
    assert not (legal / "checkpoints").exists() and not (legal / "expert.json").exists()  # --only code: legal untouched
    logs: list[str] = []
    run_branch(recipe, tmp_path / "run", recipe_path=path, only=["code"], resume=True, evaluate=False, log=logs.append)
    assert any("resumed from" in line and "step_000001" in line for line in logs)
    assert json.loads((code / "expert.json").read_text())["steps"] == 2


def test_bad_branch_input_is_one_line(tmp_path):
    from hone.pipeline import branch_experts as run_branch
    from hone.recipe import load_recipe

    recipe, path = _recipe(tmp_path, RECIPE)
    with pytest.raises(HoneError, match="--only 'nope': no such expert in \\[experts\\] \\(known: legal, code\\)"):
        run_branch(recipe, tmp_path / "run", recipe_path=path, only=["nope"])
    with pytest.raises(HoneError, match="no \\[\\[experts.domain\\]\\] tables"):
        run_branch(load_recipe("recipes/tiny-cpu.toml"), tmp_path / "run2")
    bad = tmp_path / "bad.toml"
    for extra, msg in [('[[experts.domain]]\nname = "x"\n', "give sources, keywords or examples"),
                       ('[[experts.domain]]\nname = "legal"\nsources = ["a"]\n', "appears twice"),
                       ('[[experts.domain]]\nname = "joint"\nsources = ["a"]\n', "is reserved"),
                       ('[[experts.domain]]\nname = "x"\nsources = ["a"]\nbranch_from = ["y"]\n',
                        "not an expert listed before it")]:
        bad.write_text(RECIPE + extra)
        with pytest.raises(HoneError, match=msg) as e:
            load_recipe(bad)
        assert "\n" not in str(e.value) and str(e.value).startswith(str(bad))
