"""Training loop: learns, logs, and resumes bitwise-exactly from its checkpoints."""

import json
import shutil

import pytest
import torch

from conftest import tiny_llama
from hone.recipe import TrainConfig
from hone.tokens import load_tokens
from hone.train.data import MixtureLoader, TokenStream
from hone.train.loop import latest_checkpoint, lr_at, train

CFG = TrainConfig(seq_len=16, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=3, log_every=100)


def loader(token_dirs):
    streams = {n: TokenStream(load_tokens(d), CFG.seq_len) for n, d in token_dirs.items()}
    return MixtureLoader(streams, domain="biomedical", general="general", batch_size=4, ratio=0.5)


def run(token_dirs, workdir, steps=10, max_steps=None, resume=False):
    torch.manual_seed(0)
    model = tiny_llama()
    summary = train(model, loader(token_dirs), CFG, workdir, total_steps=steps, resume=resume,
                    max_steps=max_steps, log=lambda m: None)
    return model, summary


def test_loss_falls_and_metrics_are_logged(token_dirs, tmp_path):
    _, summary = run(token_dirs, tmp_path, steps=30)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 31))
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.5
    assert set(lines[0]["loss_by_domain"]) == {"biomedical", "general"}
    assert summary["served"] == {"biomedical": 60, "general": 60}


def test_resume_is_bitwise_identical(token_dirs, tmp_path):
    straight, _ = run(token_dirs, tmp_path / "a")
    run(token_dirs, tmp_path / "b", max_steps=7)  # "killed" after step 7; last checkpoint at 6... and 7
    # Drop the end-of-run checkpoint so the resume starts from the periodic one at step 6.
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_000007")
    resumed, summary = run(token_dirs, tmp_path / "b", resume=True)
    assert summary["steps"] == 10
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    lines = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 11))


def test_resume_in_the_same_process_restores_the_optimizer(token_dirs, tmp_path):
    """A model trained to step 4 and resumed in place (its last gradients still on it, as a
    mixture sweep does between budgets) continues exactly as an uninterrupted run: the Adam
    moments come back from the checkpoint instead of restarting from zero."""
    straight, _ = run(token_dirs, tmp_path / "a")
    torch.manual_seed(0)
    model, data = tiny_llama(), loader(token_dirs)
    train(model, data, CFG, tmp_path / "b", total_steps=10, max_steps=4, log=lambda m: None)
    assert any(p.grad is not None for p in model.parameters())
    train(model, data, CFG, tmp_path / "b", total_steps=10, resume=True, log=lambda m: None)
    for (name, a), b in zip(straight.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_corrupt_checkpoint_falls_back_with_message(token_dirs, tmp_path):
    run(token_dirs, tmp_path, steps=10)
    ckpts = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_000009", "step_000010"]  # keep-last-2
    (ckpts[-1] / "trainer_state.json").write_text("{not json")
    messages = []
    assert latest_checkpoint(tmp_path / "checkpoints", messages.append) == ckpts[0]
    assert "step_000010 is incomplete or corrupt (unreadable trainer_state.json" in messages[0]
    (ckpts[0] / ".metadata").unlink()
    assert latest_checkpoint(tmp_path / "checkpoints", messages.append) is None
    assert "no DCP .metadata" in messages[-1]


def test_damaged_shard_falls_back_to_the_previous_checkpoint(token_dirs, tmp_path):
    run(token_dirs, tmp_path, steps=10)
    newest = tmp_path / "checkpoints" / "step_000010"
    for shard in newest.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])  # a write cut short
    messages = []
    torch.manual_seed(0)
    model = tiny_llama()
    summary = train(model, loader(token_dirs), CFG, tmp_path, total_steps=10, resume=True, log=messages.append)
    assert any("step_000010 failed to load" in m for m in messages), messages
    assert any("resumed from" in m and "step_000009" in m for m in messages), messages
    assert summary["steps"] == 10
    straight, _ = run(token_dirs, tmp_path / "straight")
    for (name, a), b in zip(straight.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("step, expected", [(0, 1.5e-3), (1, 3e-3), (2, 3e-3), (99, 3e-4)])
def test_lr_schedule(step, expected):
    assert lr_at(step, 100, CFG) == pytest.approx(expected, rel=0.05)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_training_on_device_matches_cpu_losses(token_dirs, tmp_path, device):
    """The same run on an accelerator logs the CPU's losses (the CPU half always runs)."""
    losses = {}
    for where in ("cpu", device):
        torch.manual_seed(0)
        model = tiny_llama().to(where)
        train(model, loader(token_dirs), CFG, tmp_path / where, total_steps=8, log=lambda m: None)
        losses[where] = [json.loads(l)["loss"] for l in (tmp_path / where / "metrics.jsonl").read_text().splitlines()]
        assert next(model.parameters()).device.type == where
    assert losses[device] == pytest.approx(losses["cpu"], rel=1e-3)
