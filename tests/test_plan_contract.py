"""Planner: the issue's CLI contract (presets, specs, JSON fields, launch output, bad input) and
uneven / interleaved pipeline stages."""

import json

import pytest

from hone.plan.api import make_plan
from hone.plan.commands import pipeline_split_args
from hone.plan.config import Config, Constants
from hone.plan.memory import inflight, memory, stage_layout
from hone.plan.search import structural_reason
from hone.plan.shapes import PRESETS
from tiny_runs import hone_process


def _hone(*args):
    return hone_process(*args, check=False)


def test_training_issue_benchmark_shapes_are_presets():
    s, b = PRESETS["hone-125m"], PRESETS["hone-1b"]
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.ffn, s.vocab) == (768, 12, 12, 12, 2048, 32000)
    assert (b.hidden, b.layers, b.heads, b.kv_heads, b.ffn, b.vocab) == (2048, 16, 32, 8, 8192, 128256)
    for name in ("llama3-8b", "llama3-70b", "llama3.1-405b", "gpt3-175b", "smollm2-135m"):
        assert name in PRESETS


def test_uneven_stages_follow_llama3_layout():
    m = PRESETS["llama3.1-405b"]
    assert stage_layout(m, Config(8, 16, 1, 1)) == (7,) + (8,) * 14 + (7,)
    assert stage_layout(m, Config(8, 16, 1, 1, vpp=8)) == (7,) + (8,) * 14 + (7,)
    assert structural_reason(m, Config(8, 16, 64, 1, vpp=8), 8192, 2048, 8192) is None
    assert structural_reason(m, Config(8, 16, 64, 1, vpp=9), 8192, 2048, 8192) == \
        "pp*vpp = 16*9 exceeds 126 layers + 2 (embedding, loss)"
    for layers, p, v in [(10, 4, 1), (5, 4, 1), (50, 4, 8), (33, 8, 2)]:
        shape = PRESETS["hone-125m"].__class__("x", layers, 64, 4, 4, 128, 100)
        lay = stage_layout(shape, Config(1, p, 1, 1, vpp=v))
        assert sum(lay) == layers and len(lay) == p and max(lay) - min(lay) <= v
    assert pipeline_split_args(m, 16, 8) == ["--account-for-embedding-in-pipeline-split",
                                             "--account-for-loss-in-pipeline-split",
                                             "--num-virtual-stages-per-pipeline-rank 8"]
    assert pipeline_split_args(PRESETS["llama3-70b"], 8, 2) == ["--num-layers-per-virtual-pipeline-stage 5"]


def test_inflight_per_stage():
    c = Config(8, 8, 1, 1, vpp=2)
    assert inflight(c, 64, 0) == pytest.approx(8 * (1 + 7 / 16))  # Korthikanti et al. for the first stage
    assert inflight(c, 64, 7) < inflight(c, 64, 1) < inflight(c, 64, 0)
    assert inflight(Config(8, 8, 1, 1), 64, 3) == 5 and inflight(Config(8, 8, 1, 1), 2, 0) == 2
    # The second stage of an uneven split (8 layers, 15 in flight) outweighs the first (7 layers, 16).
    mem = memory(PRESETS["llama3.1-405b"], Config(8, 16, 64, 1, "none", 2), 8192, 2048, Constants())
    assert mem.stage == "stage 1"


def test_llama3_405b_published_config_within_15_percent():
    for gpus, published in ((8192, 430), (16384, 400)):
        r = make_plan("llama3.1-405b", f"{gpus // 8}x8xH100", seq=8192, global_batch=2048,
                      fix="tp=8,pp=16,mb=1,recompute=none,zero=2,vpp=8")
        assert abs(r["configs"][0]["tflops_per_gpu"] / published - 1) < 0.15


