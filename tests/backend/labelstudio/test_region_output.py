"""Proposed masks -> Label Studio brush RLE, polygons (percent) and rectangles, read back by
backend.labelstudio.regions."""

import numpy as np
import pytest

from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.region_output import OutputError, brush_value, geometry_value, polygon_value, rectangle_value
from backend.labelstudio.regions import Region, brush_mask, region_mask

CONFIG = """<View><Image name="image" value="$image"/>
<PolygonLabels name="poly" toName="image"><Label value="cat"/></PolygonLabels>
<RectangleLabels name="box" toName="image"><Label value="cat"/></RectangleLabels>
<BrushLabels name="brush" toName="image"><Label value="cat"/></BrushLabels></View>"""


def _region(kind: str, value: dict, w: int, h: int) -> Region:
    cfg = parse_label_config(CONFIG)
    name = {"polygon": "poly", "rectangle": "box", "brush": "brush"}[kind]
    item = {"id": "r", "from_name": name, "to_name": "image", "type": f"{kind}labels",
            "value": {**value, f"{kind}labels": ["cat"]}, "original_width": w, "original_height": h}
    return Region("r", cfg.control(name), item)


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_brush_round_trips_exactly_at_the_natural_size():
    m = _disc(60, 80, 30, 40, 17)
    value = brush_value(m, 80, 60)
    assert value["format"] == "rle"
    assert np.array_equal(brush_mask(value, 80, 60), m)


def test_brush_from_a_model_frame_mask_is_resized_to_the_image():
    small = np.zeros((28, 28), bool)
    small[7:21, 7:14] = True  # left half of the centre
    value = brush_value(small, 200, 100)
    back = brush_mask(value, 200, 100)
    assert back.shape == (100, 200)
    expect = np.zeros((100, 200), bool)
    expect[25:75, 50:100] = True
    assert _iou(back, expect) > 0.95


def test_polygon_percent_coordinates_rasterise_back_to_the_mask():
    m = _disc(448, 448, 200, 260, 90)
    value = polygon_value(m)
    pts = np.asarray(value["points"])
    assert pts.min() >= 0 and pts.max() <= 100 and len(pts) >= 8
    back = region_mask(_region("polygon", value, 640, 480), max_side=2048)
    ref = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(m.astype(np.uint8) * 255)
                     .resize((640, 480)).point(lambda v: 255 if v >= 128 else 0)) > 0
    assert _iou(back, ref) > 0.95


def test_polygon_keeps_the_largest_part_and_caps_points():
    m = np.zeros((100, 100), bool)
    m[10:20, 10:20] = True
    m[40:90, 30:95] = True
    pts = np.asarray(polygon_value(m)["points"])
    assert pts[:, 0].min() >= 29 and pts[:, 1].min() >= 39
    noisy = np.random.default_rng(0).random((300, 300)) > 0.3
    assert len(polygon_value(noisy)["points"]) <= 200


def test_one_pixel_line_becomes_a_valid_polygon():
    m = np.zeros((50, 50), bool)
    m[10, 5:40] = True
    assert len(polygon_value(m)["points"]) >= 3


def test_rectangle_is_the_bounding_box_in_percent():
    m = np.zeros((200, 100), bool)
    m[50:150, 10:60] = True
    v = rectangle_value(m)
    assert v == {"x": 10.0, "y": 25.0, "width": 50.0, "height": 50.0, "rotation": 0}
    back = region_mask(_region("rectangle", v, 100, 200))
    assert _iou(back, m) > 0.97  # Pillow fills the outline too (one pixel more on two sides)


def test_empty_or_bad_masks_and_unknown_kinds_are_named():
    with pytest.raises(OutputError, match="empty"):
        polygon_value(np.zeros((5, 5), bool))
    with pytest.raises(OutputError, match="2-D"):
        rectangle_value(np.zeros((5,), bool))
    with pytest.raises(OutputError, match="unknown region kind"):
        geometry_value("ellipse", np.ones((3, 3), bool), 3, 3)
