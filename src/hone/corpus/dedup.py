"""Exact deduplication on a hash of the normalized text.

Normalizing (lowercase, punctuation removed, whitespace collapsed) catches copies that
differ only in case, spacing or punctuation. The first occurrence is kept; later ones are
dropped with reason ``exact_duplicate`` and the id of the document that survived.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_PUNCT = re.compile(r"[^\w\s]|_")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _PUNCT.sub("", text)).strip()


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


class ExactDedup:
    """Call it on each document in order: None (first seen) or (reason, detail) for a copy.

    Documents whose id was already kept are dropped too (``duplicate_id``): the corpus
    ``id`` column must stay unique.
    """

    def __init__(self, by_text: bool = True) -> None:
        self.by_text = by_text  # False: only keep ids unique (curate.exact_dedup = false)
        self.seen: dict[bytes, str] = {}
        self.ids: set[str] = set()

    def __call__(self, doc: dict) -> tuple[str, dict] | None:
        if doc["id"] in self.ids:
            return "duplicate_id", {}
        if self.by_text:
            h = text_hash(doc["text"])
            if (first := self.seen.get(h)) is not None:
                return "exact_duplicate", {"duplicate_of": first}
            self.seen[h] = doc["id"]
        self.ids.add(doc["id"])
        return None
