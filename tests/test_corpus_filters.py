"""Heuristic filters give machine-readable reasons; exact dedup keeps the first copy."""

import pytest

from hone.corpus.filters import check
from hone.corpus.steps.exact_dedup import ExactDedup, normalize
from hone.recipe import FilterConfig

CFG = FilterConfig()
GOOD = "The cell membrane separates the interior of all cells from the outside environment."


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("too short here", "too_few_words"),
    (" ".join(["word"] * 200), None),
    ("a b c d e f g h i j", "short_words"),
    ("pneumonoultramicroscopicsilicovolcanoconiosis " * 6, "long_words"),
    ("#tag #more #tags #here #and #again words words", "symbols"),
    ("123 456 789 1011 1213 1415 alpha", "not_alpha"),
    ("\n".join(["the same line again"] * 5 + ["but one other line"]), "dup_lines"),
    (GOOD, None),
])
def test_each_filter_reason(text, reason):
    assert check(text, CFG) == reason


def test_too_many_words():
    assert check(" ".join(["word"] * 20), FilterConfig(max_words=10)) == "too_many_words"


def test_code_and_licenses_pass_defaults():
    code = '''def add(a, b):
    """Return the sum of a and b."""
    # add the two numbers
    return a + b


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y
'''
    license_text = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this "
                    "software and associated documentation files (the \"Software\"), to deal in the Software "
                    "without restriction, including without limitation the rights to use, copy, modify.")
    assert check(code, CFG) is None
    assert check(license_text, CFG) is None


def test_exact_dedup_keeps_first_and_names_survivor():
    dedup = ExactDedup()
    docs = [{"id": "a", "text": "Hello, World!"}, {"id": "b", "text": "hello   world"},
            {"id": "c", "text": "something else"}, {"id": "a", "text": "different text, same id"}]
    verdicts = [dedup(d) for d in docs]
    assert verdicts == [None, ("exact_duplicate", {"duplicate_of": "a"}), None, ("duplicate_id", {})]
    assert normalize("  Hello,\n World! ") == "hello world"


def test_dedup_off_still_keeps_ids_unique():
    dedup = ExactDedup(by_text=False)
    assert dedup({"id": "a", "text": "x"}) is None
    assert dedup({"id": "b", "text": "x"}) is None
    assert dedup({"id": "a", "text": "y"}) == ("duplicate_id", {})


def test_count_alpha_words_equals_the_python_definition():
    import random

    from hone.corpus.filters import count_alpha_words

    rng = random.Random(0)
    alphabet = "ab1 \t\n\x1c\x1f\u00a0\u2003\u2028é½²٣_,.#Ωж中"
    texts = ["", " ", "a", "1", "1 a", "a\u2003b 2"] + ["".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))
                                                        for _ in range(2000)]
    texts += ["".join(rng.choice("ab1 \t\n\x1c_,.#") for _ in range(80)) for _ in range(500)]  # ASCII path
    for t in texts:
        assert count_alpha_words(t) == sum(any(c.isalpha() for c in w) for w in t.split()), repr(t)
