"""Pipeline parallel (`train.pp`) and sequence parallel on the CPU with gloo: pp=2, pp=2 x dp=2,
interleaved 1F1B and tp=2 with sequence parallelism equal one process on the same batches; kill -9
then resume under pp=2 is bitwise identical; checkpoints reshard pp=2 -> pp=1 -> pp=2; bad
pipeline fields are one-line errors; `hone plan --recipe-out` writes a [train] the trainer accepts."""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp

from hone.errors import HoneError
from hone.model.llama import Llama, LlamaConfig
from hone.plan.config import Config
from hone.plan.layout import fixed_fields, stage_layers
from hone.plan.memory import stage_layout
from hone.plan.shapes import PRESETS
from hone.recipe import TrainConfig, load_recipe
from hone.train.run import plan_from_recipe
from tiny_runs import assert_same_run, hone_process, tiny_recipe_text

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
LAYERS = 4


def _recipe_text(workdir: Path, **train) -> str:
    """tiny-cpu with 4 layers (two stages of two, or four virtual stages of one) and 4 micro-batches."""
    return tiny_recipe_text(workdir, steps=STEPS, layers=LAYERS, **{"micro_batch": 2, **train})


RECIPES = {"one": {}, "pp2": {"pp": 2}, "vpp": {"pp": 2, "pp_schedule": "interleaved", "vpp": 2},
           "sp": {"tp": 2, "sequence_parallel": True}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A run directory whose data stages are done, and one recipe per layout."""
    from hone.pipeline import run_recipe

    root = tmp_path_factory.mktemp("pipe")
    for name, fields in RECIPES.items():
        (root / f"{name}.toml").write_text(_recipe_text(root / "base", **fields))
    run_recipe(load_recipe(root / "one.toml"), root / "base", max_steps=1, log=lambda m: None)
    return root


def _hone(*args, env=None, check=True) -> subprocess.CompletedProcess:
    return hone_process(*args, env=env, check=check, timeout=600)


def _train(prepared: Path, recipe: str, name: str, *args, nproc: int = 1, **kw) -> Path:
    wd = prepared / name
    if not wd.exists():
        shutil.copytree(prepared / "base", wd)
    _hone("train", prepared / f"{recipe}.toml", "--workdir", wd, *args,
          *(("--nproc", nproc) if nproc > 1 else ()), **kw)
    return wd


def _assert_same_run(a: Path, b: Path, *, exact: bool) -> None:
    assert_same_run(a, b, steps=STEPS, exact=exact, grad_norm=True)


@pytest.fixture(scope="module")
def one_process(prepared):
    return _train(prepared, "one", "one", "--fresh")


@pytest.fixture(scope="module")
def pp2(prepared):
    return _train(prepared, "pp2", "pp2", "--fresh", nproc=2)


def test_pp2_matches_one_process_and_checkpoints_keep_hf_names(one_process, pp2):
    _assert_same_run(one_process, pp2, exact=False)
    assert json.loads((pp2 / "train_summary.json").read_text())["plan"]["pp"] == 2
    # The stages' DCP shards together hold every parameter of the whole model under its HF name,
    # and the optimizer's state is keyed by those names too.
    cfg = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=172, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    whole = set(Llama(cfg).state_dict())
    keys = set(dcp.FileSystemReader(str(pp2 / "checkpoints" / "step_000008")).read_metadata().state_dict_metadata)
    assert {k[len("model."):] for k in keys if k.startswith("model.")} == whole
    optim = {k[len("optim.state."):].rsplit(".", 1)[0] for k in keys if k.startswith("optim.state.")}
    assert optim and optim <= whole and "model.layers.3.mlp.up_proj.weight" in optim


def test_pp2_times_dp2_matches_one_process(prepared, one_process):
    _assert_same_run(one_process, _train(prepared, "pp2", "pp2dp2", "--fresh", nproc=4), exact=False)


def test_interleaved_vpp2_matches_one_process(prepared, one_process):
    wd = _train(prepared, "vpp", "vpp", "--fresh", nproc=2)
    _assert_same_run(one_process, wd, exact=False)
    assert json.loads((wd / "train_summary.json").read_text())["plan"]["pp_schedule"] == "interleaved"


def test_sequence_parallel_matches_one_process(prepared, one_process):
    """tp=2 with sequence parallelism equals one process (and so tp=2 without it, which
    tests/test_train_distributed.py compares with one process)."""
    _assert_same_run(one_process, _train(prepared, "sp", "sp", "--fresh", nproc=2), exact=False)


def test_kill9_then_resume_under_pp2_is_bitwise_identical(prepared, pp2):
    wd = prepared / "killed"
    shutil.copytree(prepared / "base", wd)
    proc = _hone("train", prepared / "pp2.toml", "--workdir", wd, "--fresh", "--nproc", 2,
                 env={"HONE_FAULT": "kill:step=6:rank=1"}, check=False)
    assert proc.returncode == 2 and "killed by SIGKILL" in proc.stderr
    out = _hone("train", prepared / "pp2.toml", "--workdir", wd, "--nproc", 2)
    assert "step_000004" in out.stdout
    _assert_same_run(pp2, wd, exact=True)


def test_checkpoints_reshard_pp2_to_pp1_to_pp2(prepared, one_process):
    wd = _train(prepared, "pp2", "reshard", "--fresh", "--max-steps", 4, nproc=2)
    out = _hone("train", prepared / "one.toml", "--workdir", wd, "--max-steps", 6)
    assert "resumed from" in out.stdout and "step_000004" in out.stdout
    _train(prepared, "pp2", "reshard", nproc=2)
    _assert_same_run(one_process, wd, exact=False)


def test_bad_pipeline_fields_are_one_line_errors(prepared, tmp_path):
    recipe = tmp_path / "pp3.toml"
    recipe.write_text(_recipe_text(tmp_path / "run", pp=3))
    shutil.copytree(prepared / "base", tmp_path / "run")  # the data stages are done: only the check runs
    proc = _hone("train", recipe, "--nproc", 2, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: train.pp (3) x train.tp (1) = 3 does not divide the number of "
                                   "processes (2)")
    t = TrainConfig(batch_size=8, micro_batch=4, pp=4)
    with pytest.raises(HoneError, match=r"train.pp = 4 needs at least 4 micro-batches per step: .* train.micro_batch "
                                        r"= 4 give 2"):
        plan_from_recipe(t, 4).validate(4, heads=4, kv_heads=2, ffn=8, batch_size=8, layers=4, micro_batch=4)
    with pytest.raises(HoneError, match=r"train.pp \(2\) x train.vpp \(4\) = 8 pipeline stages for 4 layers: every "
                                        r"stage but the first and last needs at least one layer"):
        p = plan_from_recipe(TrainConfig(pp=2, pp_schedule="interleaved", vpp=4), 2)
        p.validate(2, heads=4, kv_heads=2, ffn=8, batch_size=8, layers=4, micro_batch=2)
    with pytest.raises(HoneError, match=r"train.pp = 2 with dp = 2: use train.data_parallel = \"fsdp\""):
        plan_from_recipe(TrainConfig(pp=2, data_parallel="ddp"), 4).validate(
            4, heads=4, kv_heads=2, ffn=8, batch_size=8, layers=4, micro_batch=1)
    bad = tmp_path / "vpp.toml"
    bad.write_text(_recipe_text(tmp_path / "run", pp=2, vpp=2))
    with pytest.raises(HoneError, match=r"train.vpp = 2 needs train.pp_schedule = \"interleaved\""):
        load_recipe(bad)


def test_stage_layers_follow_the_planners_layout():
    assert stage_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert stage_layers(4, 2, 2) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    # 126 layers on 16 stages: one layer fewer on the first and last (Llama 3 405B), as the planner says.
    shape = PRESETS["llama3.1-405b"]
    for pp, vpp in ((16, 1), (8, 2), (4, 3)):
        ranges = stage_layers(shape.layers, pp, vpp)
        assert [r.start for r in ranges[1:]] == [r.stop for r in ranges[:-1]] and ranges[-1].stop == shape.layers
        per_rank = [sum(len(ranges[j * pp + r]) for j in range(vpp)) for r in range(pp)]
        assert tuple(per_rank) == stage_layout(shape, Config(1, pp, 1, 1, vpp=vpp))
    # Every configuration the planner accepts (pp * vpp <= layers + 2) leaves no middle stage empty.
    for layers, pp, vpp in ((6, 2, 4), (126, 16, 8), (80, 4, 7), (32, 8, 4)):
        ranges = stage_layers(layers, pp, vpp)
        assert all(ranges[1:-1]) and sum(map(len, ranges)) == layers, (layers, pp, vpp)


def test_recipe_out_round_trip(tmp_path, capsys):
    from conftest import run_hone

    out = tmp_path / "train.toml"
    code, stdout, stderr = run_hone(capsys, "plan", "--model", "llama3-70b", "--cluster", "8x8xH100", "--seq", "8192",
                                    "--global-batch", "64", "--top", "3", "--out", str(tmp_path / "plan.json"),
                                    "--recipe-out", out, "--pick", "2")
    assert code == 0, stderr
    chosen = json.loads((tmp_path / "plan.json").read_text())["configs"][1]
    section = tomllib.loads(out.read_text())["train"]
    t = TrainConfig(**section)
    assert (t.tp, t.pp, t.vpp, t.micro_batch) == (chosen["tp"], chosen["pp"], chosen["vpp"], chosen["micro_batch"])
    # The trainer accepts it for the planned world size and shape, and maps it back to the planned
    # configuration (ZeRO aside: under a pipeline hone train shards with FSDP, as the note says).
    shape = PRESETS["llama3-70b"]
    plan = plan_from_recipe(t, chosen["gpus"])
    plan.validate(chosen["gpus"], heads=shape.heads, kv_heads=shape.kv_heads, ffn=shape.ffn, batch_size=t.batch_size,
                  layers=shape.layers, micro_batch=t.micro_batch)
    back = fixed_fields(plan)
    assert {k: back[k] for k in ("tp", "pp", "dp", "vpp", "sequence_parallel")} == \
        {k: chosen[k] for k in ("tp", "pp", "dp", "vpp", "sequence_parallel")}
    assert t.activation_checkpointing == (chosen["recompute"] != "none")
    # The written file is also a complete recipe's [train] once joined to the other sections.
    recipe = tmp_path / "r.toml"
    recipe.write_text(_recipe_text(tmp_path / "run").partition("[train]")[0] + out.read_text())
    assert load_recipe(recipe).train.pp == chosen["pp"]
    code, _, stderr = run_hone(capsys, "plan", "--model", "llama3-70b", "--cluster", "8x8xH100", "--seq", "8192",
                               "--global-batch", "64", "--top", "3", "--out", "", "--recipe-out", out, "--pick", "9")
    assert code == 2 and "--pick 9: the plan printed 3 configuration(s)" in stderr
