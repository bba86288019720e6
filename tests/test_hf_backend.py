"""The transformers backend against transformers itself: Gemma 2 (final-logit soft-capping,
sliding window, tied head), Phi-3 (fused qkv / gate_up), OLMo 2 (q/k norms, post-norms) and
Mixtral (MoE, router balance loss) load through load_hf, give transformers' logits and loss,
train with the real loop (loss falls, resume is bitwise identical, activation checkpointing
changes no gradient), export to a directory transformers reloads with equal logits, and
train under FSDP2 in 2 gloo processes as in 1."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hone.errors import HoneError
from hone.model import hf_backend
from hone.model.hf import load_hf, save_hf
from hone.model.hf_backend import HFCausalLM, choose_backend
from hone.model.llama import Llama, LlamaConfig
from hone.model.loss import fused_linear_cross_entropy
from hone.recipe import TrainConfig
from hone.tokens import load_tokens
from hone.train.checkpoint import load_model_weights
from hone.train.data import MixtureLoader, TokenStream
from hone.train.loop import model_shape, train
from hone.train.parallelize import apply_tensor_parallel

pytest.importorskip("transformers")  # the test extra; the backend itself needs it only to build a model

FAMILIES = ["gemma2", "phi3", "olmo2", "mixtral"]
HEAD_BIAS = "phi"  # Phi-2: LayerNorm, GELU, partial rotary, a bias on the LM head (logits and loss only)
CFG = TrainConfig(seq_len=16, batch_size=4, lr=1e-2, warmup_steps=2, checkpoint_every=3, log_every=100)
COMMON = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def hf_config(family: str):
    import transformers as tf

    if family == "gemma2":  # a window shorter than the sequence; a cap the logits reach
        return tf.Gemma2Config(**COMMON, head_dim=8, sliding_window=4, final_logit_softcapping=1.0,
                               initializer_range=0.1)
    if family == "phi3":
        return tf.Phi3Config(**COMMON)
    if family == "olmo2":
        return tf.Olmo2Config(**COMMON)
    if family == "phi":
        return tf.PhiConfig(**COMMON)
    return tf.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny random model as transformers saves it (safetensors)."""
    from transformers import AutoModelForCausalLM

    dirs = {}
    for family in FAMILIES + [HEAD_BIAS]:
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(family)
        AutoModelForCausalLM.from_config(hf_config(family)).save_pretrained(path, safe_serialization=True)
        dirs[family] = path
    return dirs


def reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (2, 16), generator=g), torch.randint(3, 256, (2, 16), generator=g)


@pytest.mark.parametrize("family", FAMILIES + [HEAD_BIAS])
def test_load_chooses_transformers_and_gives_its_logits(model_dirs, family):
    config = json.loads((model_dirs[family] / "config.json").read_text())
    backend, reason = choose_backend(config, "auto")
    assert backend == "transformers" and f"model_type {family!r}" in reason and "\n" not in reason
    model, tok = load_hf(model_dirs[family])
    assert isinstance(model, HFCausalLM) and tok is None and model.backend_reason == reason
    ref = reference(model_dirs[family])
    assert list(model.state_dict()) == list(ref.state_dict())  # transformers' own names
    assert model.fused_head
    ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids).logits)


