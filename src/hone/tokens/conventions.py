"""How a model's tokenizer marks documents: the separator (end of text), BOS and padding.

Each model family spells them differently (SmolLM2 and Qwen ``<|endoftext|>``, Llama 3
``<|end_of_text|>`` and ``<|begin_of_text|>``, Mistral and Llama 2 ``</s>`` and ``<s>``, Gemma
``<eos>`` and ``<bos>``), so they come from the model's own tokenizer files, never from a
hard-coded name; a recipe may override each one (``model.eos_token`` ...).

The document separator is the *end-of-text* token, not the chat end-of-turn token: an instruct
model's ``tokenizer_config.json`` names ``<|im_end|>`` or ``<|eot_id|>`` as its ``eos_token``,
but documents in pretraining were separated by the end-of-text token, so a known end-of-text
name in the vocabulary wins over the config's ``eos_token``.

    conv = TokenConventions.detect(tokenizer, tokenizer_config)   # from the model directory
    ids = conv.document(tokenizer.encode(text, add_special_tokens=False).ids)   # [BOS] doc EOS
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tokenizers import Tokenizer

from hone.errors import HoneError

# End-of-text tokens of the open model families, most specific first.
END_OF_TEXT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|end|>", "<｜end▁of▁sentence｜>")
BEGIN_OF_TEXT_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<｜begin▁of▁sentence｜>")


@dataclass(frozen=True)
class TokenConventions:
    """Token ids that frame documents for one tokenizer.

    ``eos`` separates documents in the training streams and is the context before each
    evaluated document; ``bos`` is put in front of every document when ``add_bos``;
    ``pad`` fills batches (never scored).
    """

    eos_id: int
    eos_token: str
    bos_id: int | None = None
    bos_token: str | None = None
    add_bos: bool = False
    pad_id: int | None = None
    pad_token: str | None = None

    def document(self, ids: list[int]) -> list[int]:
        """A document's ids as the training stream holds them: ``[BOS] ids EOS``."""
        return ([self.bos_id] if self.add_bos else []) + list(ids) + [self.eos_id]

    def context(self) -> list[int]:
        """What precedes a document when it is scored: the separator that ends the one before
        it, then BOS when the model starts documents with it."""
        return [self.eos_id] + ([self.bos_id] if self.add_bos else [])

    @property
    def pad(self) -> int:
        return self.pad_id if self.pad_id is not None else self.eos_id

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TokenConventions:
        return cls(**{k: d.get(k) for k in ("eos_id", "eos_token", "bos_id", "bos_token", "pad_id", "pad_token")},
                   add_bos=bool(d.get("add_bos")))

    @classmethod
    def detect(cls, tokenizer: Tokenizer, tokenizer_config: dict | None = None, model_config: dict | None = None, *,
               eos_token: str | None = None, bos_token: str | None = None, pad_token: str | None = None,
               add_bos: bool | None = None, field_prefix: str = "model.") -> TokenConventions:
        """The conventions of ``tokenizer``, read from its ``tokenizer_config.json`` and the model's
        ``config.json`` when given; the keyword arguments override (the recipe's fields, named
        ``field_prefix + name`` in errors)."""
        tc, mc = tokenizer_config or {}, model_config or {}

        def named(field: str, text: str) -> int:
            tid = tokenizer.token_to_id(text)
            if tid is None:
                raise HoneError(f"{field_prefix}{field}: {text!r} is not a token of the model's tokenizer")
            return tid

        if eos_token is not None:
            eos = named("eos_token", eos_token)
        else:
            eos = _first_present(tokenizer, END_OF_TEXT_NAMES)
            if eos is None:
                eos = _config_token(tokenizer, tc.get("eos_token"), mc.get("eos_token_id"))
            if eos is None:
                raise HoneError(f"the tokenizer has no end-of-text token to separate documents: set "
                                f"{field_prefix}eos_token to the token that ends a document")
        if bos_token is not None:
            bos = named("bos_token", bos_token)
        else:
            bos = _config_token(tokenizer, tc.get("bos_token"), mc.get("bos_token_id"))
            if bos is None:
                bos = _first_present(tokenizer, BEGIN_OF_TEXT_NAMES)
        if add_bos is None:
            add_bos = _adds_bos(tokenizer, tc, bos)
        if add_bos and bos is None:
            raise HoneError(f"{field_prefix}add_bos is true but the tokenizer has no BOS token: set "
                            f"{field_prefix}bos_token")
        if pad_token is not None:
            pad = named("pad_token", pad_token)
        else:
            pad = _config_token(tokenizer, tc.get("pad_token"), mc.get("pad_token_id"))
        text = tokenizer.id_to_token
        return cls(eos_id=eos, eos_token=text(eos), bos_id=bos, bos_token=text(bos) if bos is not None else None,
                   add_bos=bool(add_bos), pad_id=pad if pad is not None else eos,
                   pad_token=text(pad if pad is not None else eos))


def _first_present(tokenizer: Tokenizer, names: tuple[str, ...]) -> int | None:
    return next((tid for name in names if (tid := tokenizer.token_to_id(name)) is not None), None)


def _config_token(tokenizer: Tokenizer, token: Any, token_id: Any) -> int | None:
    """A token named in tokenizer_config.json (a string or an AddedToken dict), else the id in
    config.json (an int or the first of a list)."""
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and (tid := tokenizer.token_to_id(token)) is not None:
        return tid
    if isinstance(token_id, list):
        token_id = token_id[0] if token_id else None
    if isinstance(token_id, int) and not isinstance(token_id, bool) and 0 <= token_id < tokenizer.get_vocab_size():
        return token_id
    return None


def _adds_bos(tokenizer: Tokenizer, tokenizer_config: dict, bos: int | None) -> bool:
    """Whether the model starts documents with BOS: ``add_bos_token`` of tokenizer_config.json
    (Llama 2, Mistral, Gemma), else whether the tokenizer's own post-processor puts it in
    front (Llama 3's ``tokenizer.json`` does)."""
    if bos is None:
        return False
    flag = tokenizer_config.get("add_bos_token")
    if isinstance(flag, bool):
        return flag
    ids = tokenizer.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos
