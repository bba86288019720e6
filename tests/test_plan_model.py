"""Planner: shapes, memory terms against hand-computed values, search pruning, CLI surface."""

import json
import subprocess
import sys

import numpy as np
import pytest

from hone.errors import HoneError
from hone.plan.api import make_plan
from hone.plan.config import Config, Constants, parse_fix
from hone.plan.hardware import load_cluster, parse_preset
from hone.plan.memory import GIB, layer_activation_bytes, memory
from hone.plan.placement import place_matrix
from hone.plan.search import search, structural_reason
from hone.plan.shapes import PRESETS, load_model


@pytest.mark.parametrize("name,billions,tol", [("llama3-8b", 8.03, 0.01), ("llama3-70b", 70.6, 0.1),
                                               ("llama3.1-405b", 405.9, 0.1), ("gpt3-175b", 175.0, 0.5),
                                               ("smollm2-135m", 0.1345, 0.001)])
def test_preset_parameter_counts(name, billions, tol):
    assert abs(PRESETS[name].params() / 1e9 - billions) < tol


def test_flops_per_token_equals_megatron_formula_for_gpt():
    m, s = PRESETS["gpt-1t"], 2048
    l, h, V = m.layers, m.hidden, m.vocab
    megatron = 72 * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h)) / s  # per token
    # ours also counts the biases' 6 FLOPs each; within 0.01%
    assert abs(m.flops_per_token(s) / megatron - 1) < 1e-4


def test_inline_and_hf_config(tmp_path):
    m = load_model("layers=2,hidden=32,heads=4,kv_heads=2,ffn=64,vocab=256")
    assert (m.layers, m.kv_heads, m.arch) == (2, 2, "llama")
    cfg = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336, "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(str(tmp_path)).params() == PRESETS["llama3-8b"].params()
    with pytest.raises(HoneError, match="unknown model 'nope'"):
        load_model("nope")
    with pytest.raises(HoneError, match="hidden 30 is not divisible by heads 4"):
        load_model("layers=2,hidden=30,heads=4,vocab=10")
    with pytest.raises(HoneError, match="bad field"):
        load_model("layers=2,hiden=32,heads=4,vocab=10")


GPT = PRESETS["gpt-22b"]  # h=6144, a=64, ffn=4h: the Korthikanti et al. formulas apply exactly
S, B = 2048, 1


def _sbh():
    return S * B * GPT.hidden


@pytest.mark.parametrize("cfg,expected", [
    (Config(1, 1, 1, B, "none", sequence_parallel=False), lambda: _sbh() * (34 + 5 * GPT.heads * S / GPT.hidden)),
    (Config(8, 1, 1, B, "none", sequence_parallel=False), lambda: _sbh() * (10 + 24 / 8 + 5 * GPT.heads * S / (GPT.hidden * 8))),
    (Config(8, 1, 1, B, "none", sequence_parallel=True), lambda: _sbh() * (34 / 8 + 5 * GPT.heads * S / (GPT.hidden * 8))),
    (Config(8, 1, 1, B, "selective", sequence_parallel=True), lambda: _sbh() * 34 / 8),
    (Config(8, 1, 1, B, "full", sequence_parallel=True), lambda: _sbh() * 2 / 8),
    (Config(1, 1, 1, B, "full", sequence_parallel=False), lambda: _sbh() * 2),
])
def test_activation_per_layer_matches_korthikanti(cfg, expected):
    assert layer_activation_bytes(GPT, S, B, cfg, flash=False) == pytest.approx(expected(), rel=1e-12)


