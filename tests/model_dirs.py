"""Tiny Hugging Face model directories shaped like the real open models' (tests build them).

Each family's tokenizer files carry that family's real special tokens, ids order, BOS
handling and ``tokenizer_config.json`` fields (taken from the published Llama-3.2-1B(-Instruct),
Mistral-7B-v0.3, gemma-2-2b and Qwen2.5-0.5B-Instruct files); only the vocabulary is a small
BPE trained here, and the weights are random.

    path = write_model_dir(tmp_path / "llama", "llama3")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from hone.model.hf import save_hf
from hone.model.llama import Llama, LlamaConfig

TEXTS = [
    "The kernel schedules tasks on every CPU and balances the run queues.",
    "A protein complex binds DNA and regulates the transcription of genes.",
    "Memory management maps pages of virtual memory onto physical frames.",
    "Catalysis of the reaction: ATP + a protein = ADP + a phosphoprotein.",
] * 8

LLAMA3_TEMPLATE = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
                   "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                   "{%- endif %}")
MISTRAL_TEMPLATE = ("{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
                    "{{- '[INST] ' + message['content'] + '[/INST]' }}{%- else %}{{- message['content'] + eos_token }}"
                    "{%- endif %}{%- endfor %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\\n' + "
                  "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                  "{{'<start_of_turn>model\\n'}}{% endif %}")
QWEN_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")


def _byte_level_bpe(specials_first: list[str], specials_last: list[str], vocab: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials_first,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer=trainer)
    if specials_last:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials_last])
    return tok


def _sentencepiece_bpe(specials: list[str], vocab: int = 400) -> Tokenizer:
    """A Llama-2 / Mistral / Gemma style tokenizer.json: Metaspace-like normalizer, byte fallback."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=specials[[s.strip("<>") for s in specials].index("unk")]))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return tok


def family_tokenizer(family: str) -> tuple[Tokenizer, dict, dict]:
    """(tokenizer, tokenizer_config.json, generation_config.json) of a family."""
    if family in ("llama3", "llama3-instruct"):
        tok = _byte_level_bpe([], ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                                   "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
        bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)])
        instruct = family == "llama3-instruct"
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>" if instruct else "<|end_of_text|>",
                  "clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
                  "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}
        if instruct:
            config["chat_template"] = LLAMA3_TEMPLATE
        eot = tok.token_to_id("<|eot_id|>")
        generation = {"bos_token_id": bos, "eos_token_id": [eos, eot] if instruct else eos}
        return tok, config, generation
    if family == "mistral":
        tok = _sentencepiece_bpe(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
        config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>", "pad_token": None, "legacy": False,
                  "model_max_length": 1000000000000000019884624838656,
                  "tokenizer_class": "LlamaTokenizer", "chat_template": MISTRAL_TEMPLATE}
        return tok, config, {"bos_token_id": 1, "eos_token_id": 2}
    if family == "gemma":
        tok = _sentencepiece_bpe(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"])
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                           special_tokens=[("<bos>", 2)])
        config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
                  "pad_token": "<pad>", "unk_token": "<unk>", "tokenizer_class": "GemmaTokenizer",
                  "chat_template": GEMMA_TEMPLATE}
        return tok, config, {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    if family == "qwen2":
        tok = _byte_level_bpe([], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "errors": "replace",
                  "model_max_length": 131072, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
                  "chat_template": QWEN_TEMPLATE}
        return tok, config, {"bos_token_id": tok.token_to_id("<|endoftext|>"),
                             "eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
                             "pad_token_id": tok.token_to_id("<|endoftext|>")}
    raise ValueError(family)


def write_model_dir(path: Path, family: str, *, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny random Llama-architecture model with the family's tokenizer files, as from_pretrained reads it."""
    tok, tconfig, generation = family_tokenizer(family)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=family != "mistral",
                      bos_token_id=generation.get("bos_token_id"), eos_token_id=generation.get("eos_token_id"))
    torch.manual_seed(seed)
    model = Llama(cfg).init_weights(seed=seed)
    save_hf(model, None, path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tconfig, indent=2))
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    special = {k: v for k, v in tconfig.items() if k.endswith("_token") and v}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return path
