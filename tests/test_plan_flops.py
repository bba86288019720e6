"""One FLOPs count, one model shape, one place where the trainer's plan meets the planner's."""

from __future__ import annotations

import dataclasses

import pytest

from hone.errors import HoneError
from hone.model.shape import config_of, shape_of
from hone.plan.config import Config
from hone.plan.layout import ParallelPlan, fixed_fields, train_fields
from hone.plan.shapes import PRESETS, ModelShape, flops_per_token, shape_from_dict


def test_flops_per_token_by_hand_counts_causal_attention_in_full():
    m = ModelShape("tiny", layers=2, hidden=32, heads=4, kv_heads=2, ffn=64, vocab=256)
    # One layer: q and o 32x32 each, k and v 32x16 each (2 kv heads of 8), SwiGLU 3 x 32x64, 2 RMSNorms.
    layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32
    assert layer == 9280
    seq = 16
    # 6 per weight of every matmul (2 layers, the head) + QK^T and AV over all 16 keys, x3 for backward.
    by_hand = 6 * (2 * layer + 256 * 32) + 12 * 2 * 32 * seq
    assert flops_per_token(m, seq) == by_hand == 172800
    assert m.flops_per_token(seq) == by_hand


@pytest.mark.parametrize("name", ["llama3-8b", "smollm2-135m"])
def test_shape_and_config_round_trip(name):
    s = PRESETS[name]
    cfg = config_of(s)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.tie_word_embeddings) == \
        (s.layers, s.hidden, s.kv_heads, s.tied_embeddings)
    assert shape_of(cfg, name=s.name) == s
    assert shape_of(config_of(s, rope_theta=5e5), name=s.name) == s


def test_config_of_a_gpt_shape_is_an_error():
    with pytest.raises(HoneError, match="arch 'gpt'"):
        config_of(PRESETS["gpt-1.7b"])


def test_model_info_reads_back_new_and_old_files():
    s = dataclasses.replace(PRESETS["smollm2-135m"], name="trained model")
    assert shape_from_dict({**dataclasses.asdict(s), "device": "cuda", "device_name": "NVIDIA H100"}) == s
    old = {"layers": 30, "hidden": 576, "heads": 9, "kv_heads": 3, "ffn": 1536, "vocab": 49152,
           "tied_embeddings": True, "device": "cpu"}
    assert shape_from_dict(old) == s


def test_layout_maps_both_ways():
    c = Config(tp=2, pp=1, dp=4, micro_batch=2, recompute="full", zero=3, sequence_parallel=False)
    fields = train_fields(c)
    assert fields == train_fields(c.as_dict()) == {"micro_batch": 2, "tp": 2, "pp": 1, "data_parallel": "fsdp",
                                                   "activation_checkpointing": True, "sequence_parallel": False}
    plan = ParallelPlan(dp=4, tp=fields["tp"], data_parallel=fields["data_parallel"],
                        activation_checkpointing=fields["activation_checkpointing"])
    assert Config(**fixed_fields(plan), micro_batch=fields["micro_batch"]) == c
    assert fixed_fields(ParallelPlan(dp=1, data_parallel="fsdp"))["zero"] == 0  # FSDP over one rank shards nothing
    # A pipeline with interleaving and sequence parallelism maps both ways too.
    c = Config(tp=2, pp=4, dp=2, micro_batch=1, recompute="none", zero=3, vpp=2, sequence_parallel=True)
    fields = train_fields(c)
    assert fields | {"micro_batch": 1} == {"micro_batch": 1, "tp": 2, "pp": 4, "data_parallel": "fsdp",
                                           "activation_checkpointing": False, "sequence_parallel": True,
                                           "pp_schedule": "interleaved", "vpp": 2}
    plan = ParallelPlan(dp=2, **{k: v for k, v in fields.items() if k != "micro_batch"})
    assert Config(**fixed_fields(plan), micro_batch=1) == c
