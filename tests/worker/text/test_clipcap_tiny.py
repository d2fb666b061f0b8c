"""The committed tiny captioner (assets/tiny_clipcap) on the committed tiny scene CLIP: it loads through the
environment's settings and captions single-object scenes it never saw in the words of the scene world."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.settings import CaptionerSettings
from worker.text.clipcap import ClipCapCaptioner, load_captioner, load_clipcap

ROOT = Path(__file__).resolve().parents[3]
CAPTIONER = ROOT / "assets" / "tiny_clipcap"
CLIP_CHECKPOINT = ROOT / "assets" / "tiny_scene_clip" / "maskinv-scene-tiny.safetensors"
# The captioner is trained on the tiny scene CLIP's embeddings: both are committed together or not at all.
pytestmark = pytest.mark.skipif(not (CAPTIONER / "clipcap.json").is_file() or not CLIP_CHECKPOINT.is_file(),
                                reason="the tiny scene CLIP and its captioner are not committed")


@pytest.fixture(scope="module")
def scene_clip():
    from worker.engine.models import load_clip

    return load_clip("maskinv-scene-tiny", str(CLIP_CHECKPOINT), "cpu")


@pytest.fixture(scope="module")
def val_scenes():
    from training.scene_world import SceneWorld

    world = SceneWorld(seed=0, min_objects=1, max_objects=1)
    return [world.scene(i, "val") for i in range(12)]


def test_committed_captioner_is_small_and_loads():
    size = sum(f.stat().st_size for f in CAPTIONER.rglob("*") if f.is_file())
    assert size < 4 * 2**20
    cap = load_clipcap(CAPTIONER)
    assert cap.cfg.clip_model["name"] == "maskinv-scene-tiny" and cap.cfg.clip_dim == 64


def test_captions_name_the_colour_of_unseen_single_object_scenes(scene_clip, val_scenes, monkeypatch):
    from worker.engine.engine import MaskInversionEngine
    from worker.text.labels import LabelScorer

    monkeypatch.setenv("MASKINV_CAPTIONER", str(CAPTIONER))
    monkeypatch.setenv("MASKINV_CAPTION_DECODING", "beam")
    captioner = load_captioner(LabelScorer(scene_clip), CaptionerSettings.from_env())
    assert isinstance(captioner, ClipCapCaptioner)
    engine = MaskInversionEngine(scene_clip)
    emb = engine.embed_images([s.image for s in val_scenes], 112)
    captions = captioner.caption(emb, [""] * len(val_scenes))
    words = [c.split() for c in captions]
    assert all(len(w) == 3 and w[0] in ("a", "an") for w in words), captions
    right_colour = sum(w[1] == s.objects[0].colour for w, s in zip(words, val_scenes))
    assert right_colour >= 10, list(zip(captions, [s.objects[0].label for s in val_scenes]))
    greedy = ClipCapCaptioner(captioner.cap, "greedy").caption(emb)
    assert len(greedy) == len(captions)
    assert captioner.caption(emb) == captions  # deterministic


@torch.no_grad()
def test_region_lets_are_captioned(scene_clip):
    """End to end on a multi-object scene: one caption per object mask from its LET."""
    import numpy as np

    from training.scene_world import COLOURS, SHAPES, SceneWorld
    from worker.engine.engine import MaskInversionEngine

    scene = next(s for s in (SceneWorld(seed=0).scene(i, "test") for i in range(20)) if len(s.objects) >= 3)
    res = MaskInversionEngine(scene_clip).invert(scene.image, np.stack([o.mask for o in scene.objects]), size=112)
    captions = ClipCapCaptioner(load_clipcap(CAPTIONER)).caption(res.lets)
    assert len(captions) == len(scene.objects) and all(c.split()[0] in ("a", "an") for c in captions)
    # each caption names one object of the world ("a <colour> <shape>"), and the LET of an object's mask names that
    # object's colour for most objects (measured: 3 of these 4 — purple, green, blue right; the yellow circle not)
    words = [c.split() for c in captions]
    assert all(len(w) == 3 and w[1] in COLOURS and w[2] in SHAPES for w in words), captions
    right = sum(w[1] == o.colour for w, o in zip(words, scene.objects))
    assert right >= len(scene.objects) - 1, list(zip(captions, [o.label for o in scene.objects]))


def test_let_captions_beat_global_captions_on_multi_object_scenes(scene_clip):
    """The localized-captions protocol on the first 40 test scenes with the committed CLIP and captioner, at the
    model's native size: a regression net at the measured level (these 89 objects: LET 68.5 % vs global 38.2 %
    correct; full benchmark, 663 objects: 66.8 % vs 37.6 %; see docs/captions.md)."""
    from benchmarks import localized_captions as lc
    from training.scene_world import SceneWorld
    from worker.engine.engine import MaskInversionEngine
    from worker.text.labels import LabelScorer

    captioner = ClipCapCaptioner(load_clipcap(CAPTIONER))
    records, _ = lc.caption_scenes(SceneWorld(seed=0), range(40), MaskInversionEngine(scene_clip), captioner,
                                   alphas=[0.0], size=112, steps=10, lr=0.1)
    lc.judge(records, LabelScorer(scene_clip))
    multi = [r for r in records if r.n_objects >= 2]
    assert len(multi) >= 80
    let, glob = lc.accuracy(multi, "LET α=0"), lc.accuracy(multi, "global")
    assert let >= glob + 20.0 and let >= 60.0, (let, glob)