@pytest.mark.parametrize("family, fused", [(f, True) for f in FAMILIES + [HEAD_BIAS]] + [("mixtral", False)])
def test_fused_loss_and_gradients_equal_the_reference(model_dirs, family, fused):
    """Per-token losses are the cross-entropy of transformers' logits (soft-capped for Gemma 2);
    the loss and every gradient equal transformers' loss, plus its router loss for Mixtral; the
    same through the exact fallback on transformers' logits (a head the fused loss does not know)."""
    model, _ = load_hf(model_dirs[family])
    model.fused_head = fused
    ref = reference(model_dirs[family])
    ids, targets = batch(1)
    loss, per_token = model(ids, targets)
    moe = family == "mixtral"
    out = ref(ids, output_router_logits=True) if moe else ref(ids)
    ce = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), reduction="none")
    expected = ce.mean() + (ref.router_aux_loss_coef * out.aux_loss if moe else 0)
    torch.testing.assert_close(per_token, ce.detach().view(2, 16), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    if family == "gemma2":  # the cap changes the loss: the fused path applies it
        with torch.no_grad():
            raw = F.cross_entropy(model.lm_head(model.model(ids).last_hidden_state).flatten(0, 1), targets.flatten())
        assert abs(float(raw) - float(ce.mean())) > 1e-3
    loss.backward()
    expected.backward()
    theirs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_checkpointing_gives_the_same_gradients(model_dirs, family):
    model, _ = load_hf(model_dirs[family])
    model.train()
    ids, targets = batch(2)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        model.model.activation_checkpointing = checkpointing
        loss, _ = model(ids, targets)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert model.decoder_layers[0].gradient_checkpointing  # transformers' own recompute is on
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-7, msg=name)
    model.model.activation_checkpointing = False
    model(ids, targets)
    assert not model.decoder_layers[0].gradient_checkpointing


def loader(token_dirs) -> MixtureLoader:
    streams = {n: TokenStream(load_tokens(d), CFG.seq_len) for n, d in token_dirs.items()}
    return MixtureLoader(streams, domain="biomedical", general="general", batch_size=4, ratio=0.5)


def run(path: Path, token_dirs, workdir: Path, steps: int = 6, **kw) -> tuple[HFCausalLM, list[dict]]:
    torch.manual_seed(0)
    model, _ = load_hf(path)
    train(model, loader(token_dirs), CFG, workdir, total_steps=steps, log=lambda m: None, **kw)
    return model, [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_training_falls_resumes_identically_and_exports(model_dirs, token_dirs, tmp_path, family):
    straight, metrics = run(model_dirs[family], token_dirs, tmp_path / "a")
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.2
    run(model_dirs[family], token_dirs, tmp_path / "b", max_steps=4)  # "killed" after step 4
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_000004")  # resume from the periodic one at 3
    resumed, again = run(model_dirs[family], token_dirs, tmp_path / "b", resume=True)
    assert [m["loss"] for m in again] == [m["loss"] for m in metrics]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    save_hf(straight, None, tmp_path / "export", extra_files={"trainer_state.json": {"step": 6}})
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == family
    ids, _ = batch(3)
    with torch.no_grad():
        assert torch.equal(reference(tmp_path / "export")(ids).logits, straight(ids))


def test_planner_shape_from_the_config(model_dirs):
    dense, _ = load_hf(model_dirs["olmo2"])
    shape = model_shape(dense)
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.ffn, shape.vocab) == (2, 32, 4, 2, 64, 256)
    assert shape.params() == pytest.approx(dense.num_parameters(), rel=0.05)  # OLMo 2's q/k norms aside
    moe, _ = load_hf(model_dirs["mixtral"])
    assert model_shape(moe).ffn == 2 * 64  # the two active experts: FLOPs per token, not parameters


def test_a_deep_copy_is_one_model_again(model_dirs):
    """A mixture sweep deep-copies the base model: the copy's transformers model shares the copy's weights."""
    model, _ = load_hf(model_dirs["gemma2"])
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.add_(1.0)
    assert twin.hf_model.model.embed_tokens.weight is twin.model.embed_tokens.weight  # tied, and the copy's
    assert not torch.equal(twin.hf_model.lm_head.weight, model.lm_head.weight)
    ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(twin(ids), twin.hf_model(ids).logits)


def test_a_llama_through_transformers_equals_hones_own(tmp_path):
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    save_hf(Llama(cfg).init_weights(seed=0), None, tmp_path)
    ours, _ = load_hf(tmp_path)
    theirs, _ = load_hf(tmp_path, backend="transformers")
    assert isinstance(theirs, HFCausalLM) and not isinstance(ours, HFCausalLM)
    ids, targets = batch()
    torch.testing.assert_close(theirs(ids, targets)[1], ours(ids, targets)[1], rtol=1e-5, atol=1e-5)


