"""`hone plan calibrate` times Hone's own layer, loss and optimizer, and the planner uses that
table for plans of the same shape on one device (tp = 1), falling back to its FLOP model otherwise."""

from __future__ import annotations

import json

import pytest
import torch

from hone.plan.config import Config, Constants
from hone.plan.hardware import cluster_from_dict, load_profile
from hone.plan.memory import GIB, stage_params
from hone.plan.search import plan_record
from hone.plan.shapes import ModelShape
from hone.plan.trainer_profile import head_time, layer_time, shape_key
from hone.train.calibrate import measure

TINY = ModelShape("tiny", 2, 64, 4, 2, 128, 256)


@pytest.fixture(scope="module")
def table():
    torch.manual_seed(0)
    return measure(TINY, torch.device("cpu"), quick=True)


def test_measured_table_describes_the_layer(table):
    assert table["shape"] == shape_key(TINY)
    for part in ("layer_fwd_bwd", "layer_fwd", "head_fwd_bwd"):
        assert all(table[part][k] >= 0 for k in "abc")
    # Whole-layer checkpointing keeps only the layer's fp32 input: 4 bytes per hidden unit.
    assert table["ckpt_bytes_per_token"] == pytest.approx(4 * TINY.hidden)
    # Without it the layer keeps far more (fp32 norm inputs, q/k/v, SwiGLU intermediates...).
    assert table["act_bytes_per_token"] > 10 * TINY.hidden
    assert table["optimizer_s_per_param"] > 0


def _cluster(trainer):
    return cluster_from_dict({"gpu": {"name": "dev", "peak_tflops": 100.0, "memory_gib": 80.0, "hbm_gbps": 1000.0},
                              "gpus_per_node": 2, "intra_gbps": 100.0, "inter_gbps": 100.0, "efficiency": 0.5,
                              "trainer": trainer}, "test")


def test_planner_uses_the_table_for_the_same_shape_on_one_device(table):
    cl = _cluster(table)
    single = cluster_from_dict({"gpu": {"name": "dev", "peak_tflops": 100.0, "memory_gib": 80.0, "hbm_gbps": 1000.0},
                                "gpus_per_node": 1, "efficiency": 0.5, "trainer": table}, "t")
    mb, seq = 4, 64
    for rc in ("none", "full"):
        c = Config(1, 1, 1, mb, rc, 0, sequence_parallel=False)
        rec = plan_record(TINY, c, seq, mb, single, Constants())
        layer = layer_time(table, mb * seq, seq, rc)
        want = (TINY.layers + head_time(table, mb * seq) / layer) * layer
        want += table["optimizer_s_per_param"] * stage_params(TINY, c, "last")
        assert rec["step_time_s"] == pytest.approx(want, rel=1e-4)
        kept = (table["act_bytes_per_token"] if rc == "none" else table["ckpt_bytes_per_token"]) * mb * seq
        acts = TINY.layers * kept + (table["act_bytes_per_token"] * mb * seq if rc == "full" else 0)
        assert rec["memory_breakdown"]["activations"] == pytest.approx(acts / GIB, abs=1e-3)
    # Tensor parallelism changes the layer's shapes: the FLOP model with the GEMM efficiency.
    tp2 = plan_record(TINY, Config(2, 1, 1, mb, "none", 0, sequence_parallel=False), seq, mb, cl, Constants())
    assert tp2["time_breakdown"]["gemm_efficiency"] == 0.5
    other = ModelShape("other", 2, 128, 4, 2, 256, 256)
    rec = plan_record(other, Config(1, 1, 2, mb, "none", 0), seq, 2 * mb, cl, Constants())
    assert rec["time_breakdown"]["gemm_efficiency"] == 0.5  # a different shape: not measured


def test_profile_round_trip_keeps_the_table(table, tmp_path):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"cluster": {"gpu": {"name": "dev", "peak_tflops": 1.0, "memory_gib": 16.0},
                                            "gpus_per_node": 1, "trainer": table}}))
    cl = load_profile(path)
    assert cl.trainer == table and cl.to_json()["trainer_calibrated"] is True
