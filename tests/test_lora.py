"""LoRA CPT (train.lora): one training step equals the hand-computed adapter update, only the
adapters (and the embeddings asked for) change, checkpoints hold only what trains and resume
bitwise, the merged final/ and the PEFT-format adapter give the adapted model's logits on both
backends, and bad settings are one line naming the field."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import tiny_llama
from hone.errors import HoneError
from hone.model.hf import load_hf, save_hf
from hone.model.hf_backend import HFCausalLM
from hone.model.lora import apply_lora, init_lora, lora_modules, merge_lora, save_adapter, scaling
from hone.recipe import LoraConfig, TrainConfig, load_recipe
from hone.tokens import load_tokens
from hone.train.data import MixtureLoader, TokenStream
from hone.train.loop import latest_checkpoint, train
from model_dirs import write_model_dir
from tiny_runs import tiny_recipe_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CFG = TrainConfig(seq_len=16, batch_size=4, lr=1e-2, warmup_steps=0, weight_decay=0.05, grad_clip=0,
                  checkpoint_every=3, log_every=100)


def _loader(token_dirs) -> MixtureLoader:
    streams = {n: TokenStream(load_tokens(d), CFG.seq_len) for n, d in token_dirs.items()}
    return MixtureLoader(streams, domain="biomedical", general="general", batch_size=4, ratio=0.5)


def _lora_llama(cfg: LoraConfig, seed: int = 0):
    model = tiny_llama()
    apply_lora(model, cfg)
    init_lora(model, seed)
    return model


def test_one_step_equals_the_hand_computed_adapter_update(token_dirs, tmp_path):
    """y = x W^T + s (x A^T) B^T: dL/dB = s Gy^T (X A^T), dL/dA = s (Gy B)^T X from the layer's input X
    and output gradient Gy; AdamW's first step is p (1 - lr wd) - lr g / (|g| + eps); the embedding
    moves at embedding_lr_ratio x lr; every frozen tensor stays bitwise the same."""
    cfg = LoraConfig(r=2, alpha=6, targets=["layers.1.mlp.down_proj"], train_embeddings=True,
                     embedding_lr_ratio=0.1)
    model = _lora_llama(cfg)
    layer = lora_modules(model)["model.layers.1.mlp.down_proj"]
    with torch.no_grad():  # as after some training: B != 0, so A gets a gradient too
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=torch.Generator().manual_seed(1)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}
    layer.register_forward_hook(lambda m, args, out: seen.__setitem__("x", args[0].detach().reshape(-1, 64)))
    layer.register_full_backward_hook(lambda m, gin, gout: seen.__setitem__("gy", gout[0].detach().reshape(-1, 32)))
    train(model, _loader(token_dirs), CFG, tmp_path, total_steps=1, log=lambda m: None)

    s = scaling(cfg)
    assert s == 3.0
    a, b = before["model.layers.1.mlp.down_proj.lora_A.weight"], before["model.layers.1.mlp.down_proj.lora_B.weight"]
    x, gy = seen["x"].double(), seen["gy"].double()
    grad_b = s * gy.T @ (x @ a.double().T)
    grad_a = s * (gy @ b.double()).T @ x

    def adam_first_step(p, g, lr):
        return p.double() * (1 - lr * CFG.weight_decay) - lr * g / (g.abs() + 1e-8)

    torch.testing.assert_close(layer.lora_A.weight.grad.double(), grad_a, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(layer.lora_B.weight.grad.double(), grad_b, rtol=1e-4, atol=1e-8)
    # A step moves each entry by about lr = 1e-2; 1e-5 leaves room only for fp32 rounding of tiny gradients.
    torch.testing.assert_close(layer.lora_A.weight.double(), adam_first_step(a, grad_a, CFG.lr), rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.weight.double(), adam_first_step(b, grad_b, CFG.lr), rtol=0, atol=1e-5)
    emb = model.model.embed_tokens.weight
    expected = adam_first_step(before["model.embed_tokens.weight"], emb.grad.double(), CFG.lr * 0.1)
    torch.testing.assert_close(emb.double(), expected, rtol=0, atol=1e-6)
    assert not torch.equal(emb, before["model.embed_tokens.weight"])
    trained = {"model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.down_proj.lora_A.weight",
               "model.layers.1.mlp.down_proj.lora_B.weight"}  # lm_head is the tied embedding
    for name, t in model.state_dict().items():
        if name not in trained:
            assert torch.equal(t, before[name]), f"frozen {name} changed"


def _run(token_dirs, workdir, cfg: LoraConfig, *, steps=8, max_steps=None, resume=False):
    model = _lora_llama(cfg)
    torch.manual_seed(0)
    summary = train(model, _loader(token_dirs), CFG.model_copy(update={"lr": 3e-3}), workdir, total_steps=steps,
                    resume=resume, max_steps=max_steps, log=lambda m: None)
    return model, summary


def test_checkpoints_hold_only_what_trains_and_resume_bitwise(token_dirs, tmp_path):
    cfg = LoraConfig(r=4, alpha=8, dropout=0.1)  # dropout: the RNG state must come back too
    straight, _ = _run(token_dirs, tmp_path / "a", cfg)
    newest = latest_checkpoint(tmp_path / "a" / "checkpoints", lambda m: None)
    keys = set(dcp.FileSystemReader(str(newest)).read_metadata().state_dict_metadata)
    trainable = {n for n, p in straight.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 7 * 2  # A and B of 7 linears in each of 2 blocks
    assert {k.removeprefix("model.") for k in keys if k.startswith("model.")} == trainable
    assert not any("embed_tokens" in k or "q_proj.weight" in k for k in keys)

    _run(token_dirs, tmp_path / "b", cfg, max_steps=5)  # stopped after step 5; checkpoints at 3 and 5
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_000005")  # resume from the periodic one at 3
    resumed, summary = _run(token_dirs, tmp_path / "b", cfg, resume=True)
    assert summary["steps"] == 8
    for (name, x), y in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), name


def _logits(model, ids):
    with torch.no_grad():
        return (model.hf_model(ids).logits if hasattr(model, "hf_model") else model(ids)).float()


@pytest.mark.parametrize("backend", ["hone", "transformers"])
def test_merged_final_and_peft_adapter_give_the_adapted_logits(tmp_path, backend):
    """The adapted model's logits = transformers' on the merged final/ (no adapter code) = PEFT's
    PeftModel(base, final-adapter/), with adapters, embeddings and head all trained."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base_dir = write_model_dir(tmp_path / "base", "mistral")  # untied embeddings and head
    model = HFCausalLM.from_pretrained(base_dir, torch.float32) if backend == "transformers" \
        else load_hf(base_dir, torch.float32)[0]
    cfg = LoraConfig(r=4, alpha=8, rslora=True, train_embeddings=True, train_lm_head=True,
                     targets=["q_proj", "v_proj", "down_proj"])
    apply_lora(model, cfg)
    init_lora(model, 0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as if trained: every trainable tensor moved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    ids = torch.randint(5, 200, (2, 12), generator=g)
    adapted = _logits(model, ids)
    save_adapter(model, cfg, tmp_path / "final-adapter", base_path=str(base_dir))
    save_hf(merge_lora(model), None, tmp_path / "final")
    assert not lora_modules(model)

    auto = transformers.AutoModelForCausalLM
    merged = auto.from_pretrained(tmp_path / "final", dtype=torch.float32)
    torch.testing.assert_close(merged(ids).logits, adapted, rtol=0, atol=1e-5)
    base = auto.from_pretrained(base_dir, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "final-adapter"))
    torch.testing.assert_close(with_adapter(ids).logits, adapted, rtol=0, atol=1e-5)


def test_a_target_matching_no_layer_is_one_line_naming_the_field():
    with pytest.raises(HoneError, match=r"train\.lora\.targets: 'qkv_proj' matches no linear layer") as e:
        apply_lora(tiny_llama(), LoraConfig(targets=["q_proj", "qkv_proj"]))
    assert "\n" not in str(e.value) and "q_proj" in str(e.value)


@pytest.mark.parametrize("field", ["tp", "pp"])
def test_lora_with_tensor_or_pipeline_parallel_is_one_line_naming_the_field(tmp_path, field):
    text = tiny_recipe_text(tmp_path / "run", steps=4, **{field: 2})
    (tmp_path / "r.toml").write_text(text.replace("\n[eval]", "\n[train.lora]\nr = 8\n\n[eval]", 1))
    with pytest.raises(HoneError, match=rf"r.toml: train: .*train\.{field} = 2 is not supported with \[train.lora\]") \
            as e:
        load_recipe(tmp_path / "r.toml")
    assert "\n" not in str(e.value)
