"""worker.text.label_agreement: when a caption names its region's label."""

from __future__ import annotations

import pytest

from worker.text.label_agreement import first_agreeing, mentions_label, words


def test_words_are_lower_case_and_keep_inner_hyphens():
    assert words("A T-shirt, the dog's Bowl!") == ["a", "t-shirt", "the", "dog's", "bowl"]


@pytest.mark.parametrize("caption, label, agrees", [
    ("a blue cross", "blue cross", True),
    ("a small Blue Cross on the left", "blue cross", True),
    ("a cross that is blue", "blue cross", True),  # every word, in any order
    ("a blue triangle", "blue cross", False),
    ("a red cross", "blue cross", False),
    ("a crossing", "cross", False),  # whole words only
    ("two crosses", "cross", True),  # plurals
    ("three dogs", "dog", True),
    ("ponies in a field", "pony", True),
    ("anything at all", "", True),  # no label, no constraint
])
def test_mentions_label(caption, label, agrees):
    assert mentions_label(caption, label) is agrees


def test_first_agreeing_keeps_the_order_of_the_candidates():
    candidates = ["a blue triangle", "a blue cross", "a small blue cross"]
    assert first_agreeing(candidates, "blue cross") == "a blue cross"
    assert first_agreeing(candidates, "red star") is None
    assert first_agreeing(candidates, "") == "a blue triangle"
