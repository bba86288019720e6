"""benchmarks/gpu_trainer.py: its --smoke mode runs every row on the CPU and prints the JSON the
GPU run will; without a GPU and without --smoke it says so and exits 0. Run in this process
(importing torch again in a subprocess costs more than the smoke run itself)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_trainer.py"


def _main(monkeypatch, capsys, *args):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = importlib.util.spec_from_file_location("gpu_trainer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["gpu_trainer.py", *args])
    rc = module.main()
    out = capsys.readouterr()
    return rc, json.loads(out.out), out.err


def test_smoke_runs_every_row_and_prints_json(monkeypatch, capsys):
    rc, result, err = _main(monkeypatch, capsys, "--smoke")
    assert rc == 0, err[-2000:]
    tiny = result["shapes"]["tiny"]
    rows = tiny["rows"]
    assert set(rows) == {"hf_compiled", "hone_bare", "hone_loop", "hone_float8"}
    for name in ("hone_bare", "hone_loop"):
        assert rows[name]["tokens_per_s"] > 0 and rows[name]["mfu_full"] > rows[name]["mfu_causal"]
    assert "fused projections off (default on cpu)" in rows["hone_loop"]["start_line"]
    assert rows["hone_float8"]["skipped"].startswith("train.float8 = true needs a CUDA GPU")
    # 6 N + 12 L h s with N = 2 layers x (4 attention + 3 MLP matrices, 2 norms) + final norm + head, by hand:
    n = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64 + 512 * 64
    assert tiny["flops_per_token"] == {"full": 6 * n + 12 * 2 * 64 * 64, "causal": 6 * n + 6 * 2 * 64 * 64}
    assert tiny["summary"]["loop_vs_bare"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_it_says_so_and_exits_cleanly(monkeypatch, capsys):
    rc, result, err = _main(monkeypatch, capsys)
    assert rc == 0 and result == {"skipped": "no CUDA GPU"}
    assert "no CUDA GPU here" in err