def test_weights_missing_from_the_files_are_an_error_not_random(model_dirs, tmp_path):
    shutil.copytree(model_dirs["olmo2"], tmp_path / "cut")
    tensors = load_file(str(tmp_path / "cut" / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "cut" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HoneError, match=r"cut: weights do not fit the config: missing keys 'model.norm.weight' \(1 in"):
        load_hf(tmp_path / "cut")


def test_hone_backend_on_gemma_is_one_line(model_dirs):
    with pytest.raises(HoneError) as e:
        load_hf(model_dirs["gemma2"], backend="hone")
    assert str(e.value).startswith("model.backend is 'hone' but Hone's own Llama does not build this model: "
                                   "model_type 'gemma2'")
    assert "\n" not in str(e.value)


def test_auto_keeps_hone_for_a_llama_and_transformers_may_be_forced():
    llama = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4).to_hf_dict()
    assert choose_backend(llama, "auto") == ("hone", "Hone's own Llama builds model_type 'llama' exactly")
    assert choose_backend(llama, "transformers")[0] == "transformers"


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setattr(hf_backend, "transformers_available", lambda: False)
    with pytest.raises(HoneError, match=r"^model.backend is 'transformers', but transformers is not installed: "
                                        r"pip install 'hone\[transformers\]'$"):
        choose_backend({"model_type": "llama"}, "transformers")
    with pytest.raises(HoneError, match=r"needs the transformers backend for model_type 'gemma2'.*'hone\[trans"):
        choose_backend({"model_type": "gemma2"}, "auto")


def test_tensor_parallel_is_refused_in_one_line(model_dirs):
    class Mesh:
        def size(self):
            return 2

    model, _ = load_hf(model_dirs["phi3"])
    with pytest.raises(HoneError, match=r"^train.tp = 2: the transformers backend \(model_type 'phi3'\) has no "):
        apply_tensor_parallel(model, Mesh())


@pytest.mark.parametrize("chunk", [3, 50])
def test_soft_capped_fused_loss_matches_plain_values_and_grads(chunk):
    torch.manual_seed(0)
    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(100, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 100, (50,))
    loss, per_token = fused_linear_cross_entropy(h, w, y, token_weight=1 / 50, chunk=chunk, softcap=3.0)
    (2.5 * loss).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(3.0 * torch.tanh(h2 @ w2.t() / 3.0), y, reduction="none")
    (2.5 * ref.mean()).backward()
    torch.testing.assert_close(per_token, ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- FSDP2, 2 gloo processes

def _fsdp_worker(model_dir: str, token_root: str, workdir: str) -> None:
    """One torchrun worker: Gemma 2 (tied head, soft cap, sliding window) under FSDP2, one unit
    per decoder layer, with activation checkpointing."""
    from hone.plan.layout import ParallelPlan
    from hone.train.parallelize import init_distributed, parallelize

    torch.set_num_threads(1)
    plan = ParallelPlan(dp=2, data_parallel="fsdp", activation_checkpointing=True)
    ctx = init_distributed(plan, "cpu")
    model, _ = load_hf(Path(model_dir))
    model = parallelize(model, plan, ctx)
    torch.manual_seed(0)
    dirs = {name: Path(token_root) / name for name in ("biomedical", "general")}
    train(model, loader(dirs), CFG, Path(workdir), total_steps=4, ctx=ctx, log=lambda m: None)
    torch.distributed.destroy_process_group()


def test_fsdp2_two_processes_match_one(model_dirs, token_dirs, tmp_path):
    root = next(iter(token_dirs.values())).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           __file__, str(model_dirs["gemma2"]), str(root), str(tmp_path / "fsdp")],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, metrics = run(model_dirs["gemma2"], token_dirs, tmp_path / "one", steps=4)
    two = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["batch"] for m in two] == [m["batch"] for m in metrics]
    for a, b in zip(metrics, two):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["step"], a["loss"], b["loss"])
    fresh, _ = load_hf(model_dirs["gemma2"])
    load_model_weights(tmp_path / "fsdp" / "checkpoints" / "step_000004", fresh)  # DCP, written by 2, read by 1
    for (name, a), b in zip(one.state_dict().items(), fresh.state_dict().values()):
        assert (a - b).abs().max() < 1e-4, name


if __name__ == "__main__":  # the FSDP2 test's torchrun workers
    _fsdp_worker(*sys.argv[1:])
