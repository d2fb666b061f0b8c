"""benchmarks/box_to_mask.py: prompt geometry, and the harness end to end on two scenes with the tiny scene CLIP."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import box_to_mask as b2m
from benchmarks.region_classification import SCENE_CHECKPOINT


def test_prompt_geometry():
    m = np.zeros((20, 30), bool)
    m[4:10, 5:15] = True
    assert b2m.tight_box(m) == (5.0, 4.0, 15.0, 10.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x0, y0, x1, y1 = b2m.jitter_box((5.0, 4.0, 15.0, 10.0), rng, 0.1, m.shape)
        assert abs(x0 - 5) <= 1 and abs(x1 - 15) <= 1 and abs(y0 - 4) <= 0.6 and abs(y1 - 10) <= 0.6
    ring = np.zeros((21, 21), bool)
    yy, xx = np.mgrid[0:21, 0:21]
    ring[(np.hypot(xx - 10, yy - 10) > 6) & (np.hypot(xx - 10, yy - 10) < 9)] = True
    x, y = b2m.centroid_click(ring)
    assert ring[int(y), int(x)]  # inside the object, though its centroid is not


@pytest.mark.skipif(not SCENE_CHECKPOINT.is_file(), reason="the tiny scene CLIP is not committed")
def test_harness_runs_and_reports_every_prompt_and_method():
    report = b2m.evaluate(2, steps=1)
    assert set(report["rows"]) == set(b2m.PROMPTS)
    for methods in report["rows"].values():
        assert set(methods) == set(b2m.METHODS)
        assert methods["oracle"]["iou"] >= max(methods["grabcut"]["iou"], methods["seeds"]["iou"]) - 1e-9
    assert report["rows"]["box"]["grabcut"]["iou"] > report["rows"]["box"]["prompt"]["iou"]
    md = b2m.to_markdown(report)
    assert "| jittered box | chosen |" in md and "Ground-truth mask" in md
