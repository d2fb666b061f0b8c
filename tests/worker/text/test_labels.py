"""worker.text.labels: trimmed (padding-free) text encoding equals open_clip's, and label sets are prepared in one
batch."""

from __future__ import annotations

import pytest
import torch

from worker.text.labels import LabelScorer, _can_trim, encode_text_trimmed
from worker.engine.models import load_clip
from worker.protocol import DEFAULT_TEMPLATES


@pytest.fixture(scope="module")
def scorer():
    return LabelScorer(load_clip("maskinv-test-tiny", "none", "cpu"))


def test_trimmed_encoding_equals_open_clips_full_context(scorer):
    model = scorer.clip.model
    assert _can_trim(model)
    tokens = scorer.clip.tokenizer(["a photo of a cat.", "a dark photo of a traffic light in the rain.", ""])
    with torch.no_grad():
        full = model.encode_text(tokens)
        trimmed = encode_text_trimmed(model, tokens)
    assert trimmed.shape == full.shape
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)


def test_untrimmable_text_towers_use_encode_text(scorer):
    """Trimming is exact only for a causal tower pooled at the end-of-text token; anything else is left alone."""
    from types import SimpleNamespace

    model = scorer.clip.model
    parts = {name: getattr(model, name) for name in ("token_embedding", "positional_embedding", "transformer",
                                                      "ln_final", "text_projection")}
    assert _can_trim(SimpleNamespace(**parts, attn_mask=model.attn_mask, text_pool_type="argmax"))
    assert not _can_trim(SimpleNamespace(**parts, attn_mask=model.attn_mask, text_pool_type="last"))
    assert not _can_trim(SimpleNamespace(**parts, attn_mask=None, text_pool_type="argmax"))  # bidirectional
    assert not _can_trim(SimpleNamespace(**parts, attn_mask=torch.zeros(77, 77), text_pool_type="argmax"))
    assert not _can_trim(SimpleNamespace(attn_mask=model.attn_mask, text_pool_type="argmax"))  # not open_clip's


def test_prepare_builds_every_label_set_in_one_batch_and_caches_them(scorer, monkeypatch):
    scorer.cache.clear()
    calls = []
    encode = scorer.encode_texts
    monkeypatch.setattr(scorer, "encode_texts", lambda texts: calls.append(len(texts)) or encode(texts))
    sets = [("cat", "dog"), ("car",), ("cat", "dog")]
    assert scorer.prepare(sets, DEFAULT_TEMPLATES) == 3 * len(DEFAULT_TEMPLATES)
    assert calls == [3 * len(DEFAULT_TEMPLATES)]  # one batched pass for both distinct sets
    assert scorer.prepare(sets, DEFAULT_TEMPLATES) == 0 and calls == [30]
    prepared = scorer.prototypes(("cat", "dog"), DEFAULT_TEMPLATES)
    assert calls == [30]  # served from the cache
    scorer.cache.clear()
    torch.testing.assert_close(prepared, scorer.prototypes(("cat", "dog"), DEFAULT_TEMPLATES), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="templates"):
        scorer.prepare(sets, ("no placeholder",))
