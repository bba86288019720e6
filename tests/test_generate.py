"""Generation: the KV cache against full recomputation and against transformers' generate,
sampling, stop ids, chat templates against transformers' apply_chat_template, `hone generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from hone.errors import HoneError
from hone.model.generate import (
    complete,
    generate,
    load_for_generation,
    prompt_ids,
    render_chat,
    stop_ids,
    tokenizer_config,
)
from hone.model.hf import save_hf
from hone.model.llama import KVCache, Llama, LlamaConfig
from hone.tokens.conventions import TokenConventions
from tiny_runs import hone_process

transformers = pytest.importorskip("transformers")

VOCAB = 128
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": LlamaConfig(**SHAPE),
    "mistral-window": LlamaConfig(**SHAPE, model_type="mistral", sliding_window=4),
    "qwen3": LlamaConfig(**SHAPE, model_type="qwen3", head_dim=16),
}
PROMPT = [5, 17, 33, 9, 60, 2, 41]
QWEN_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")
TEXTS = ["The mitochondrion is the powerhouse of the cell.", "Proteins fold into shapes that set their function.",
         "A gene is transcribed into messenger RNA."] * 5


def _model(name: str, seed: int = 0) -> Llama:
    # std 0.3: confident predictions, so greedy choices are no near-ties between two computations
    return Llama(FAMILIES[name]).init_weights(std=0.3, seed=seed).eval()


def _greedy_by_recomputation(model: Llama, ids: list[int], n: int) -> list[int]:
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_kv_cache_generation_equals_full_recomputation(name: str) -> None:
    model = _model(name)
    got = generate(model, None, PROMPT, max_new_tokens=20)
    assert got == _greedy_by_recomputation(model, PROMPT, 20)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cached_chunks_give_the_full_forward_logits(name: str) -> None:
    """A prompt fed in chunks (several tokens after cached ones: the masked path) and then one by one."""
    model = _model(name)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.config.num_hidden_layers)
    with torch.no_grad():
        full = model(ids)
        parts = [model(ids[:, a:b], cache=cache) for a, b in [(0, 6), (6, 11), (11, 12), (12, 19)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.offset == 19
    if name == "mistral-window":  # only the positions a later token can see are kept
        assert cache.keys[0].shape[2] == 3


class _HFWrapper(torch.nn.Module):
    """What the transformers backend hands over: a module carrying ``hf_model``."""

    def __init__(self, hf_model) -> None:
        super().__init__()
        self.hf_model = hf_model


@pytest.mark.parametrize("name,hf_config", [
    ("dynamic-rope-past-max", transformers.LlamaConfig(**{**SHAPE, "max_position_embeddings": 10},
                                                       rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    ("mistral-window", transformers.MistralConfig(**SHAPE, sliding_window=4)),
])
def test_generate_matches_transformers_generate(name: str, hf_config) -> None:
    torch.manual_seed(0)
    hf_config.initializer_range = 0.3
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    ours = Llama.from_state_dict(LlamaConfig.from_hf_dict(hf.config.to_dict()),
                                 {k: v.clone() for k, v in hf.state_dict().items()})
    theirs = generate(_HFWrapper(hf), None, PROMPT, max_new_tokens=16)
    assert len(theirs) == 16
    assert generate(ours, None, PROMPT, max_new_tokens=16) == theirs


def test_sampling_is_seeded_and_a_tiny_nucleus_is_greedy() -> None:
    model = _model("llama")
    greedy = generate(model, None, PROMPT, max_new_tokens=12)
    assert generate(model, None, PROMPT, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=5) == greedy
    a = generate(model, None, PROMPT, max_new_tokens=12, temperature=2.0, seed=1)
    assert a == generate(model, None, PROMPT, max_new_tokens=12, temperature=2.0, seed=1)
    assert any(generate(model, None, PROMPT, max_new_tokens=12, temperature=2.0, seed=s) != a for s in (2, 3, 4))


def test_a_stop_id_ends_generation_and_is_left_out() -> None:
    model = _model("qwen3")
    greedy = generate(model, None, PROMPT, max_new_tokens=12)
    stop = greedy[5]
    first = greedy.index(stop)
    assert generate(model, None, PROMPT, max_new_tokens=12, stop_ids=[stop]) == greedy[:first]
    with pytest.raises(HoneError, match="top_p"):
        generate(model, None, PROMPT, max_new_tokens=3, top_p=0.0)
    with pytest.raises(HoneError, match="no tokens"):
        generate(model, None, [], max_new_tokens=3)


def _tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    return tok


TEMPLATES = {
    "qwen": QWEN_TEMPLATE,
    "llama3-bos": ("{{- bos_token }}{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + "
                   "message['content'] | trim + '<|im_end|>' }}{%- endfor %}{%- if add_generation_prompt %}"
                   "{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
    "namespace-loop-tojson": ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}"
                              "{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{{ ns.n }}:{{ m | tojson }}\n"
                              "{{ m.thinking }}{{ m.reasoning_content }}{% endfor %}"
                              "{% generation %}{{ eos_token }}{% endgeneration %}"
                              "{{ dict(a=1) | tojson }}{% if add_generation_prompt %}>{% endif %}"),
}
MESSAGES = [{"role": "system", "content": "Be brief <é>."}, {"role": "user", "content": " Hi there "},
            {"role": "assistant", "content": "Hello.", "tool_calls": None, "reasoning": "greet"},
            {"role": "user", "content": "And?"}]


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_matches_apply_chat_template(name: str, add_generation_prompt: bool) -> None:
    config = {"chat_template": TEMPLATES[name], "bos_token": {"content": "<|im_start|>", "special": True},
              "eos_token": "<|im_end|>"}
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_tokenizer(), bos_token="<|im_start|>",
                                                  eos_token="<|im_end|>")
    want = hf_tok.apply_chat_template(MESSAGES, chat_template=TEMPLATES[name], tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
    assert render_chat(config, MESSAGES, add_generation_prompt) == want


def test_render_chat_errors_are_one_line() -> None:
    with pytest.raises(HoneError, match="roles must alternate"):
        render_chat({"chat_template": "{{ raise_exception('roles must alternate') }}"}, MESSAGES)
    with pytest.raises(HoneError, match="no chat template"):
        render_chat({}, MESSAGES)
    with pytest.raises(HoneError, match="chat template"):
        render_chat({"chat_template": "{% for %}"}, MESSAGES)
    with pytest.raises(HoneError, match="chat template"):  # the sandbox
        render_chat({"chat_template": "{{ messages.__class__.__mro__ }}{% set ns = namespace(_x=1) %}"}, MESSAGES)


def _saved_model(tmp_path: Path, chat_template: str | None) -> tuple[Path, Llama, Tokenizer]:
    tok = _tokenizer()
    cfg = LlamaConfig(**{**SHAPE, "vocab_size": tok.get_vocab_size(), "bos_token_id": None,
                         "eos_token_id": tok.token_to_id("<|im_end|>")})
    model = Llama(cfg).init_weights(std=0.3, seed=0).eval()
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": None}
    if chat_template:
        tc["chat_template"] = chat_template
    files = {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(tc).encode(),
             "generation_config.json": json.dumps({"eos_token_id": [tok.token_to_id("<|im_end|>")]}).encode()}
    return save_hf(model, tok, tmp_path / "model", tokenizer_files=files), model, tok


def test_complete_is_greedy_and_stops_at_the_model_eos(tmp_path: Path) -> None:
    path, model, tok = _saved_model(tmp_path, None)
    loaded, ltok, files = load_for_generation(path)
    conv = TokenConventions.detect(ltok, tokenizer_config(files))
    stops = stop_ids(loaded, conv, files)
    assert stops == (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>"))
    outs = complete(loaded, ltok, conv, ["The gene", ""], max_new_tokens=8)
    assert outs == complete(model, tok, conv, ["The gene", ""], max_new_tokens=8)
    ids = generate(model, tok, prompt_ids(tok, conv, "The gene"), max_new_tokens=8, stop_ids=stops)
    assert outs[0] == tok.decode(ids, skip_special_tokens=True)


def test_hone_generate_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hone.cli import app

    path, model, tok = _saved_model(tmp_path, QWEN_TEMPLATE)
    conv = TokenConventions.detect(tok, {"eos_token": "<|im_end|>"})
    stops = (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>"))
    result = CliRunner().invoke(app, ["generate", str(path), "--prompt", "The gene", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    plain = generate(model, tok, prompt_ids(tok, conv, "The gene"), max_new_tokens=6, stop_ids=stops)
    assert result.output == tok.decode(plain, skip_special_tokens=True) + "\n"

    result = CliRunner().invoke(app, ["generate", str(path), "--prompt", "Hi", "--chat", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    chat_ids = tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids
    want = generate(model, tok, chat_ids, max_new_tokens=6, stop_ids=stops)
    assert result.output == tok.decode(want, skip_special_tokens=True) + "\n"


def test_hone_generate_errors_are_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hone.cli import app

    r = hone_process("generate", tmp_path / "nope", "--prompt", "x", check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: not a model (want an HF directory, a .gguf "
                                             "file, or smollm2)"]
    path, _, _ = _saved_model(tmp_path, None)
    result = CliRunner().invoke(app, ["generate", str(path), "--prompt", "x", "--chat"])
    assert isinstance(result.exception, HoneError) and "no chat template" in str(result.exception)


def _write_gguf(path: Path, model: Llama, tok: Tokenizer, chat_template: str) -> Path:
    """A llama.cpp-style GGUF of ``model`` (fp32, Q/K rows in llama.cpp's rotary order) and ``tok``."""
    import gguf
    import numpy as np

    cfg, w = model.config, gguf.GGUFWriter(path, "llama")
    for add, value in [(w.add_block_count, cfg.num_hidden_layers), (w.add_context_length, cfg.max_position_embeddings),
                       (w.add_embedding_length, cfg.hidden_size), (w.add_feed_forward_length, cfg.intermediate_size),
                       (w.add_head_count, cfg.num_attention_heads), (w.add_head_count_kv, cfg.num_key_value_heads),
                       (w.add_layer_norm_rms_eps, cfg.rms_norm_eps), (w.add_rope_freq_base, cfg.rope_theta)]:
        add(value)
    n = tok.get_vocab_size()
    w.add_tokenizer_model("gpt2")
    w.add_token_list([tok.id_to_token(i) for i in range(n)])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]])
    w.add_token_types([3 if tok.id_to_token(i).startswith("<|") else 1 for i in range(n)])
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_chat_template(chat_template)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in model.state_dict().items():
        a = t.numpy()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(names[module])
            if heads:  # HF's rotate_half halves -> llama.cpp's interleaved pairs
                a = a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
            w.add_tensor(f"blk.{i}.{names[module]}.{kind}", np.ascontiguousarray(a))
        else:
            w.add_tensor({"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                          "lm_head.weight": "output.weight"}[name], a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_hone_generate_reads_a_gguf_and_its_chat_template(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hone.cli import app

    _, model, tok = _saved_model(tmp_path, None)
    path = _write_gguf(tmp_path / "tiny.gguf", model, tok, QWEN_TEMPLATE)
    loaded, ltok, files = load_for_generation(path)
    assert loaded.config == model.config
    assert tokenizer_config(files)["chat_template"] == QWEN_TEMPLATE
    chat_ids = ltok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids
    stops = (ltok.token_to_id("<|endoftext|>"), ltok.token_to_id("<|im_end|>"))
    want = generate(model, tok, chat_ids, max_new_tokens=6, stop_ids=stops)
    assert generate(loaded, ltok, chat_ids, max_new_tokens=6, stop_ids=stops) == want
    result = CliRunner().invoke(app, ["generate", str(path), "--prompt", "Hi", "--chat", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert result.output == ltok.decode(want, skip_special_tokens=True) + "\n"
