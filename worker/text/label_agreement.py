"""Does a caption agree with its region's label? A caption agrees when it names the label: every word of the label
appears in it as a whole word (case-insensitive; a plural "-s", "-es" or "-ies" form counts), e.g. label
``"blue cross"`` and caption ``"a small blue cross"``. An empty label (a region scored without labels) puts no
constraint on the caption.

The ClipCap captioner keeps the best-scoring beam hypothesis that agrees with the region's label and otherwise falls
back to a retrieval caption built on the label (``worker.text.clipcap.ClipCapCaptioner``), so an annotator never sees
a caption that names another class than the suggested label.
"""

from __future__ import annotations

import re
from typing import Sequence

_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")


def words(text: str) -> list[str]:
    """The lower-cased words of ``text`` (letters and digits; inner hyphens and apostrophes kept)."""
    return _WORD.findall(text.lower())


def _forms(word: str) -> set[str]:
    """``word`` and its regular plural forms."""
    forms = {word, word + "s", word + "es"}
    if word.endswith("y") and len(word) > 1:
        forms.add(word[:-1] + "ies")
    return forms


def mentions_label(caption: str, label: str) -> bool:
    """True when every word of ``label`` (or its plural) is a word of ``caption``; always true for an empty label."""
    said = set(words(caption))
    return all(_forms(w) & said for w in words(label))


def first_agreeing(candidates: Sequence[str], label: str) -> str | None:
    """The first of ``candidates`` (best first) that mentions ``label``, or None when none does."""
    return next((c for c in candidates if mentions_label(c, label)), None)
