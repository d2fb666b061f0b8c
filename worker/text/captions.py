"""Weight-free retrieval captions: the best phrase of a bank built from a label and attribute words.

A region's caption is chosen in two stages: its label (the top-1 of the label scorer), then the phrase
among that label's attribute phrases ("a red car", "a small car", "a wooden car", "a car on the left", ...)
whose CLIP text embedding is closest to the region's LET. Every phrase contains the label, and a label that
already names a colour, material or size gets no second word of that kind ("blue cross" gets "a small blue cross",
never "a red blue cross"), so a retrieval caption always agrees with its label. Phrase embeddings are cached per
(model, label).
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
import torch.nn.functional as F

from worker.engine.bounded_cache import BoundedCache
from worker.text.label_agreement import words
from worker.text.labels import LabelScorer

#: bounds of the phrase-bank cache (one entry per (model, label) captioned: ~35 phrases x D floats)
BANK_CACHE_ENTRIES = 1024
BANK_CACHE_BYTES = 64 << 20


def _bank_bytes(key: Hashable, value: tuple[list[str], torch.Tensor]) -> int:
    """Approximate bytes of a ``(model id, label)`` key and its phrases with their embeddings ``[P, D]``."""
    phrases, emb = value
    key_chars = sum(len(str(k)) for k in key) if isinstance(key, tuple) else len(str(key))
    return emb.element_size() * emb.nelement() + sum(len(p) + 50 for p in phrases) + key_chars


COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey")
MATERIALS = ("wooden", "metal", "plastic", "glass", "fabric", "stone")
SIZES = ("small", "large")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")


def with_article(phrase: str) -> str:
    """``phrase`` after "a" or "an" ("a car", "an apple")."""
    return f"{'an' if phrase[:1].lower() in 'aeiou' else 'a'} {phrase}"


def phrase_bank(label: str) -> list[str]:
    """Candidate captions for one label: the label, with one attribute word of each kind the label has not got
    already, or with a position; every phrase contains the label."""
    bank = [with_article(label)]
    said = set(words(label))
    for kind in (COLOURS, MATERIALS, SIZES):
        if said.isdisjoint(kind):
            bank += [f"{with_article(word)} {label}" for word in kind]
    bank += [f"{with_article(label)} {pos}" for pos in POSITIONS]
    return bank


class RetrievalCaptioner:
    """Captions region embeddings by retrieval from per-label phrase banks (mode ``"retrieval"``)."""

    mode = "retrieval"

    def __init__(self, scorer: LabelScorer, max_entries: int = BANK_CACHE_ENTRIES,
                 max_bytes: int = BANK_CACHE_BYTES):
        self.scorer = scorer
        self._banks: BoundedCache[tuple[list[str], torch.Tensor]] = BoundedCache(max_entries, max_bytes, _bank_bytes)

    def phrases(self, label: str) -> list[str]:
        """The candidate captions of ``label`` (:func:`phrase_bank`)."""
        return phrase_bank(label)

    def _bank(self, label: str) -> tuple[list[str], torch.Tensor]:
        key = (self.scorer.clip.id, label)
        hit = self._banks.get(key)
        if hit is None:
            phrases = self.phrases(label)
            hit = (phrases, self.scorer.encode_texts(phrases))
            self._banks.put(key, hit)
        return hit

    def prepare(self, labels: Sequence[str]) -> int:
        """Build and cache the phrase banks of ``labels`` not cached yet, in one batched text encoding; returns how
        many phrases were encoded."""
        todo = [lab for lab in dict.fromkeys(labels) if (self.scorer.clip.id, lab) not in self._banks]
        banks = [self.phrases(lab) for lab in todo]
        if not banks:
            return 0
        emb = self.scorer.encode_texts([p for bank in banks for p in bank])  # [P, D], all banks in a row
        start = 0
        for lab, bank in zip(todo, banks):
            self._banks.put((self.scorer.clip.id, lab), (bank, emb[start:start + len(bank)]))
            start += len(bank)
        return start

    @torch.no_grad()
    def caption(self, embeddings: torch.Tensor, labels: Sequence[str]) -> list[str]:
        """One caption per embedding ``[N, D]``; ``labels[i]`` is region i's predicted label."""
        out = []
        emb = F.normalize(embeddings.float(), dim=-1)
        for e, label in zip(emb, labels):
            phrases, bank = self._bank(label)
            out.append(phrases[int((bank @ e).argmax())])
        return out
