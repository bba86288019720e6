"""Text generation: greedy or nucleus sampling with Hone's Llama and its KV cache (a module
carrying a transformers model as ``hf_model`` uses that model's own ``generate``), chat
templates rendered as transformers renders them, and the short greedy completions a run's
report shows before and after training.

    model, tok, files = load_for_generation("smollm2")
    ids, stops = encode_prompt(model, tok, files, "Hi", chat=True)   # through the chat template
    print(tok.decode(generate(model, tok, ids, max_new_tokens=20, stop_ids=stops), skip_special_tokens=True))
    outs = complete(model, tok, conv, ["The mitochondrion is"])      # before / after training
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from torch import nn

from hone.errors import HoneError
from hone.model.gguf import load_gguf, smollm2_gguf_path
from hone.model.hf import load_hf
from hone.model.llama import KVCache, Llama
from hone.model.tokenizer_files import conventions_of, gguf_tokenizer_files, hf_tokenizer_files
from hone.tokens.conventions import TokenConventions

__all__ = ["complete", "encode_prompt", "generate", "load_for_generation", "prompt_ids", "render_chat", "stop_ids",
           "tokenizer_config"]


# --------------------------------------------------------------------------- generation


def generate(model: nn.Module, tokenizer: Tokenizer, prompt_ids: list[int], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop_ids: Iterable[int] = ()) -> list[int]:
    """The token ids that follow ``prompt_ids``: greedy at ``temperature`` 0, else sampled from
    the ``top_p`` nucleus with a generator seeded by ``seed``. A stop id ends generation and is
    not returned.

    Hone's :class:`Llama` runs with its KV cache; any other module must carry a transformers
    ``PreTrainedModel`` as ``hf_model``, whose own ``generate`` (and cache) is used. Ids in, ids
    out: ``tokenizer`` is not read (decode the result with it).
    """
    ids, stops = [int(i) for i in prompt_ids], tuple(dict.fromkeys(int(i) for i in stop_ids))
    _check_settings(ids, max_new_tokens, temperature, top_p)
    if isinstance(model, Llama):
        return _generate_llama(model, ids, max_new_tokens, _picker(temperature, top_p, seed), stops)
    hf_model = getattr(model, "hf_model", None)
    if hf_model is None:
        raise HoneError(f"cannot generate with a {type(model).__name__}: neither Hone's Llama nor a module with an "
                        "hf_model")
    return _generate_hf(hf_model, ids, max_new_tokens, temperature, top_p, seed, stops)


def _check_settings(ids: list[int], max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not ids:
        raise HoneError("the prompt has no tokens: generation needs at least one")
    if max_new_tokens < 0:
        raise HoneError(f"max_new_tokens {max_new_tokens} must be at least 0")
    if temperature < 0:
        raise HoneError(f"temperature {temperature} must be at least 0 (0: greedy)")
    if not 0 < top_p <= 1:
        raise HoneError(f"top_p {top_p} must be in (0, 1]")


def _picker(temperature: float, top_p: float, seed: int):
    """The next-token rule: argmax, or a draw from the tempered top-p distribution."""
    if temperature == 0:
        return lambda logits: int(logits.argmax())
    gen = torch.Generator().manual_seed(seed)

    def sample(logits: torch.Tensor) -> int:
        scores = logits.float().cpu() / temperature
        if top_p < 1:  # as transformers' TopPLogitsWarper: drop the tail whose mass is at most 1 - top_p
            sorted_scores, order = torch.sort(scores)
            drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
            drop[-1] = False
            scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        return int(torch.multinomial(scores.softmax(-1), 1, generator=gen))

    return sample


@torch.inference_mode()
def _generate_llama(model: Llama, ids: list[int], max_new_tokens: int, pick, stops: tuple[int, ...]) -> list[int]:
    device = model.lm_head.weight.device
    cache = KVCache(model.config.num_hidden_layers)
    x, out = torch.tensor([ids], device=device), []
    for _ in range(max_new_tokens):
        hidden = model.model(x, cache)[:, -1]  # the prompt once, then one new token per step
        token = pick(model.lm_head(hidden)[0])
        if token in stops:
            break
        out.append(token)
        x = torch.tensor([[token]], device=device)
    return out


def _generate_hf(hf_model, ids: list[int], max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 stops: tuple[int, ...]) -> list[int]:
    import transformers

    if max_new_tokens == 0:
        return []
    sampling = temperature > 0
    # A fresh generation config: the model's own may sample or penalize repeats by default.
    config = transformers.GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling,
                                           temperature=temperature if sampling else None,
                                           top_p=top_p if sampling else None, top_k=0 if sampling else None,
                                           eos_token_id=list(stops) or None, pad_token_id=stops[0] if stops else 0)
    device = next(hf_model.parameters()).device
    x = torch.tensor([ids], device=device)
    was_training = hf_model.training
    hf_model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
            torch.manual_seed(seed)
            out = hf_model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
    finally:
        hf_model.train(was_training)
    new = out[0, len(ids):].tolist()
    end = next((i for i, t in enumerate(new) if t in stops), len(new))
    return new[:end]


# --------------------------------------------------------------------------- prompts and stops


def prompt_ids(tokenizer: Tokenizer, conventions: TokenConventions, text: str) -> list[int]:
    """A plain prompt's ids as the model saw documents start: BOS first when the model adds it;
    an empty prompt is the end-of-text separator (what precedes every document)."""
    ids = ([conventions.bos_id] if conventions.add_bos else []) + tokenizer.encode(text, add_special_tokens=False).ids
    return ids or [conventions.eos_id]


def stop_ids(model: nn.Module, conventions: TokenConventions, files: dict[str, bytes] | None = None) -> tuple[int, ...]:
    """End-of-text, then every eos id of the model's config and generation config (an instruct
    model ends its turn with its own: ``<|im_end|>``, ``<|eot_id|>``)."""
    ids = [conventions.eos_id]
    config = getattr(getattr(model, "hf_model", model), "config", None)
    ids += _id_list(getattr(config, "eos_token_id", None))
    generation = getattr(getattr(model, "hf_model", None), "generation_config", None)
    ids += _id_list(getattr(generation, "eos_token_id", None))
    if files and "generation_config.json" in files:
        ids += _id_list(_json(files, "generation_config.json").get("eos_token_id"))
    return tuple(dict.fromkeys(ids))


def _id_list(value: Any) -> list[int]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def encode_prompt(model: nn.Module, tokenizer: Tokenizer, files: dict[str, bytes], text: str, *,
                  chat: bool = False) -> tuple[list[int], tuple[int, ...]]:
    """(prompt ids, stop ids) for ``text`` and a model loaded with its tokenizer files: a plain
    prompt as :func:`prompt_ids` frames it, or with ``chat`` one user message through the chat
    template (which writes its own special tokens)."""
    config = getattr(getattr(model, "hf_model", model), "config", None)
    ids_config = {key: getattr(config, key, None) for key in ("bos_token_id", "eos_token_id")}
    conventions = conventions_of(tokenizer, files, model_config=ids_config)
    if chat:
        rendered = render_chat(tokenizer_config(files), [{"role": "user", "content": text}])
        ids = tokenizer.encode(rendered, add_special_tokens=False).ids
    else:
        ids = prompt_ids(tokenizer, conventions, text)
    return ids, stop_ids(model, conventions, files)


def complete(model: nn.Module, tokenizer: Tokenizer, conventions: TokenConventions, prompts: list[str],
             max_new_tokens: int = 40) -> list[str]:
    """Greedy completions of plain-text ``prompts`` (deterministic), special tokens left out."""
    stops = stop_ids(model, conventions)
    return [tokenizer.decode(generate(model, tokenizer, prompt_ids(tokenizer, conventions, p),
                                      max_new_tokens=max_new_tokens, stop_ids=stops), skip_special_tokens=True)
            for p in prompts]


# --------------------------------------------------------------------------- loading


def load_for_generation(source: str | Path) -> tuple[nn.Module, Tokenizer, dict[str, bytes]]:
    """``smollm2`` (the packaged GGUF), a ``.gguf`` file or an HF directory: the model, its
    tokenizer and its tokenizer files (chat template, special tokens, generation config)."""
    if str(source) == "smollm2":
        path = smollm2_gguf_path()
        model, tok = load_gguf(path)
        return model.eval(), tok, gguf_tokenizer_files(path, tok)
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        model, tok = load_gguf(path)
        return model.eval(), tok, gguf_tokenizer_files(path, tok)
    if path.is_dir():
        model, tok = load_hf(path)
        if tok is None:
            raise HoneError(f"{path}: no tokenizer.json beside the weights")
        files = hf_tokenizer_files(path)
        return model.eval(), tok, files
    raise HoneError(f"{source}: not a model (want an HF directory, a .gguf file, or smollm2)")


def tokenizer_config(files: dict[str, bytes]) -> dict[str, Any]:
    """``tokenizer_config.json`` of the files, with the chat template of ``chat_template.jinja`` /
    ``chat_template.json`` when the config has none (newer transformers saves it apart)."""
    config = _json(files, "tokenizer_config.json")
    if not config.get("chat_template"):
        if "chat_template.jinja" in files:
            config["chat_template"] = files["chat_template.jinja"].decode("utf-8")
        elif "chat_template.json" in files:
            config["chat_template"] = _json(files, "chat_template.json").get("chat_template")
    return config


def _json(files: dict[str, bytes], name: str) -> dict[str, Any]:
    try:
        data = json.loads(files[name].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HoneError(f"{name}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- chat templates


def render_chat(tokenizer_config: dict[str, Any], messages: list[dict], add_generation_prompt: bool = True) -> str:
    """``messages`` through the config's ``chat_template`` as transformers' ``apply_chat_template``
    renders it (sandboxed jinja2, ``bos_token`` / ``eos_token`` ..., ``raise_exception``); the
    text is to be encoded without adding special tokens (the template writes them)."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not template:
        raise HoneError("the tokenizer has no chat template (tokenizer_config.json chat_template)")
    special = {key: text for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                                     "mask_token") if (text := _token_text(tokenizer_config.get(key)))}
    chat = [_with_reasoning_aliases({k: v for k, v in m.items() if v is not None}) for m in messages]
    try:
        return _compiled(template).render(messages=chat, tools=None, documents=None,
                                          add_generation_prompt=add_generation_prompt, **special)
    except jinja2.TemplateError as e:
        raise HoneError(f"chat template: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _with_reasoning_aliases(message: dict) -> dict:
    """A message's reasoning under every name templates read, as transformers passes it."""
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _token_text(token: Any) -> str | None:
    if isinstance(token, dict):  # an AddedToken as JSON
        token = token.get("content")
    return token if isinstance(token, str) else None


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; the text renders as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


class _TemplateDict:
    """``dict(...)`` for templates without access to the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore names (no reach into Python internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore names ({name!r})")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters, which chat templates do not want.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_TemplateDict(), namespace=_Namespace)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise HoneError(f"chat template: {e.message} (line {e.lineno})") from None
