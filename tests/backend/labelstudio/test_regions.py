"""Label Studio regions -> masks: brush RLE, polygons and rotated rectangles against Pillow ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image, ImageDraw

from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.regions import Region, RegionError, collect_regions, region_mask

CONFIGS = Path(__file__).resolve().parents[3] / "label_config"
W, H = 90, 70


@pytest.fixture(scope="module")
def cfgs():
    return {name: parse_label_config((CONFIGS / f"{name}.xml").read_text())
            for name in ("brush", "polygon", "rectangle")}


def item(kind: str, value: dict, rid: str = "r1", w: int = W, h: int = H) -> dict:
    rtype = f"{kind}labels"
    return {"id": rid, "from_name": "label", "to_name": "image", "type": rtype, "original_width": w,
            "original_height": h, "image_rotation": 0, "value": {**value, rtype: ["car"]}}


def one_region(cfg, it: dict) -> Region:
    regions, problems = collect_regions([it], cfg)
    assert not problems, problems
    assert len(regions) == 1
    return regions[0]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# -- brush -------------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_brush_rle_round_trip(w, h, seed):
    rng = np.random.default_rng(seed)
    truth = rng.random((h, w)) < rng.random()
    cfg = parse_label_config((CONFIGS / "brush.xml").read_text())
    rle = mask2rle((truth * 255).astype(np.uint8))  # label-studio-sdk's encoder: what Label Studio stores
    region = one_region(cfg, item("brush", {"format": "rle", "rle": rle}, w=w, h=h))
    if not truth.any():
        with pytest.raises(RegionError, match="covers no pixel"):
            region_mask(region)
        return
    assert np.array_equal(region_mask(region), truth)


def test_brush_painted_shape_round_trip(cfgs):
    truth = Image.new("L", (W, H), 0)
    ImageDraw.Draw(truth).ellipse((10, 5, 60, 50), fill=255)
    ImageDraw.Draw(truth).line((0, 69, 89, 0), fill=255, width=5)
    truth = np.asarray(truth) > 0
    region = one_region(cfgs["brush"], item("brush", {"format": "rle", "rle": mask2rle(truth.astype(np.uint8) * 255)}))
    assert np.array_equal(region_mask(region), truth)


def test_brush_rle_of_wrong_size_is_rejected(cfgs):
    rle = mask2rle(np.ones((10, 10), np.uint8) * 255)
    region = one_region(cfgs["brush"], item("brush", {"format": "rle", "rle": rle}, w=20, h=10))
    with pytest.raises(RegionError, match="encodes 400 values, expected 800"):
        region_mask(region)


@pytest.mark.parametrize("rle, match", [
    ([1, 2, 3], "list of byte values"),
    ("abc", "list of byte values"),
    ([0, 0, 0, 16, 300, 1], r"integers in \[0, 255\]"),
])
def test_brush_rle_malformed(cfgs, rle, match):
    region = one_region(cfgs["brush"], item("brush", {"format": "rle", "rle": rle}, w=2, h=2))
    with pytest.raises(RegionError, match=match):
        region_mask(region)


def test_brush_rle_truncated(cfgs):
    rle = mask2rle((np.random.default_rng(1).random((20, 20)) > 0.5).astype(np.uint8) * 255)
    region = one_region(cfgs["brush"], item("brush", {"format": "rle", "rle": rle[:12]}, w=20, h=20))
    with pytest.raises(RegionError, match="truncated or corrupt|decodes to"):
        region_mask(region)


# -- polygons ----------------------------------------------------------------------------------------------

def test_polygon_matches_pillow(cfgs):
    px = [(5.0, 7.0), (70.5, 12.0), (80.0, 60.0), (30.0, 66.0), (12.0, 40.0)]
    truth = Image.new("1", (W, H), 0)
    ImageDraw.Draw(truth).polygon(px, fill=1, outline=1)
    pct = [[x / W * 100, y / H * 100] for x, y in px]
    region = one_region(cfgs["polygon"], item("polygon", {"points": pct, "closed": True}))
    mask, truth = region_mask(region), np.asarray(truth, dtype=bool)
    # percent round trips are exact up to float rounding, which may flip a pixel whose centre is on an edge
    assert mask.shape == truth.shape and (mask != truth).sum() <= 3


def test_polygon_with_fewer_than_three_points(cfgs):
    region = one_region(cfgs["polygon"], item("polygon", {"points": [[1, 1], [50, 50]]}))
    with pytest.raises(RegionError, match="at least 3 points, got 2"):
        region_mask(region)


@pytest.mark.parametrize("points", [None, "x", [[1, 2], [3], [4, 5]], [[1, 2], [3, float("nan")], [4, 5]]])
def test_polygon_malformed(cfgs, points):
    region = one_region(cfgs["polygon"], item("polygon", {"points": points}))
    with pytest.raises(RegionError):
        region_mask(region)


# -- rectangles --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rotation", [0, 17, 45, 90, 160, 270, -30])
def test_rotated_rectangle_matches_pillow_rotation(cfgs, rotation):
    """Ground truth: Pillow draws the upright box, then rotates the canvas around the box's top-left corner."""
    x, y, w, h = 40.0, 30.0, 28.0, 16.0  # stays inside the 90 x 70 frame at every tested angle
    canvas = Image.new("L", (W, H), 0)
    ImageDraw.Draw(canvas).rectangle((x, y, x + w, y + h), fill=255)  # Pillow includes both ends, as we do
    # Label Studio's rotation is clockwise on screen; Pillow's Image.rotate is counter-clockwise
    truth = np.asarray(canvas.rotate(-rotation, resample=Image.NEAREST, center=(x, y))) > 127
    value = {"x": x / W * 100, "y": y / H * 100, "width": w / W * 100, "height": h / H * 100, "rotation": rotation}
    mask = region_mask(one_region(cfgs["rectangle"], item("rectangle", value)))
    assert mask.shape == (H, W)
    assert iou(mask, truth) > 0.85, iou(mask, truth)
    # the mask's centroid is where the rotated box's centre is
    theta = np.radians(rotation)
    cx = x + (w / 2) * np.cos(theta) - (h / 2) * np.sin(theta)
    cy = y + (w / 2) * np.sin(theta) + (h / 2) * np.cos(theta)
    yy, xx = np.nonzero(mask)
    assert abs(xx.mean() - cx) < 1.0 and abs(yy.mean() - cy) < 1.0


