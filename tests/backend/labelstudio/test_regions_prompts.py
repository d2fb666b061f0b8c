"""Boxes and clicks that mark an object in a polygon or brush project: which controls are prompt controls, how
Label Studio's smart keypoints group into one object, the prompt in image pixels, and the answer's outline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.protocol import MAX_PROMPT_POINTS, LabelScore, RegionResult, encode_mask

from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.predictions import outlined_geometry, region_results
from backend.labelstudio.regions import collect_regions, region_mask, region_prompt

CONFIGS = Path(__file__).resolve().parents[3] / "label_config"
W, H = 200, 100


@pytest.fixture(scope="module")
def cfgs():
    return {name: parse_label_config((CONFIGS / f"{name}.xml").read_text())
            for name in ("brush", "polygon", "rectangle")}


def box(rid: str = "b1", x=10.0, y=20.0, w=30.0, h=40.0, rotation=0.0, frame=(W, H)) -> dict:
    return {"id": rid, "from_name": "box", "to_name": "image", "type": "rectangle", "origin": "manual",
            "original_width": frame[0], "original_height": frame[1], "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation}}


def click(rid: str, x: float, y: float, positive: bool = True) -> dict:
    return {"id": rid, "from_name": "point", "to_name": "image", "type": "keypoint", "origin": "manual",
            "original_width": W, "original_height": H, "image_rotation": 0, "is_positive": positive,
            "value": {"x": x, "y": y, "width": 0.5, "labels": []}}


def labelled(mask: np.ndarray | None = None, refined_by: str = "grabcut") -> RegionResult:
    meta = {"mask": encode_mask(mask), "refined_by": refined_by} if mask is not None else {}
    return RegionResult(id="x", labels=(LabelScore("car", 0.9), LabelScore("dog", 0.1)), caption="a car",
                        meta=meta)


# -- which controls mark objects ----------------------------------------------------------------------------------
def test_the_shipped_polygon_and_brush_configs_mark_objects_with_a_smart_box_or_clicks(cfgs):
    for name, kind in (("polygon", "polygon"), ("brush", "brush")):
        cfg = cfgs[name]
        for prompt_name, prompt_kind in (("box", "rectangle"), ("point", "keypoint")):
            control = cfg.control(prompt_name)
            assert control is not None and control.kind == prompt_kind
            assert control.output is cfg.control("label") and control.output.kind == kind
            assert control.labels == cfg.control("label").labels and control.labels_control == "label"
    assert cfgs["rectangle"].control("label").answers_as is None  # a smart rectangle is labelled as drawn


def test_a_smart_only_box_without_polygon_or_brush_is_an_ordinary_rectangle():
    cfg = parse_label_config('<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image" '
                             'smart="true" smartOnly="true"><Label value="a"/></RectangleLabels></View>')
    assert cfg.control("r").answers_as is None and cfg.control("r").output is cfg.control("r")


def test_prompt_controls_come_after_the_controls_they_answer_as_whatever_the_config_order():
    cfg = parse_label_config('<View><Image name="image" value="$image"/><Rectangle name="box" toName="image" '
                             'smartOnly="true"/><PolygonLabels name="p" toName="image"><Label value="a"/>'
                             '</PolygonLabels></View>')
    assert list(cfg.region_controls) == ["p", "box"] and cfg.control("box").output is cfg.control("p")


def test_a_box_without_smart_only_next_to_polygons_is_labelled_as_drawn():
    cfg = parse_label_config('<View><Image name="image" value="$image"/><PolygonLabels name="p" toName="image">'
                             '<Label value="a"/></PolygonLabels><RectangleLabels name="r" toName="image" smart="true">'
                             '<Label value="b"/></RectangleLabels></View>')
    assert cfg.control("r").answers_as is None and cfg.control("r").labels == ("b",)


def test_keypoints_outside_a_prompt_control_are_refused_with_what_to_change(cfgs):
    regions, problems = collect_regions([{**click("k1", 10, 10), "from_name": "nowhere"}], cfgs["polygon"])
    assert not regions and 'smartOnly="true"' in problems[0].error


# -- keypoints: one object per control ----------------------------------------------------------------------------
def test_positive_clicks_of_one_control_form_one_region_named_by_the_first(cfgs):
    items = [click("k1", 10, 10), click("k2", 20, 30, positive=False), click("k3", 30, 40)]
    regions, problems = collect_regions(items, cfgs["polygon"])
    assert not problems and len(regions) == 1
    region = regions[0]
    assert region.id == "k1" and [m["id"] for m in region.members] == ["k3"]
    assert region_prompt(region) == {"points": [[20.0, 10.0], [60.0, 40.0]]}
    mask = region_mask(region)
    assert mask.shape == (H, W) and mask[10, 20] and mask[40, 60] and not mask[30, 40]


def test_only_negative_clicks_give_no_region(cfgs):
    assert collect_regions([click("k1", 10, 10, positive=False)], cfgs["polygon"]) == ([], [])


def test_clicks_beyond_the_prompt_cap_are_reported_and_left_out(cfgs):
    items = [click(f"k{i}", 1 + i, 50) for i in range(MAX_PROMPT_POINTS + 2)]
    regions, problems = collect_regions(items, cfgs["polygon"])
    assert len(region_prompt(regions[0])["points"]) == MAX_PROMPT_POINTS
    assert [p.id for p in problems] == [f"k{i}" for i in (MAX_PROMPT_POINTS, MAX_PROMPT_POINTS + 1)]


# -- the box prompt in pixels -------------------------------------------------------------------------------------
def test_a_box_prompt_is_in_pixels_of_the_image(cfgs):
    (region,), _ = collect_regions([box()], cfgs["polygon"])
    assert region_prompt(region) == {"box": [20.0, 20.0, 80.0, 60.0]}
    assert region_prompt(region, (400, 200)) == {"box": [40.0, 40.0, 160.0, 120.0]}  # frame != fetched image


def test_a_rotated_box_prompt_is_its_bounding_box_clipped_to_the_image(cfgs):
    (region,), _ = collect_regions([box(x=90, y=0, w=20, h=50, rotation=90)], cfgs["polygon"])
    x0, y0, x1, y1 = region_prompt(region)["box"]
    assert (x0, y0, x1, y1) == (pytest.approx(130.0), 0.0, 180.0, pytest.approx(40.0))


def test_polygons_and_brush_strokes_have_no_prompt(cfgs):
    poly = {"id": "p", "from_name": "label", "to_name": "image", "type": "polygonlabels", "original_width": W,
            "original_height": H, "value": {"points": [[1, 1], [50, 1], [50, 50]], "polygonlabels": ["car"]}}
    (region,), _ = collect_regions([poly], cfgs["polygon"])
    assert region_prompt(region) is None


# -- the answer: a polygon / brush region of the object ------------------------------------------------------------
def test_a_refined_mask_becomes_the_polygon_answering_the_box(cfgs):
    (region,), _ = collect_regions([box()], cfgs["polygon"])
    mask = np.zeros((H, W), bool)
    mask[30:50, 40:70] = True  # the object inside the box
    items = region_results(region, labelled(mask), cfgs["polygon"])
    poly = next(r for r in items if r["type"] == "polygonlabels")
    caption = next(r for r in items if r["type"] == "textarea")
    assert poly["id"] == caption["id"] == "b1" and poly["from_name"] == "label" and caption["from_name"] == "caption"
    assert poly["value"]["polygonlabels"] == ["car"] and poly["meta"]["refined_by"] == "grabcut"
    xs = [p[0] for p in poly["value"]["points"]]
    ys = [p[1] for p in poly["value"]["points"]]
    assert min(xs) == pytest.approx(20.25, abs=0.5) and max(xs) == pytest.approx(34.75, abs=0.5)
    assert min(ys) == pytest.approx(30.5, abs=1) and max(ys) == pytest.approx(49.5, abs=1)
    assert caption["value"]["points"] == poly["value"]["points"] and caption["value"]["text"] == ["a car"]
    assert poly["original_width"] == W and "x" not in poly["value"]  # no rectangle geometry left over
    assert cfgs["polygon"].validate_prediction({"result": items}) == []


def test_without_a_refined_mask_the_box_itself_is_the_polygon(cfgs):
    (region,), _ = collect_regions([box(x=10, y=20, w=30, h=40)], cfgs["polygon"])
    geometry, how = outlined_geometry(region, labelled())
    assert how == "box" and geometry == {"points": [[10.0, 20.0], [40.0, 20.0], [40.0, 60.0], [10.0, 60.0]]}


def test_a_malformed_refined_mask_falls_back_to_the_box(cfgs):
    (region,), _ = collect_regions([box()], cfgs["polygon"])
    res = RegionResult(id="x", labels=(LabelScore("car", 0.9),), meta={"mask": {"shape": [2, 2], "bits_b64": "!"}})
    assert outlined_geometry(region, res)[1] == "box"


def test_clicks_without_a_refined_mask_give_the_discs_outline(cfgs):
    (region,), _ = collect_regions([click("k1", 50, 50)], cfgs["polygon"])
    geometry, how = outlined_geometry(region, labelled())
    assert how == "box" and len(geometry["points"]) >= 4
    assert all(40 < x < 60 and 40 < y < 60 for x, y in geometry["points"])


def test_in_a_brush_project_the_object_is_painted(cfgs):
    (region,), _ = collect_regions([box()], cfgs["brush"])
    mask = np.zeros((H, W), bool)
    mask[30:50, 40:70] = True
    items = region_results(region, labelled(mask, "seeds"), cfgs["brush"])
    painted = next(r for r in items if r["type"] == "brushlabels")
    assert painted["from_name"] == "label" and painted["value"]["format"] == "rle"
    assert painted["value"]["brushlabels"] == ["car"] and painted["meta"]["refined_by"] == "seeds"
    back = dict(region.item, type="brushlabels", from_name="label", value=painted["value"])
    (decoded,), _ = collect_regions([back], cfgs["brush"])
    assert (region_mask(decoded) == mask).all()
