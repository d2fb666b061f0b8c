"""worker.refine.chooser: which method runs, the fallbacks, the signature the cache keys on, SAM from settings."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from refine_support import disc_scene, iou
from worker.protocol import REFINED_BY, RegionPrompt, box_mask
from worker.refine import chooser
from worker.refine.chooser import Refiner, bounding_box, clicks_box, usable
from worker.settings import RefineSettings


class FakeSam:
    def __init__(self, mask):
        self.mask = mask

    def __call__(self, image, prompt):
        return self.mask, 0.9


BOX = RegionPrompt(box=(12, 8, 38, 32))
CLICK = RegionPrompt(points=((25.0, 20.0),))


def test_method_per_setting_and_prompt():
    plain = Refiner()
    assert plain.method_for(None, False) is None and plain.method_for(BOX, False) is None
    assert plain.method_for(BOX, True) == chooser.DEFAULT_METHOD == "grabcut"
    assert plain.signature() == "grabcut"
    sam = Refiner("auto", "sam", sam=FakeSam(None), sam_name="/models/sam")
    assert sam.method_for(BOX, True) == "sam" and sam.method_for(BOX, False) == "sam"
    assert sam.method_for(CLICK, False) is None  # only rectangles are refined unasked
    assert sam.signature() == "sam;sam=/models/sam;boxes=sam"
    assert Refiner("seeds").method_for(CLICK, True) == "seeds"
    assert len({plain.signature(), sam.signature(), Refiner("seeds").signature()}) == 3
    with pytest.raises(ValueError, match="MASKINV_SAM_CHECKPOINT"):
        Refiner("sam")
    with pytest.raises(ValueError, match="MASKINV_SAM_CHECKPOINT"):
        Refiner("auto", "sam")


def test_grabcut_refines_a_box_and_clicks():
    img, obj = disc_scene()
    pil = Image.fromarray(img)
    r = Refiner()
    done = r.refine(pil, BOX, "grabcut", 32)
    assert done.refined_by == "grabcut" and iou(done.mask, obj) > 0.9
    clicked = r.refine(pil, CLICK, "grabcut", 32)  # no engine: GrabCut in a square around the click
    assert clicked.refined_by == "grabcut" and iou(clicked.mask, obj) > 0.5


def test_an_unusable_mask_falls_back_to_the_next_method_then_to_the_prompt():
    img, obj = disc_scene()
    pil = Image.fromarray(img)
    empty = np.zeros(obj.shape, bool)
    done = Refiner("sam", sam=FakeSam(empty)).refine(pil, BOX, "sam", 32)
    assert done.refined_by == "grabcut"  # SAM found nothing, GrabCut did
    flat = Image.fromarray(np.full((50, 60, 3), 120, np.uint8))
    r = Refiner("sam", sam=FakeSam(empty))
    r.run = lambda method, image, prompt, size: empty  # type: ignore[method-assign]
    done = r.refine(flat, BOX, "sam", 32)
    assert done.refined_by == "box" and np.array_equal(done.mask, box_mask(BOX.box, (50, 60)))
    assert {"grabcut", "seeds", "sam", "box"} == set(REFINED_BY)


def test_a_click_keeps_only_the_part_it_falls_on():
    """A method that also finds a larger neighbour: the outline is the clicked object, not the neighbour."""
    img, _ = disc_scene()
    both = np.zeros((50, 60), bool)
    both[5:45, 30:58] = True  # the larger neighbour
    both[18:23, 23:28] = True  # the small clicked object, 5 x 5 around (25, 20)
    done = Refiner("sam", sam=FakeSam(both)).refine(Image.fromarray(img), CLICK, "sam", 32)
    assert done.refined_by == "sam" and int(done.mask.sum()) == 25 and done.mask[20, 25]
    off = RegionPrompt(points=((2.0, 2.0),))  # a click on no part leaves the mask as found
    assert Refiner("sam", sam=FakeSam(both)).refine(Image.fromarray(img), off, "sam", 32).mask.sum() == both.sum()
    assert np.array_equal(chooser.keep_clicked_parts(both, ()), both)


class BrokenSam:
    def __call__(self, image, prompt):
        raise RuntimeError("CUDA out of memory")


def test_a_failing_method_is_skipped_but_a_timeout_stops_the_job():
    from worker.protocol.deadline import JobTimeout

    img, obj = disc_scene()
    done = Refiner("sam", sam=BrokenSam()).refine(Image.fromarray(img), BOX, "sam", 32)
    assert done.refined_by == "grabcut" and iou(done.mask, obj) > 0.9
    r = Refiner()

    def late(*args):
        raise JobTimeout("past the limit", 1.0)

    r.run = late  # type: ignore[method-assign,assignment]
    with pytest.raises(JobTimeout):
        r.refine(Image.fromarray(img), BOX, "grabcut", 32)


def test_usable_and_boxes():
    shape = (50, 60)
    tiny = np.zeros(shape, bool)
    tiny[15, 20] = True
    assert not usable(tiny, BOX, shape) and usable(tiny, CLICK, shape) and not usable(~np.ones(shape, bool), CLICK,
                                                                                        shape)
    assert bounding_box(tiny) == (20.0, 15.0, 21.0, 16.0) and bounding_box(np.zeros(shape, bool)) is None
    assert clicks_box([(10, 10)], shape, share=0.2) == (5.0, 5.0, 15.0, 15.0)


def test_refiner_from_settings_loads_sam(tiny_sam):
    r = Refiner.from_settings(RefineSettings(method="auto", boxes="sam", sam_checkpoint=tiny_sam), engine=None)
    assert r.sam is not None and r.refine_method() == "sam"
    img, _ = disc_scene()
    done = r.refine(Image.fromarray(img), BOX, "sam", 32)
    assert done.mask.shape == (50, 60) and done.refined_by in REFINED_BY
    assert Refiner.from_settings(RefineSettings(), engine=None).sam is None


def test_seed_keys_are_computed_once_per_image(monkeypatch):
    calls = []

    def keys(engine, image, size):
        calls.append(size)
        import torch
        return torch.randn(16, 8), 4

    monkeypatch.setattr(chooser, "pipeline_image_keys", keys)
    img, _ = disc_scene()
    pil = Image.fromarray(img)
    r = Refiner("seeds", engine=object())
    for prompt in (BOX, CLICK, BOX):
        r.run("seeds", pil, prompt, 64)
    assert calls == [64]
    r.run("seeds", pil, BOX, 32)
    r.forget_image()
    r.run("seeds", pil, BOX, 32)
    assert calls == [64, 32, 32]
