"""Captions agree with the region's label: a ClipCap caption that names another class is replaced by an agreeing
beam hypothesis or a retrieval caption on the label; retrieval captions always name the label and nothing else of
its kind (committed tiny scene CLIP and captioner; deterministic on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.scene_world import SceneWorld
from worker.text.captions import RetrievalCaptioner, phrase_bank
from worker.text.clipcap import ClipCapCaptioner, load_clipcap
from worker.text.label_agreement import mentions_label, words

ROOT = Path(__file__).resolve().parents[3]
CAPTIONER = ROOT / "assets" / "tiny_clipcap"
CLIP_CHECKPOINT = ROOT / "assets" / "tiny_scene_clip" / "maskinv-scene-tiny.safetensors"
WORLD = SceneWorld(seed=0, min_objects=1, max_objects=1)
needs_assets = pytest.mark.skipif(not (CAPTIONER / "clipcap.json").is_file() or not CLIP_CHECKPOINT.is_file(),
                                  reason="the tiny scene CLIP and its captioner are not committed")


def class_words(text: str) -> set[str]:
    return {w for w in words(text) if w in WORLD.colours or w in WORLD.shapes}


@pytest.fixture(scope="module")
def scene_clip():
    from worker.engine.models import load_clip

    return load_clip("maskinv-scene-tiny", str(CLIP_CHECKPOINT), "cpu")


@pytest.fixture(scope="module")
def scorer(scene_clip):
    from worker.text.labels import LabelScorer

    return LabelScorer(scene_clip)


@pytest.fixture(scope="module")
def single_objects(scene_clip):
    """Image embeddings ``[8, 64]`` of single-object validation scenes and their objects' classes."""
    from worker.engine.engine import MaskInversionEngine

    scenes = [WORLD.scene(i, "val") for i in range(8)]
    emb = MaskInversionEngine(scene_clip).embed_images([s.image for s in scenes], 112)
    return emb, [s.objects[0].label for s in scenes]


def other_shape(label: str) -> str:
    """The same colour with the next shape of the world: a class the captioner did not see."""
    colour, shape = label.split()
    return f"{colour} {WORLD.shapes[(WORLD.shapes.index(shape) + 1) % len(WORLD.shapes)]}"


@needs_assets
@torch.no_grad()
def test_a_contradicting_caption_is_corrected(scorer, single_objects):
    emb, truth = single_objects
    cap = load_clipcap(CAPTIONER)
    free = ClipCapCaptioner(cap, agree_with_labels=False).caption(emb)
    assert sum(class_words(c) == set(t.split()) for c, t in zip(free, truth)) >= 6, (free, truth)
    labels = [other_shape(t) for t in truth]
    assert all(class_words(c) != set(lab.split()) for c, lab in zip(free, labels))  # every free caption disagrees
    agreeing = ClipCapCaptioner(cap, fallback=RetrievalCaptioner(scorer))
    fixed = agreeing.caption(emb, labels)
    assert all(mentions_label(c, lab) and class_words(c) == set(lab.split()) for c, lab in zip(fixed, labels)), fixed
    assert agreeing.caption(emb, labels) == fixed  # deterministic
    # the true labels: the free captions that already name them are kept as they are
    kept = agreeing.caption(emb, truth)
    assert all(k == f for k, f, t in zip(kept, free, truth) if mentions_label(f, t))


@needs_assets
@torch.no_grad()
def test_an_agreeing_beam_hypothesis_comes_before_the_fallback():
    cap = load_clipcap(CAPTIONER)
    emb = torch.randn(6, cap.cfg.clip_dim, generator=torch.Generator().manual_seed(0))
    captioner = ClipCapCaptioner(cap, beam_size=4)  # no fallback: the label after an article
    hyps = [[cap.decode(ids) for ids in h] for h in captioner.candidate_ids(emb)]
    assert [h[0] for h in hyps] == captioner.caption(emb)  # no labels: the best hypothesis
    picks = [next((h for h in hs[1:] if class_words(h) != class_words(hs[0]) and class_words(h)), None)
             for hs in hyps]
    rows = [i for i, p in enumerate(picks) if p is not None]
    assert rows, hyps
    labels = [" ".join(sorted(class_words(picks[i]), key=lambda w: w not in WORLD.colours)) for i in rows]
    got = captioner.caption(emb[rows], labels)
    assert got == [picks[i] for i in rows] and captioner.fallbacks == 0
    assert captioner.caption(emb[:1], ["green heart"]) == ["a green heart"] and captioner.fallbacks == 1


@needs_assets
@torch.no_grad()
def test_retrieval_captions_already_agree(scorer):
    for label in WORLD.class_names:
        bank = phrase_bank(label)
        assert all(mentions_label(p, label) and class_words(p) == set(label.split()) for p in bank), bank
    emb = torch.randn(len(WORLD.class_names), 64, generator=torch.Generator().manual_seed(1))
    captions = RetrievalCaptioner(scorer).caption(emb, WORLD.class_names)
    assert all(class_words(c) == set(lab.split()) for c, lab in zip(captions, WORLD.class_names)), captions


def test_phrase_bank_adds_no_second_word_of_a_kind():
    assert "a red blue cross" not in phrase_bank("blue cross") and "a small blue cross" in phrase_bank("blue cross")
    assert "a wooden blue cross" in phrase_bank("blue cross")
    assert "a red car" in phrase_bank("car") and "a large small box" not in phrase_bank("small box")