def test_memory_terms_by_hand():
    # llama3-8b, tp=1 pp=1 dp=8, ZeRO-1: weights 2N, grads 4N, optimizer 12N/8.
    m, k = PRESETS["llama3-8b"], Constants()
    c = Config(1, 1, 8, 1, "full", zero=1)
    mem = memory(m, c, 8192, 64, k)
    n = m.params()
    assert mem.weights == pytest.approx(2 * n)
    assert mem.grads == pytest.approx(4 * n)
    assert mem.optimizer == pytest.approx(12 * n / 8)
    assert mem.logits == pytest.approx(6 * 8192 * m.vocab)
    # ZeRO-3 shards all three over dp
    mem3 = memory(m, Config(1, 1, 8, 1, "full", zero=3), 8192, 64, k)
    assert mem3.weights == pytest.approx(2 * n / 8) and mem3.grads == pytest.approx(4 * n / 8)


def test_pipeline_inflight_1f1b_and_interleaved():
    m, k = PRESETS["gpt-1t"], Constants()
    one = memory(m, Config(8, 8, 1, 1, "selective"), 2048, 64, k)
    inter = memory(m, Config(8, 8, 1, 1, "selective", vpp=2), 2048, 64, k)
    assert one.stage == "first" and one.inflight_microbatches == 8
    assert inter.inflight_microbatches == pytest.approx(8 * (1 + 7 / 16))
    few = memory(m, Config(8, 8, 1, 1, "selective"), 2048, 3, k)  # m=3 < p: only 3 in flight
    assert few.inflight_microbatches == 3


def test_pruning_reasons():
    m = PRESETS["llama3-8b"]
    assert structural_reason(m, Config(3, 1, 1, 1), 8192, 8, 3) == "tp=3 does not divide 32 heads"
    assert structural_reason(m, Config(16, 1, 1, 1), 8192, 8, 16) == "tp=16 does not divide 8 kv heads"
    assert structural_reason(m, Config(1, 64, 1, 1), 8192, 8, 64) == "pp=64 exceeds 32 layers"
    assert structural_reason(m, Config(2, 2, 4, 1), 8192, 8, 8) == "dp(4) * tp(2) * pp(2) = 16 != 8 GPUs"
    assert "global batch 6 is not divisible" in structural_reason(m, Config(1, 1, 4, 1), 8192, 6, 4)
    res = search(m, parse_preset("3x8xH100"), 8192, 48)
    assert "tp=3 does not divide 32 heads" in res.rejected
    assert res.plans and all(p["fits"] for p in res.plans)
    tps = [p["tokens_per_s"] for p in res.plans]
    assert tps == sorted(tps, reverse=True)


def test_fix_memory_failure_has_reason():
    r = make_plan("llama3-70b", "8xH100", seq=8192, global_batch=8, fix="tp=1,pp=1,mb=1,recompute=none,zero=0")
    rec = r["configs"][0]
    assert rec["fits"] is False and rec["reason"].startswith("needs ") and rec["reason"].endswith("> 80 GiB")
    assert float(rec["reason"].split()[1]) == pytest.approx(rec["memory_gib_per_gpu"], abs=0.06)
    bad = make_plan("llama3-8b", "8xH100", seq=8192, global_batch=8, fix="tp=3,pp=1,mb=1,recompute=none,zero=0")
    assert bad["configs"][0]["reason"] == "tp=3 does not divide 32 heads"


def test_nothing_fits_names_smallest_memory_and_gpu_count():
    with pytest.raises(HoneError, match=r"nothing fits in 80 GiB.*needs [\d.]+ GiB.*or on \d+ H100 GPUs"):
        make_plan("llama3.1-405b", "8xH100", seq=8192, global_batch=64)


JSON_FIELDS = {"tp", "pp", "dp", "micro_batch", "recompute", "zero", "fits", "memory_gib_per_gpu", "memory_breakdown",
               "step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu"}


