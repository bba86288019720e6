"""Heuristic quality filters (Gopher / C4 rules), driven by ``FilterConfig``.

Each filter looks at one document's text and answers ``None`` (keep) or a
machine-readable reason string. Thresholds are loose enough that source code and
license texts pass: they are part of the replay pool, not noise.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from hone.recipe import FilterConfig

Filter = Callable[[str, list[str], FilterConfig], "str | None"]


def word_count(text: str, words: list[str], cfg: FilterConfig) -> str | None:
    if len(words) < cfg.min_words:
        return "too_few_words"
    if len(words) > cfg.max_words:
        return "too_many_words"
    return None


def mean_word_length(text: str, words: list[str], cfg: FilterConfig) -> str | None:
    mean = sum(map(len, words)) / max(len(words), 1)
    if mean < cfg.min_mean_word_len:
        return "short_words"
    if mean > cfg.max_mean_word_len:
        return "long_words"
    return None


def symbol_ratio(text: str, words: list[str], cfg: FilterConfig) -> str | None:
    # Gopher: hash marks and ellipses per word flag tag lists and truncated boilerplate.
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    return "symbols" if symbols / max(len(words), 1) > cfg.max_symbol_ratio else None


def alpha_ratio(text: str, words: list[str], cfg: FilterConfig) -> str | None:
    alpha = count_alpha_words(text)
    return "not_alpha" if alpha / max(len(words), 1) < cfg.min_alpha_ratio else None


# Words with a letter, counted in C (the per-character Python loop this replaces was 70% of
# the filter step's time): letters become "a", whitespace (where ``str.split`` cuts) " ",
# everything else is deleted. A word with a letter is then one run of "a"; a word without
# one vanishes. Runs start at position 0 or after a space.
_ASCII_CLASS = bytes(32 if chr(i).isspace() else 97 if chr(i).isalpha() else 0 for i in range(128)) + bytes(128)
_ASCII_OTHER = bytes(i for i in range(128) if not chr(i).isspace() and not chr(i).isalpha())


def count_alpha_words(text: str) -> int:
    """``sum(any(c.isalpha() for c in w) for w in text.split())``, without the Python loop."""
    if text.isascii():
        cls = text.encode("ascii").translate(_ASCII_CLASS, _ASCII_OTHER)
        return cls.count(b" a") + cls.startswith(b"a")
    table = {ord(c): " " if c.isspace() else "a" if c.isalpha() else None for c in set(text)}
    cls = text.translate(table)
    return cls.count(" a") + cls.startswith("a")


def duplicate_lines(text: str, words: list[str], cfg: FilterConfig) -> str | None:
    # Fraction of non-blank lines that repeat an earlier line (spam, scraped menus).
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    repeats = sum(n - 1 for n in Counter(lines).values())
    return "dup_lines" if repeats / max(len(lines), 1) > cfg.max_dup_line_frac else None


FILTERS: list[Filter] = [word_count, mean_word_length, symbol_ratio, alpha_ratio, duplicate_lines]


def check(text: str, cfg: FilterConfig) -> str | None:
    """The first failing filter's reason, or None to keep the document."""
    if not text.strip():
        return "empty"
    words = text.split()
    for f in FILTERS:
        if (reason := f(text, words, cfg)) is not None:
            return reason
    return None
