"""The supervisor's re-planning through hone.plan: valid world sizes from the model's shape,
a micro-batch that fits the device after a shrink, step times priced by the planner's
model anchored on the measured ones, and one-line errors for bad hardware specs."""

from __future__ import annotations

import pytest

from hone.errors import HoneError
from hone.heal.policy import Failure, Situation, decide, step_time_at
from hone.heal.replan import Replanner
from hone.plan.config import Config, Constants
from hone.plan.hardware import parse_preset
from hone.plan.search import plan_record
from hone.plan.shapes import ModelShape
from hone.recipe import TrainConfig
from hone.train.hooks import ENV_MICRO_BATCH, micro_batch

LLAMA_1B = {"layers": 16, "hidden": 2048, "heads": 32, "kv_heads": 8, "ffn": 8192, "vocab": 128256,
            "tied_embeddings": False, "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}


def planner(info=LLAMA_1B, hardware="auto", devices=8, **train) -> Replanner:
    return Replanner(TrainConfig(**{"seq_len": 4096, "batch_size": 16, **train}), hardware, info, devices)


def test_auto_hardware_is_the_workers_device():
    assert planner().cluster.name == "8xH100 (auto)"
    assert planner(info={**LLAMA_1B, "device": "cpu"}, devices=4).cluster.name == "4xcpu (auto)"
    assert planner(info=None, devices=2).cluster.name == "2xcpu (auto)"


def test_plans_follow_the_planner_and_anchor_on_measurement():
    p = planner()
    assert p.valid_worlds(8) == [8, 4, 2, 1]  # dp must divide the global batch of 16
    shape = ModelShape("trained model", 16, 2048, 32, 8, 8192, 128256)
    want = plan_record(shape,
                       Config(tp=1, pp=1, dp=4, micro_batch=4, recompute="none", zero=3, sequence_parallel=False),
                       4096, 16, parse_preset("4xH100"), Constants())
    got = p.plan(4)
    assert got["source"].startswith("hone.plan on 8xH100")
    assert (got["dp"], got["rows_per_rank"], got["micro_batch"]) == (4, 4, 4)
    assert got["modeled_step_s"] == want["step_time_s"] and got["memory_gib"] == want["memory_gib_per_gpu"]
    # Measured 1.3 s on 8: the time on 4 is 1.3 s times the planner's ratio, not a guess.
    modeled = p.modeled([8, 4])
    assert step_time_at({8: 1.3}, 4, modeled) == pytest.approx(1.3 * modeled[4] / modeled[8])
    assert step_time_at({8: 1.3, 4: 2.0}, 4, modeled) == 2.0  # a measurement wins
    assert step_time_at({8: 1.3}, 4) == pytest.approx(2.6)   # no model: data-parallel scaling


def test_a_shrink_that_would_not_fit_gets_a_smaller_micro_batch():
    p = planner()
    # 8 sequences per rank on 2 GPUs do not fit in 80 GiB at once: the plan accumulates micro-batches.
    whole = plan_record(ModelShape("m", 16, 2048, 32, 8, 8192, 128256),
                        Config(tp=1, pp=1, dp=2, micro_batch=8, recompute="none", zero=3, sequence_parallel=False),
                        4096, 16, parse_preset("2xH100"), Constants())
    assert not whole["fits"]
    got = p.plan(2)
    assert got["fits"] and got["micro_batch"] < 8 and 8 % got["micro_batch"] == 0 and got["memory_gib"] <= 80
    assert p.micro_batch_override(2) == got["micro_batch"]
    assert p.micro_batch_override(8) is None  # the recipe's own plan: nothing to change


def test_recipe_micro_batch_that_no_longer_divides_is_replanned():
    # micro_batch 3 divides the 3 rows per rank on 4 workers, not the 4 rows on 3.
    p = planner(info={**LLAMA_1B, "device": "cpu"}, devices=4, seq_len=64, batch_size=12, micro_batch=3)
    assert p.micro_batch_override(4) is None
    assert p.micro_batch_override(3) == 4
    no_shape = planner(info=None, devices=4, seq_len=64, batch_size=12, micro_batch=3)
    assert no_shape.plan(3)["micro_batch"] == 4 and no_shape.micro_batch_override(3) == 4


def test_worlds_that_cannot_run_are_left_out(tmp_path):
    # tp=2 does not divide 3 attention heads: no world is valid.
    odd = planner(info={**LLAMA_1B, "heads": 3, "kv_heads": 3}, tp=2)
    assert odd.valid_worlds(8) == [] and "does not divide 3 attention heads" in odd.plan(8)["reason"]
    # A device of 30 GiB: the model's weights and optimizer fit on 8 sharded ranks, not on 1.
    toml = tmp_path / "small.toml"
    toml.write_text('gpus_per_node = 8\n[gpu]\nname = "small"\npeak_tflops = 500\nmemory_gib = 30\n')
    small = planner(hardware=str(toml))
    assert 8 in small.valid_worlds(8) and 1 not in small.valid_worlds(8)
    assert "GiB" in small.plan(1)["reason"]


def test_shrink_is_priced_by_the_planner():
    p = planner()
    worlds = p.valid_worlds(8)
    s = Situation(world=8, target_world=8, step=10, checkpoint_step=8, total_steps=100, step_s={8: 1.0},
                  restart_s=20.0, worlds=worlds, modeled=p.modeled(worlds), down=1, repair_left_s=3600)
    d = decide(Failure("worker_lost", 3), s)
    assert d.chosen.action == "shrink" and d.chosen.world == 4  # 7, 6, 5 do not split the batch of 16
    assert d.chosen.cost_s == pytest.approx(20 + 92 * s.modeled[4] / s.modeled[8])


@pytest.mark.parametrize("spec, msg", [("nosuch.toml", "nosuch.toml: file not found"),
                                       ("8xFoo", "unknown GPU 'Foo'"),
                                       ("2xH100", "has 2 devices, fewer than the 8 workers")])
def test_bad_hardware_is_a_one_line_error(spec, msg):
    with pytest.raises(HoneError, match=msg):
        planner(hardware=spec)


def test_workers_take_the_replanned_micro_batch(monkeypatch):
    cfg = TrainConfig(micro_batch=0)
    assert micro_batch(cfg, 4) == 4
    monkeypatch.setenv(ENV_MICRO_BATCH, "2")
    assert micro_batch(cfg, 4) == 2
