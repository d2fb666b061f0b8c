"""worker.refine.grabcut: the object in a box (and around clicks), at image resolution, inside the box."""

from __future__ import annotations

import cv2
import numpy as np

from refine_support import disc_scene, iou
from worker.refine.grabcut import grabcut


def test_grabcut_finds_the_object_in_its_box():
    img, obj = disc_scene()
    box = (12, 8, 38, 32)
    m = grabcut(img, box)
    assert m.shape == obj.shape and m.dtype == bool
    assert iou(m, obj) > 0.9
    assert not m[:, :12].any() and not m[32:].any()  # never outside the box


def test_grabcut_with_clicks_and_a_large_image_scaled_down():
    img, obj = disc_scene(h=600, w=700, cx=300, cy=280, r=120)
    m = grabcut(img, (150, 130, 450, 430), clicks=[(300, 280)], max_side=128)
    assert m.shape == obj.shape and iou(m, obj) > 0.85


def test_grabcut_of_a_box_off_the_image_is_empty():
    img, _ = disc_scene()
    assert not grabcut(img, (100, 100, 140, 140)).any()


def test_grabcut_that_cannot_fit_a_model_finds_nothing(monkeypatch):
    img, _ = disc_scene()

    def fail(*args, **kwargs):
        raise cv2.error("no model")

    monkeypatch.setattr(cv2, "grabCut", fail)
    assert not grabcut(img, (12, 8, 38, 32)).any()
    assert np.asarray(img).shape == (50, 60, 3)
