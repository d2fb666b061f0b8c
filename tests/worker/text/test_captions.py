"""worker.text.captions: retrieval captions (phrase banks, choice of the closest phrase, batched preparation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.text.captions import COLOURS, MATERIALS, POSITIONS, SIZES, RetrievalCaptioner, phrase_bank
from worker.text.labels import LabelScorer
from worker.engine.models import load_clip


@pytest.fixture(scope="module")
def scorer():
    return LabelScorer(load_clip("maskinv-test-tiny", "none", "cpu"))


def test_phrase_bank_articles_and_size():
    bank = phrase_bank("apple")
    assert bank[0] == "an apple" and len(bank) == 1 + len(COLOURS + MATERIALS + SIZES) + len(POSITIONS)
    assert "an orange apple" in bank and "a red apple" in bank and "a wooden apple" in bank
    assert "an apple on the left" in bank and phrase_bank("car")[0] == "a car"
    assert len(set(bank)) == len(bank)


def test_caption_is_the_phrase_closest_to_the_embedding(scorer):
    cap = RetrievalCaptioner(scorer)
    bank = phrase_bank("car")
    target = scorer.encode_texts([bank[5], bank[-1]])  # embeddings of two of the bank's own phrases
    assert cap.caption(target * 3.0, ["car", "car"]) == [bank[5], bank[-1]]  # scale does not matter
    # a random embedding gets the arg-max of cosine over the bank
    e = torch.randn(1, scorer.clip.embed_dim, generator=torch.Generator().manual_seed(0))
    best = int((scorer.encode_texts(bank) @ F.normalize(e, dim=-1)[0]).argmax())
    assert cap.caption(e, ["car"]) == [bank[best]]


def test_prepare_encodes_missing_banks_once_in_one_batch(scorer, monkeypatch):
    cap = RetrievalCaptioner(scorer)
    calls = []
    encode = scorer.encode_texts
    monkeypatch.setattr(scorer, "encode_texts", lambda texts: calls.append(len(texts)) or encode(texts))
    n = len(phrase_bank("cat"))
    assert cap.prepare(["cat", "dog", "cat"]) == 2 * n and calls == [2 * n]
    assert cap.prepare(["cat", "dog"]) == 0 and calls == [2 * n]
    e = torch.randn(2, scorer.clip.embed_dim, generator=torch.Generator().manual_seed(1))
    prepared = cap.caption(e, ["cat", "dog"])
    assert calls == [2 * n]  # the banks came from prepare
    assert prepared == RetrievalCaptioner(scorer).caption(e, ["cat", "dog"])
