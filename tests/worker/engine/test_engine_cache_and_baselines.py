"""Image-state cache bound, label scoring, the three baselines and model loading."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from worker.engine.engine import MaskInversionEngine
from worker.engine.bounded_cache import BoundedCache
from worker.text.labels import LabelScorer
from worker.engine.models import load_clip

MODEL = "maskinv-test-tiny"


@pytest.fixture(scope="module")
def clip():
    return load_clip(MODEL, "none", "cpu")


def make_image(seed: int, size=(60, 50)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def box_mask(h=50, w=60, y=(10, 30), x=(10, 40)) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y[0]:y[1], x[0]:x[1]] = True
    return m


def test_byte_lru_evicts_least_recent():
    cache: BoundedCache[bytes] = BoundedCache(None, 10, sizeof=lambda _key, value: len(value))
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # a is now most recent
    cache.put("c", b"1234")  # 12 bytes > 10: evict b
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.stats.evictions == 1 and cache.stats.bytes == 8
    cache.put("huge", b"x" * 11)  # larger than the bound: not kept
    assert "huge" not in cache and cache.stats.bytes == 8
    assert cache.get("zzz") is None and cache.stats.misses == 1 and cache.stats.hits == 1


def test_engine_cache_is_bounded_in_bytes(clip):
    probe = MaskInversionEngine(clip)
    state, *_ = probe.image_state(make_image(0), 64)
    engine = MaskInversionEngine(clip, cache_bytes=int(state.nbytes * 2.5))
    for seed in range(4):
        engine.invert(make_image(seed), [box_mask()], size=64, steps=1)
    assert engine.cache.stats.entries == 2 and engine.cache.stats.evictions == 2
    assert engine.cache.stats.bytes <= engine.cache.stats.max_bytes
    # the evicted image costs a forward again, the kept one does not
    before = engine.stats.vit_forwards
    assert engine.invert(make_image(3), [box_mask()], size=64, steps=1).image_hit
    assert not engine.invert(make_image(0), [box_mask()], size=64, steps=1).image_hit
    assert engine.stats.vit_forwards == before + 1


def test_cache_key_includes_size_and_bytes(clip):
    engine = MaskInversionEngine(clip)
    data = make_image(5)
    assert not engine.invert(data, [box_mask()], size=32, steps=1).image_hit
    assert not engine.invert(data, [box_mask()], size=64, steps=1).image_hit
    assert engine.invert(data, [box_mask()], size=32, steps=1).image_hit
    # same pixels re-encoded as different bytes: a different key (hash of the bytes)
    other = io.BytesIO()
    Image.open(io.BytesIO(data)).save(other, "BMP")
    assert not engine.invert(other.getvalue(), [box_mask()], size=32, steps=1).image_hit


def test_label_prototypes_and_scores(clip):
    scorer = LabelScorer(clip)
    labels = ["cat", "dog", "red car", "tree"]
    protos = scorer.prototypes(labels)
    assert protos.shape == (4, clip.embed_dim)
    torch.testing.assert_close(protos.norm(dim=-1), torch.ones(4))
    assert scorer.prototypes(labels) is protos  # cached
    emb = torch.randn(3, clip.embed_dim)
    probs = scorer.probabilities(emb, labels)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    top = scorer.score(emb, labels, top_k=2)
    assert [len(t) for t in top] == [2, 2, 2]
    for row, p in zip(top, probs):
        assert row[0][1] >= row[1][1]
        assert row[0][0] == labels[int(p.argmax())]
    # a prototype scores itself highest
    assert [t[0][0] for t in scorer.score(protos, labels, top_k=1)] == labels
    assert len(scorer.score(emb, labels, top_k=99)[0]) == 4


def test_label_scorer_rejects_bad_input(clip):
    scorer = LabelScorer(clip)
    with pytest.raises(ValueError, match="no labels"):
        scorer.prototypes([])
    with pytest.raises(ValueError, match="templates"):
        scorer.prototypes(["cat"], ["no placeholder"])


def test_baselines(clip):
    engine = MaskInversionEngine(clip)
    data = make_image(1)
    full = np.ones((50, 60), bool)
    part = box_mask()
    part[10:20, 10:25] = False  # an L shape: its box holds pixels outside the mask
    g = engine.baseline_embeddings(data, [full, part], "global", size=32)
    assert g.shape == (2, clip.embed_dim) and torch.equal(g[0], g[1])
    crop = engine.baseline_embeddings(data, [full, part], "crop", size=32)
    masked = engine.baseline_embeddings(data, [full, part], "masked_crop", size=32)
    # a mask covering everything crops the whole image: the global embedding again
    torch.testing.assert_close(crop[0], g[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked[0], g[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(crop[1], g[1]) and not torch.allclose(masked[1], crop[1])
    empty = engine.baseline_embeddings(data, [np.zeros((50, 60), bool)], "crop", size=32)
    assert torch.equal(empty[0], g[0])
    with pytest.raises(ValueError, match="baseline"):
        engine.baseline_embeddings(data, [full], "nope", size=32)


def test_masked_crop_fills_outside_with_mean(clip):
    from worker.engine.preprocess import masked_crop

    img = Image.new("RGB", (10, 10), (255, 0, 0))
    m = np.zeros((10, 10), bool)
    m[2:8, 2:8] = True
    m[2, 2] = False
    out = np.asarray(masked_crop(img, m, (122, 116, 104)))
    assert out.shape == (6, 6, 3)
    assert tuple(out[0, 0]) == (122, 116, 104) and tuple(out[3, 3]) == (255, 0, 0)


def test_load_local_checkpoint(tmp_path, clip):
    path = tmp_path / "tiny.pt"
    torch.save(clip.model.state_dict(), path)
    other = load_clip(MODEL, str(path), "cpu", seed=123)  # seed ignored: weights come from the file
    assert torch.equal(other.model.visual.proj, clip.model.visual.proj)
    # the id names the weights' content, never their path (Label Studio shows model_version)
    assert str(path) not in other.id and other.id.startswith(f"{MODEL}/sha256-") and other.id != clip.id


def test_bad_model_names():
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_clip("no-such-model", "none", "cpu")
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        load_clip("ViT-B-16", "no-such-tag", "cpu")


def test_open_image_modes_and_limits(monkeypatch):
    from worker.engine.preprocess import open_image

    # EXIF rotation applied (what the annotator saw): a 40x20 image tagged "rotate 90" is 20x40
    img = Image.new("RGB", (40, 20), (10, 200, 30))
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert open_image(buf.getvalue())[0].size == (20, 40)
    # 16-bit greyscale rescaled, not clipped to white
    arr16 = np.full((8, 8), 32768, np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr16).save(buf, "PNG")
    rgb = np.asarray(open_image(buf.getvalue())[0])
    assert rgb.shape == (8, 8, 3) and 120 <= rgb[0, 0, 0] <= 135
    # alpha composited on black, CMYK converted
    rgba = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    assert np.asarray(open_image(buf.getvalue())[0]).max() == 0
    buf = io.BytesIO()
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(buf, "JPEG")
    assert open_image(buf.getvalue())[0].mode == "RGB"
    # truncated data and pixel bombs are refused before decoding
    good = io.BytesIO()
    Image.new("RGB", (64, 64)).save(good, "PNG")
    with pytest.raises(ValueError, match="cannot decode image"):
        open_image(good.getvalue()[:40])
    with pytest.raises(ValueError, match="more than the limit"):
        open_image(good.getvalue(), max_pixels=1000)
    from worker.engine import preprocess  # the process default, set once from the worker's settings

    monkeypatch.setattr(preprocess, "_default_max_pixels", preprocess.DEFAULT_MAX_IMAGE_PIXELS)
    preprocess.set_default_max_pixels(1000)
    with pytest.raises(ValueError, match="more than the limit"):
        open_image(good.getvalue())


def test_crop_embeddings_match_the_masked_crop_baseline_and_name_bad_masks(clip):
    import numpy as np

    from worker.engine.engine import MaskInversionEngine

    engine = MaskInversionEngine(clip)
    rng = np.random.default_rng(3)
    from PIL import Image

    img = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    good = np.zeros((48, 64), bool)
    good[5:30, 10:40] = True
    emb, errors = engine.crop_embeddings(img, [good, np.zeros((48, 64), bool)], "masked_crop", size=64)
    assert errors[0] is None and "empty mask" in errors[1] and not emb[1].any()
    base = engine.baseline_embeddings(img, [good], "masked_crop", size=64)
    np.testing.assert_allclose(emb[0].numpy(), base[0].numpy(), rtol=1e-5, atol=1e-6)
    assert engine.native_size == int(clip.visual.image_size[0] if isinstance(
        clip.visual.image_size, (tuple, list)) else clip.visual.image_size)
    import pytest

    with pytest.raises(ValueError, match="crop kind"):
        engine.crop_embeddings(img, [good], "global")
