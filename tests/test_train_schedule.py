"""Learning-rate schedules (cosine, wsd, constant; re-warm-up) and the base's optimizer state."""

import hashlib
import json
import math

import pytest
import torch

from conftest import tiny_llama
from hone.errors import HoneError
from hone.recipe import TrainConfig
from hone.tokens import load_tokens
from hone.train.data import MixtureLoader, TokenStream
from hone.train.loop import make_optimizer, train
from hone.train.schedule import lr_at, state_of, use_base_optimizer, warmup_start


def cosine_before_schedules(step: int, total: int, cfg: TrainConfig) -> float:
    """hone.train.loop.lr_at as it was before train.schedule existed (commit 3ca3b63), verbatim."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("lr, warmup, ratio, total", [(3e-3, 2, 0.1, 100), (1e-4, 5, 0.0, 7), (6e-4, 0, 0.3, 13),
                                                      (2e-5, 10, 1.0, 10)])
def test_default_cosine_is_bit_identical_to_the_old_schedule(lr, warmup, ratio, total):
    cfg = TrainConfig(lr=lr, warmup_steps=warmup, min_lr_ratio=ratio)
    assert [lr_at(s, total, cfg) for s in range(total + 2)] == \
        [cosine_before_schedules(s, total, cfg) for s in range(total + 2)]


def test_default_train_section_keeps_its_hash():
    """Runs made before the schedule fields existed are not restarted by them (train hash)."""
    from hone.recipe import parse_recipe
    from hone.train.workdir import LAYOUT_FIELDS, train_hash

    data = {"data": {"packaged": {}}, "curate": {"domain": {"keywords": ["gene"]}}}
    default = parse_recipe(data)
    explicit = parse_recipe({**data, "train": {"schedule": "cosine", "warmup_from": 0.0, "reset_optimizer": True,
                                               "decay_fraction": 0.2}})
    wsd = parse_recipe({**data, "train": {"schedule": "wsd"}})
    assert train_hash(default) == train_hash(explicit) != train_hash(wsd)
    # The hash as it was computed before (commit 3ca3b63): the new fields did not exist.
    old = json.loads(default.train.model_dump_json(exclude=LAYOUT_FIELDS | {"schedule", "decay_fraction",
                                                                            "warmup_from", "reset_optimizer",
                                                                            "lora", "float8"}))
    for key, value in (("mixture", None), ("upsample_fraction", 0.0), ("upsample_ratio", None),
                       ("nan_skip_batches", 1)):
        if old.get(key) == value:
            old.pop(key)
    assert train_hash(default) == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]


def test_wsd_by_hand():
    """lr 1, 2 warm-up steps, 10 steps, the last 30% (3 steps) decaying to 0.1 along 1 - sqrt(p)."""
    cfg = TrainConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.3)
    want = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
            0.1 + 0.9 * (1 - math.sqrt(1 / 3)), 0.1 + 0.9 * (1 - math.sqrt(2 / 3)), 0.1]
    assert [lr_at(s, 10, cfg) for s in range(10)] == pytest.approx(want, abs=1e-12)


def test_wsd_decay_never_cuts_into_warm_up():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.9)
    # 10 steps: decay would start at step 1, but starts after warm-up at 4: 6 decay steps.
    want = [0.25, 0.5, 0.75, 1.0] + [1 - math.sqrt(k / 6) for k in range(1, 7)]
    assert [lr_at(s, 10, cfg) for s in range(10)] == pytest.approx(want, abs=1e-12)


def test_constant_and_rewarm_by_hand():
    const = TrainConfig(lr=2.0, warmup_steps=4, schedule="constant")
    assert [lr_at(s, 8, const, 1.0) for s in range(8)] == [1.25, 1.5, 1.75, 2.0, 2.0, 2.0, 2.0, 2.0]
    cos = TrainConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.0)
    # re-warm-up from 0.2: 0.2 + 0.8 * 1/2, then 1.0; then the cosine over the 2 remaining steps
    assert [lr_at(s, 4, cos, 0.2) for s in range(4)] == pytest.approx([0.6, 1.0, 1.0, 0.5], abs=1e-12)


CFG = TrainConfig(seq_len=16, batch_size=4, lr=3e-3, warmup_steps=2, log_every=100, weight_decay=0.1)


def loader(token_dirs):
    streams = {n: TokenStream(load_tokens(d), CFG.seq_len) for n, d in token_dirs.items()}
    return MixtureLoader(streams, domain="biomedical", general="general", batch_size=4, ratio=0.5)


@pytest.fixture
def base_run(token_dirs, tmp_path):
    """A Hone run trained 3 steps (checkpoints/step_000003, metrics.jsonl) and its final/ directory."""
    torch.manual_seed(0)
    model = tiny_llama()
    run = tmp_path / "base_run"
    train(model, loader(token_dirs), CFG, run, total_steps=6, max_steps=3, log=lambda m: None)
    (run / "final").mkdir()
    return run, model


def test_base_state_of_a_hone_run(base_run):
    run, _ = base_run
    state = state_of(run / "final")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert state.optimizer_dir == (run / "checkpoints" / "step_000003").resolve()
    assert state.lr == lines[-1]["lr"] == lr_at(2, 6, CFG)
    start, why = warmup_start(CFG.model_copy(update={"warmup_from": "base"}), state)
    assert start == state.lr and "re-warm-up from the base's final learning rate" in why
    assert warmup_start(CFG.model_copy(update={"warmup_from": "base"}), None)[0] == 0.0
    assert state_of(run) is None  # not a final/ directory, no trainer_state.json


def test_base_state_of_a_trainer_checkpoint(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps(
        {"log_history": [{"learning_rate": 2e-5, "step": 10}, {"loss": 1.0, "step": 10},
                         {"learning_rate": 1.5e-5, "step": 20}, {"train_runtime": 3.0}]}))
    state = state_of(tmp_path)
    assert state.lr == 1.5e-5 and state.optimizer_dir is None


def test_reset_optimizer_false_loads_the_base_moments(base_run, token_dirs, tmp_path):
    run, _ = base_run
    torch.manual_seed(0)
    model = tiny_llama()
    # The reference: the base's optimizer as its checkpoint holds it, loaded the resume way.
    from hone.train.checkpoint import load_checkpoint

    ref_model = tiny_llama()
    ref_opt = make_optimizer(ref_model, CFG)
    load_checkpoint(run / "checkpoints" / "step_000003", ref_model, ref_opt, loader(token_dirs))
    model.load_state_dict(ref_model.state_dict())

    keep = CFG.model_copy(update={"reset_optimizer": False, "weight_decay": 0.0, "betas": (0.8, 0.9)})
    opt = make_optimizer(model, keep)
    said = use_base_optimizer(keep, state_of(run / "final"), model, opt)
    assert "AdamW state of the Hone run" in said
    for (p, q) in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"])
        assert float(opt.state[p]["step"]) == 3
    # The recipe's hyperparameters stay, only the moments come from the base.
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    assert all(tuple(g["betas"]) == (0.8, 0.9) for g in opt.param_groups)

    fresh = make_optimizer(model, CFG)
    assert use_base_optimizer(CFG, state_of(run / "final"), model, fresh).startswith("optimizer: fresh AdamW")
    assert not fresh.state


def test_reset_optimizer_changes_the_first_step(base_run, token_dirs, tmp_path):
    """Training from the base with its moments (reset_optimizer = false) takes another first
    step than with fresh ones; the start line says which happened."""
    run, base_model = base_run
    state = state_of(run / "final")
    weights = {}
    for reset in (True, False):
        model = tiny_llama()
        model.load_state_dict(base_model.state_dict())
        said = []
        cfg = CFG.model_copy(update={"reset_optimizer": reset, "warmup_from": "base"})
        train(model, loader(token_dirs), cfg, tmp_path / f"cpt_{reset}", total_steps=2, max_steps=1,
              log=said.append, base=state)
        assert any(("fresh AdamW" if reset else "AdamW state of the Hone run") in m for m in said), said
        assert any("re-warm-up from the base's final learning rate" in m for m in said), said
        weights[reset] = [p.detach().clone() for p in model.parameters()]
        lines = [json.loads(line) for line in (tmp_path / f"cpt_{reset}" / "metrics.jsonl").read_text().splitlines()]
        assert lines[0]["lr"] == lr_at(0, 2, cfg, state.lr)
    assert any(not torch.equal(a, b) for a, b in zip(weights[True], weights[False]))


def test_base_optimizer_that_does_not_fit_is_one_line(base_run, tmp_path):
    run, _ = base_run
    other = tiny_llama(vocab=300)
    cfg = CFG.model_copy(update={"reset_optimizer": False})
    with pytest.raises(HoneError, match=r"train.reset_optimizer = false: the optimizer state in .* does not fit"):
        use_base_optimizer(cfg, state_of(run / "final"), other, make_optimizer(other, cfg))


def test_report_plots_the_learning_rate(tmp_path):
    from hone.report import write_report
    from hone.rundir import write_json

    cfg = TrainConfig(lr=1.0, warmup_steps=2, schedule="wsd")
    write_json(tmp_path / "recipe.json", {"recipe": {"run": {"name": "r"}, "train": {"schedule": "wsd"}}})
    rows = [{"step": s + 1, "loss": 5.0, "lr": lr_at(s, 10, cfg), "tokens": 64 * (s + 1), "tokens_per_s": 1.0,
             "elapsed_s": 1.0} for s in range(10)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert 'alt="learning rate"' in write_report(tmp_path).read_text()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "lr"}) + "\n"
                                                    for r in rows))
    html = write_report(tmp_path).read_text()
    assert 'alt="training loss"' in html and 'alt="learning rate"' not in html


@pytest.mark.parametrize("value", ["bse", -1e-4, True])
def test_bad_warmup_from_is_one_line(value):
    from hone.recipe import parse_recipe

    with pytest.raises(HoneError, match=r'train.warmup_from: must be a learning rate >= 0 or "base"'):
        parse_recipe({"data": {"packaged": {}}, "curate": {"domain": {"keywords": ["g"]}},
                      "train": {"warmup_from": value}}, "r.toml")