def test_cli_inline_spec_hf_config_and_toml_cluster(tmp_path):
    cfg = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 128, "vocab_size": 256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    mat = [[0 if i == j else (400 if i // 2 == j // 2 else 20) for j in range(4)] for i in range(4)]
    (tmp_path / "c.toml").write_text(f'gpu = "A100-80GB"\nnodes = 2\ngpus_per_node = 2\nmatrix = {mat}\n')
    for model in (str(tmp_path / "config.json"), "layers=2,hidden=64,heads=4,kv_heads=2,ffn=128,vocab=256"):
        p = _hone("plan", "--model", model, "--cluster", str(tmp_path / "c.toml"), "--seq", "128",
                  "--global-batch", "8", "--top", "2", "--json", "--out", "")
        assert p.returncode == 0, p.stderr
        rows = json.loads(p.stdout)
        assert len(rows) == 2 and rows[0]["gpus"] == 4 and rows[0]["fits"]
        assert set(rows[0]["memory_breakdown"]) >= {"weights", "grads", "optimizer", "activations", "logits",
                                                    "overhead"}


def test_cli_plan_file_has_launch_material(tmp_path):
    out = tmp_path / "plan.json"
    p = _hone("plan", "--model", "llama3-70b", "--cluster", "4x8xH100", "--seq", "8192", "--global-batch", "64",
              "--top", "2", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "hone train settings:" in p.stdout and "Megatron-LM:" in p.stdout
    L = json.loads(out.read_text())["launch"]
    assert L["hone_train_toml"].startswith("[train]\nseq_len = 8192\nbatch_size = 64\n")
    assert (L["torchrun"].startswith("python -m hone.train.torchrun --nnodes 4 --nproc-per-node 8")
            and "-m hone.train.worker" in L["torchrun"])
    assert "#SBATCH --nodes=4" in L["slurm"] and f"srun {L['torchrun']} &" in L["slurm"]
    assert "--num-query-groups 8" in L["megatron_args"]
    one = make_plan("hone-125m", "1xH100", seq=2048, global_batch=16, top=1)["launch"]
    assert one["torchrun"] == "hone train recipe.toml --nproc 1" and one["hone_train"]["batch_size"] == 16


def test_cli_nothing_fits_is_one_line_with_the_way_out():
    p = _hone("plan", "--model", "llama3.1-405b", "--cluster", "8xH100", "--seq", "8192", "--global-batch", "64",
              "--out", "")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "nothing fits in 80 GiB" in p.stderr and "GPUs with >=" in p.stderr and "H100 GPUs (" in p.stderr


def test_fixed_dp_mismatch_reason():
    r = make_plan("llama3-8b", "8xH100", seq=4096, global_batch=16, fix="tp=2,pp=1,dp=8,mb=1,recompute=none,zero=1")
    assert r["configs"][0]["reason"] == "dp(8) * tp(2) * pp(1) = 16 != 8 GPUs" and r["configs"][0]["fits"] is False


def test_calibrate_profile_feeds_the_planner(tmp_path):
    prof = tmp_path / "hw.json"
    p = _hone("plan", "calibrate", "--quick", "--device", "cpu", "--model", "hone-125m", "-o", str(prof))
    assert p.returncode == 0, p.stderr
    data = json.loads(prof.read_text())
    assert data["measured"]["gemm_tflops"] > 0 and 0 < data["cluster"]["efficiency"] <= 1
    q = _hone("plan", "--model", "layers=2,hidden=64,heads=4,vocab=256", "--cluster", str(prof), "--seq", "64",
              "--global-batch", "4", "--json", "--top", "1", "--out", "")
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout)[0]["time_breakdown"]["gemm_efficiency"] == pytest.approx(data["cluster"]["efficiency"],
                                                                                         abs=1e-4)


def test_plan_vs_trainer_predicts_every_grid_config():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "plan_vs_trainer.py"
    spec = importlib.util.spec_from_file_location("plan_vs_trainer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cluster = {"gpu": {"name": "H100", "peak_tflops": 989.0, "memory_gib": 79.2, "hbm_gbps": 3000.0},
               "nodes": 1, "gpus_per_node": 1, "intra_gbps": 0.0, "inter_gbps": 0.0, "efficiency": 0.6}
    for name, mb, seq, rc in mod.GRID + mod.DRY_GRID:
        shape = mod.model_shape(name)
        pred = mod.predict(shape, mb, seq, rc, cluster)
        assert pred["fits"] and pred["step_time_s"] > 0 and pred["time_breakdown"]["gemm_efficiency"] == 0.6
        row = mod.compare({"step_s": pred["step_time_s"], "peak_mem_gib": pred["memory_gib_per_gpu"]}, pred)
        assert row["step_error"] == 0 and row["mem_error"] == 0
    assert abs(mod.model_shape("350m").params() / 1e6 - 374) < 5