def test_axis_aligned_rectangle_is_exact(cfgs):
    value = {"x": 10 / W * 100, "y": 20 / H * 100, "width": 30 / W * 100, "height": 15 / H * 100, "rotation": 0}
    mask = region_mask(one_region(cfgs["rectangle"], item("rectangle", value)))
    truth = Image.new("1", (W, H), 0)
    ImageDraw.Draw(truth).polygon([(10, 20), (40, 20), (40, 35), (10, 35)], fill=1, outline=1)
    assert np.array_equal(mask, np.asarray(truth, dtype=bool))


@pytest.mark.parametrize("value, match", [
    ({"x": 10, "y": 10, "width": 0, "height": 5}, "must be > 0"),
    ({"x": 10, "y": 10, "width": 5}, "height must be a finite number"),
    ({"x": "a", "y": 10, "width": 5, "height": 5}, "x must be a finite number"),
])
def test_rectangle_malformed(cfgs, value, match):
    with pytest.raises(RegionError, match=match):
        region_mask(one_region(cfgs["rectangle"], item("rectangle", value)))


def test_large_frames_are_rasterised_at_max_side(cfgs):
    value = {"x": 25, "y": 25, "width": 50, "height": 50, "rotation": 0}
    region = one_region(cfgs["rectangle"], item("rectangle", value, w=4000, h=2000))
    mask = region_mask(region, max_side=400)
    assert mask.shape == (200, 400)
    assert abs(mask.mean() - 0.25) < 0.01


def test_frame_falls_back_to_image_size(cfgs):
    it = item("rectangle", {"x": 0, "y": 0, "width": 50, "height": 100})
    del it["original_width"], it["original_height"]
    region = one_region(cfgs["rectangle"], it)
    assert region_mask(region, image_size=(40, 30)).shape == (30, 40)
    with pytest.raises(RegionError, match="image size is unknown"):
        region_mask(region)


# -- grouping and unknown types -------------------------------------------------------------------------------

def test_collect_regions_groups_items_by_id_and_reports_problems(cfgs):
    results = [
        item("rectangle", {"x": 1, "y": 1, "width": 10, "height": 10}, rid="a"),
        {"id": "a", "from_name": "caption", "to_name": "image", "type": "textarea", "value": {"text": ["hi"]}},
        {"id": "b", "from_name": "label", "to_name": "image", "type": "ellipselabels",
         "value": {"x": 1, "y": 1, "radiusX": 2, "radiusY": 2}},
        {"id": "c", "from_name": "nope", "to_name": "image", "type": "rectanglelabels",
         "value": {"x": 1, "y": 1, "width": 2, "height": 2}},
        {"from_name": "label", "to_name": "image", "type": "rectanglelabels", "value": {}},
        {"id": "d", "from_name": "label", "to_name": "image", "type": "rectanglelabels", "value": "bad"},
        "garbage",
        {"type": "relation", "from_id": "a", "to_id": "b"},
    ]
    regions, problems = collect_regions(results, cfgs["rectangle"])
    assert [r.id for r in regions] == ["a"]
    msgs = {p.id: p.error for p in problems}
    assert "unsupported region type 'ellipselabels'" in msgs["b"]
    assert "not in the label config" in msgs["c"]
    assert "no 'value' object" in msgs["d"]
    assert any("no region id" in p.error for p in problems)
    assert any("not an object" in p.error for p in problems)
    _, problems = collect_regions({"not": "a list"}, cfgs["rectangle"])
    assert "must be a list" in problems[0].error


def test_plain_tool_with_generic_labels_control():
    cfg = parse_label_config("""<View><Image name="img" value="$url"/>
      <Rectangle name="box" toName="img"/>
      <Labels name="lab" toName="img"><Label value="cat"/><Label value="dog"/></Labels></View>""")
    box = cfg.control("box")
    assert box.labels == ("cat", "dog") and box.labels_control == "lab"
    plain = {"id": "p", "from_name": "box", "to_name": "img", "type": "rectangle", "original_width": 10,
             "original_height": 10, "value": {"x": 0, "y": 0, "width": 50, "height": 50}}
    merged = {"id": "m", "from_name": "lab", "to_name": "img", "type": "rectanglelabels", "original_width": 10,
              "original_height": 10, "value": {"x": 0, "y": 0, "width": 50, "height": 50, "rectanglelabels": ["cat"]}}
    regions, problems = collect_regions([plain, merged], cfg)
    assert not problems and [r.control.name for r in regions] == ["box", "box"]
    assert region_mask(regions[1]).sum() == 36  # 0..5 inclusive on both axes (Pillow fills the outline)
