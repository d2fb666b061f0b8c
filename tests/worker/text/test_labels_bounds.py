"""The worker side of the text limits: bounded text caches, and its own re-check of labels and templates for jobs
that did not come through the backend."""

from __future__ import annotations

import numpy as np
import pytest

from backend_support import TINY_MODEL_ENV, png_bytes

MODEL = TINY_MODEL_ENV["MASKINV_MODEL"]


@pytest.fixture(scope="module")
def clip():
    from worker.engine.models import load_clip

    return load_clip(MODEL, "none", "cpu")


def test_prototype_cache_stays_within_entries_and_bytes(clip):
    from worker.text.labels import LabelScorer

    scorer = LabelScorer(clip, max_entries=8, max_bytes=64 * 1024)
    one = scorer.prototypes(["w0-a", "w0-b"], ["a {}."])
    for i in range(300):  # 300 distinct label sets of 5 new labels each
        scorer.prototypes([f"lbl{i}x{j}" for j in range(5)], ["a {}.", "the {}."])  # distinct label tuples
        assert len(scorer.cache) <= 8 and scorer.cache.nbytes <= 64 * 1024
    stats = scorer.cache.stats
    assert stats.evictions >= 290 and stats.entries == 8
    assert np.allclose(scorer.prototypes(["w0-a", "w0-b"], ["a {}."]), one)  # recomputed after eviction: same


def test_byte_bound_holds_for_large_vocabularies(clip):
    from worker.text.labels import LabelScorer

    scorer = LabelScorer(clip, max_entries=1000, max_bytes=20_000)
    for i in range(20):
        scorer.prototypes([f"v{i}-{j}" for j in range(30)], ["a {}."])  # ~30 x D x 4 bytes each
        assert scorer.cache.nbytes <= 20_000


def _letters(n: int) -> str:
    out = ""
    while True:
        n, k = divmod(n, 26)
        out += chr(97 + k)
        if not n:
            return out


def test_tokenizer_memo_is_bounded_and_keeps_special_tokens(clip):
    from worker.text.labels import LabelScorer, bound_tokenizer_cache
    from worker.text.token_memo import BoundedMemo

    LabelScorer(clip)  # installs the bounded memo on the tokenizer
    tok = clip.tokenizer
    assert isinstance(tok.cache, BoundedMemo)
    bound_tokenizer_cache(tok)  # idempotent
    tok.cache.max_entries, tok.cache.max_chars = 200, 10_000
    pinned = dict((k, tok.cache[k]) for k in tok.cache._pinned)
    reference = tok(["zqxj blorf"]).tolist()
    for i in range(3000):  # 6000 distinct all-letter words (digits would be split off into shared tokens)
        tok([f"qz{_letters(i)} vv{_letters(i)}"])
        assert tok.cache.unpinned <= 200 and tok.cache.chars <= 10_000
    assert all(tok.cache[k] == v for k, v in pinned.items())
    assert tok.cache.unpinned == 200 or tok.cache.chars > 10_000 - 100  # it did fill up: the bound was reached
    assert tok(["zqxj blorf"]).tolist() == reference  # evicted words tokenise the same


def test_caption_phrase_banks_are_bounded(clip):
    from worker.text.captions import RetrievalCaptioner
    from worker.text.labels import LabelScorer

    captioner = RetrievalCaptioner(LabelScorer(clip), max_entries=5, max_bytes=1 << 20)
    emb = np.random.default_rng(0).standard_normal((1, clip.embed_dim)).astype(np.float32)
    import torch

    for i in range(40):
        captioner.caption(torch.from_numpy(emb), [f"thing{i}"])
        assert len(captioner._banks) <= 5


def test_runtime_reads_the_cache_bounds_from_the_environment(monkeypatch):
    from worker.settings import WorkerSettings, WorkerSettingsError

    s = WorkerSettings.from_env({})
    assert (s.prototype_cache_entries, s.prototype_cache_bytes) == (256, 64 << 20)
    s = WorkerSettings.from_env({"MASKINV_PROTOTYPE_CACHE_ENTRIES": "3", "MASKINV_PROTOTYPE_CACHE_MB": "1"})
    assert (s.prototype_cache_entries, s.prototype_cache_bytes) == (3, 1 << 20)
    with pytest.raises(WorkerSettingsError, match="MASKINV_PROTOTYPE_CACHE_MB"):
        WorkerSettings.from_env({"MASKINV_PROTOTYPE_CACHE_MB": "lots"})


def _with(settings, **changes):
    """The worker's settings with ``changes`` (what a worker started with those variables would read)."""
    import dataclasses

    return dataclasses.replace(settings, **changes)


def _job(labels, templates=("a photo of a {}.",)):
    from worker.protocol import InversionParams, LabelRegionsJob

    mask = np.zeros((16, 24), bool)
    mask[4:12, 6:18] = True
    params = InversionParams(steps=1, size=32, templates=tuple(templates), caption=False)
    job = LabelRegionsJob.build(png_bytes(24, 16), [("r1", mask)], list(labels), params).to_dict()
    job["params"]["templates"] = list(templates)  # as a hand-written job would carry them, unchecked
    return job


def test_worker_refuses_a_hand_enqueued_job_with_an_overlong_label(tiny_runtime, monkeypatch):
    from worker.jobs import regions as jobs

    rt = jobs.get_runtime()
    monkeypatch.setattr(rt, "settings", _with(rt.settings, max_label_chars=200))
    result = jobs.label_regions(_job(["car", "w" * 5000]))
    assert "MASKINV_MAX_LABEL_CHARS=200" in result["error"] and result["regions"][0]["labels"] == []
    limited = rt.settings
    monkeypatch.setattr(rt, "settings", _with(limited, max_vocab_bytes=10))
    result = jobs.label_regions(_job(["car", "tree", "house"]))
    assert "MASKINV_MAX_VOCAB_BYTES=10" in result["error"]
    monkeypatch.setattr(rt, "settings", limited)
    ok = jobs.label_regions(_job(["car", "tree"]))
    assert ok.get("error") is None and ok["regions"][0]["labels"]


@pytest.mark.parametrize("template", ["{}{}", "{} {x}", "{{}}{:x>4000}", "{0}"])
def test_worker_refuses_bad_templates_in_hand_enqueued_jobs(tiny_runtime, template):
    from worker.jobs import regions as jobs

    result = jobs.label_regions(_job(["car", "tree"], templates=["a {}.", template]))
    assert "template" in result["error"] and result["regions"][0]["labels"] == []


def test_worker_template_length_cap(tiny_runtime, monkeypatch):
    from worker.jobs import regions as jobs

    rt = jobs.get_runtime()
    monkeypatch.setattr(rt, "settings", _with(rt.settings, max_template_chars=20))
    result = jobs.label_regions(_job(["car"], templates=["a rather long photo of a {}."]))
    assert "MASKINV_MAX_TEMPLATE_CHARS" in result["error"]


def test_labels_are_never_format_strings(clip):
    from worker.text.labels import LabelScorer

    scorer = LabelScorer(clip)
    protos = scorer.prototypes(["{0.__class__}", "{}", "{{x}}"], ["a {{curly}} photo of a {}."])
    assert protos.shape[0] == 3
