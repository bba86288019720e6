"""The overlapped training loop (issue 17: step n read and logged while step n+1 computes, the
optimizer step skipped on the device for a non-finite norm) gives exactly the results of the
one-step-at-a-time loop: weights, metrics.jsonl, checkpoints, NaN roll-back and skip list."""

import json

import pytest
import torch

from conftest import tiny_llama
from hone.errors import HoneError
from hone.recipe import TrainConfig
from hone.tokens import load_tokens
from hone.train.data import MixtureLoader, TokenStream
from hone.train.loop import train
from hone.train.speed import check_float8, fuse_projections
from hone.train.step_sync import step_unless_nonfinite

CFG = dict(seq_len=16, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=3, log_every=100, micro_batch=2)


def _run(token_dirs, workdir, overlap, steps=7):
    cfg = TrainConfig(**CFG, overlap_steps=overlap)
    streams = {n: TokenStream(load_tokens(d), cfg.seq_len) for n, d in token_dirs.items()}
    loader = MixtureLoader(streams, domain="biomedical", general="general", batch_size=4, ratio=0.5)
    torch.manual_seed(0)
    model = tiny_llama()
    summary = train(model, loader, cfg, workdir, total_steps=steps, log=lambda m: None)
    return model, summary


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same_run(a, b, wa, wb):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    ma, mb = _lines(wa / "metrics.jsonl"), _lines(wb / "metrics.jsonl")
    keys = ("step", "loss", "loss_by_domain", "lr", "grad_norm", "batch", "tokens")
    assert [{k: m[k] for k in keys} for m in ma] == [{k: m[k] for k in keys} for m in mb]
    assert sorted(p.name for p in (wa / "checkpoints").glob("step_*")) == \
        sorted(p.name for p in (wb / "checkpoints").glob("step_*"))
    for ckpt in (wa / "checkpoints").glob("step_*"):  # the loader position each checkpoint resumes from
        sa = json.loads((ckpt / "trainer_state.json").read_text())["loader"]
        sb = json.loads((wb / "checkpoints" / ckpt.name / "trainer_state.json").read_text())["loader"]
        assert sa == sb, ckpt.name
    assert [(r.get("batch"), r.get("status")) for r in _lines(wa / "samples.jsonl")] == \
        [(r.get("batch"), r.get("status")) for r in _lines(wb / "samples.jsonl")]


def test_overlapped_loop_equals_the_stepwise_loop(token_dirs, tmp_path):
    a, sa = _run(token_dirs, tmp_path / "a", overlap=True)
    b, sb = _run(token_dirs, tmp_path / "b", overlap=False)
    _same_run(a, b, tmp_path / "a", tmp_path / "b")
    assert sa["served"] == sb["served"] and [m["step"] for m in _lines(tmp_path / "a" / "metrics.jsonl")] == \
        list(range(1, 8))


def test_overlapped_loop_rolls_back_a_nan_as_the_stepwise_loop(token_dirs, tmp_path, monkeypatch):
    # NaN at step 5: found while step 6 is already computed; that step is dropped with the roll-back to step 3.
    monkeypatch.setenv("HONE_FAULT", "nan:step=5")
    a, _ = _run(token_dirs, tmp_path / "a", overlap=True)
    b, _ = _run(token_dirs, tmp_path / "b", overlap=False)
    _same_run(a, b, tmp_path / "a", tmp_path / "b")
    for wd in (tmp_path / "a", tmp_path / "b"):
        assert json.loads((wd / "heal" / "skips.json").read_text())["batches"] == [4]
    ea, eb = _lines(tmp_path / "a" / "events.jsonl"), _lines(tmp_path / "b" / "events.jsonl")
    assert [e["kind"] for e in ea] == [e["kind"] for e in eb] == ["nonfinite", "decision", "recovered"]
    assert ea[1]["checkpoint_step"] == eb[1]["checkpoint_step"] == 3


def _adam(seed=0):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)  # fused AdamW runs on the CPU too
    return p, opt


def test_fused_adamw_skips_on_a_device_side_flag():
    p, opt = _adam()
    p.grad = torch.ones_like(p)
    assert step_unless_nonfinite(opt, torch.tensor(1.0)) is None  # decided on the device
    after_one = p.detach().clone()
    assert not torch.equal(after_one, _adam()[0])
    p.grad = torch.full_like(p, float("nan"))
    step_unless_nonfinite(opt, torch.tensor(float("nan")))
    assert torch.equal(p.detach(), after_one) and float(opt.state[p]["step"]) == 1.0
    assert not hasattr(opt, "found_inf")
    plain = torch.nn.Parameter(torch.zeros(2))
    sgd = torch.optim.SGD([plain], lr=1.0)
    plain.grad = torch.ones(2)
    assert step_unless_nonfinite(sgd, torch.tensor(float("inf"))) is False and torch.equal(plain, torch.zeros(2))


def test_float8_on_cpu_is_a_one_line_error_naming_the_field():
    with pytest.raises(HoneError, match=r"^train.float8 = true needs a CUDA GPU .*this run is on cpu"):
        check_float8(TrainConfig(float8=True), torch.device("cpu"))
    check_float8(TrainConfig(), torch.device("cpu"))


def test_fused_projections_default_by_device_and_off_under_tp():
    model = tiny_llama()
    fused = lambda: {m.fused for m in model.modules() if hasattr(m, "fused")}  # noqa: E731
    assert fuse_projections(model, TrainConfig(), torch.device("cpu")) == \
        "fused projections off (default on cpu)" and fused() == {False}
    assert fuse_projections(model, TrainConfig(fused_projections=True), torch.device("cpu")) == \
        "fused projections on (pinned by the recipe)" and fused() == {True}
    assert "tp > 1" in fuse_projections(model, TrainConfig(fused_projections=True), torch.device("cpu"), tp=2)
    assert fused() == {False}