def test_cli_json_fields_and_plan_file(tmp_path):
    out = tmp_path / "plan.json"
    p = subprocess.run([sys.executable, "-m", "hone.cli", "plan", "--model", "llama3-8b", "--cluster", "8xH100", "--seq", "4096",
                        "--global-batch", "64", "--top", "3", "--json", "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert len(rows) == 3 and all(JSON_FIELDS <= r.keys() for r in rows)
    plan = json.loads(out.read_text())
    assert plan["configs"] == rows and "torchrun" in plan["launch"] and "#SBATCH --nodes=1" in plan["launch"]["slurm"]
    assert "--tensor-model-parallel-size" in plan["launch"]["megatron_args"]
    fail = subprocess.run([sys.executable, "-m", "hone.cli", "plan", "--model", "llama3-8b", "--cluster", "8xH100", "--global-batch",
                           "8", "--fix", "tp=3,pp=1,mb=1,recompute=none,zero=0", "--json", "--out", ""], capture_output=True, text=True)
    assert fail.returncode == 0 and json.loads(fail.stdout)[0]["reason"] == "tp=3 does not divide 32 heads"


@pytest.mark.parametrize("args,msg", [
    (["--model", "nope", "--cluster", "8xH100", "--global-batch", "8"], "error: unknown model 'nope'"),
    (["--model", "llama3-8b", "--cluster", "8xQ100", "--global-batch", "8"], "error: unknown GPU 'Q100'"),
    (["--model", "llama3-8b", "--cluster", "lots", "--global-batch", "8"], "error: cluster 'lots'"),
    (["--model", "llama3-8b", "--cluster", "8xH100", "--global-batch", "8", "--fix", "tp=x"], "error: --fix: tp must be an integer"),
    (["--model", "llama3-8b", "--cluster", "8xH100"], "needs --model, --cluster and --global-batch"),
])
def test_bad_input_one_line(args, msg):
    p = subprocess.run([sys.executable, "-m", "hone.cli", "plan", *args, "--out", ""], capture_output=True, text=True)
    assert p.returncode == 2 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_parse_fix():
    assert parse_fix("tp=8,pp=8,dp=4,mb=1,recompute=full,zero=1,vpp=2") == {
        "tp": 8, "pp": 8, "dp": 4, "micro_batch": 1, "recompute": "full", "zero": 1, "vpp": 2}
    with pytest.raises(HoneError, match="recompute must be"):
        parse_fix("recompute=some")


def test_cluster_toml_with_matrix_and_slow_node(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('gpu = "A100-80GB"\nnodes = 2\ngpus_per_node = 2\nintra_gbps = 300\ninter_gbps = 25\nnode_inter_gbps = [25, 5]\n')
    cl = load_cluster(str(f))
    assert cl.link_gbps(0, 1) == 300 and cl.link_gbps(0, 2) == 5
    assert cl.group_link(2, 2)[0] == 5  # the DP ring across nodes is bounded by the slow node
    mat = [[0, 100, 10, 10], [100, 0, 10, 10], [10, 10, 0, 100], [10, 10, 100, 0]]
    f.write_text(f'gpu = "H100"\nnodes = 1\ngpus_per_node = 4\nmatrix = {mat}\n')
    cl = load_cluster(str(f))
    assert cl.group_link(1, 2)[0] == 100 and cl.group_link(1, 4)[0] == 10
    f.write_text('gpu = "H100"\nnodes = 1\ngpus_per_node = 4\nmatrix = [[1, 2], [3, 4]]\n')
    with pytest.raises(HoneError, match="matrix must be 4 x 4"):
        load_cluster(str(f))


def test_placement_beats_rank_order_on_planted_matrix():
    n, rng = 64, np.random.default_rng(0)
    node = rng.permutation(n) % 8  # GPU i physically sits in node[i]; ids are shuffled
    same = node[:, None] == node[None, :]
    bw = np.where(same, 450.0, 25.0)
    bw[((node[:, None] == 3) | (node[None, :] == 3)) & ~same] = 12.0  # one node with a slow NIC
    r = place_matrix(bw, 8, 4, 2, {"tp": 100.0, "dp": 50.0, "pp": 5.0}, budget_s=4.5)
    assert r["gain"] > 1.0  # TP groups moved onto NVLink
    perm = np.array(r["rank_to_gpu"]).reshape(2, 4, 8)
    assert all(len(set(node[g])) == 1 for g in perm.reshape(-1, 8))
