"""A box or clicks drawn with a polygon/brush project's smart tools, through /predict in embedded mode (tiny model):
the job's regions carry the prompt with ``refine``, and the answer is a polygon (or brush) region of the object with
the same id, the label and the caption; rectangles in rectangle projects keep their geometry."""

from __future__ import annotations

import numpy as np
import pytest

from worker.protocol import InversionParams, MemoryResultCache, RegionPrompt, region_digest

from backend.dispatch.base import Dispatcher, LabelRequest
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.regions import collect_regions
from backend.predict.plan import job_prompt
from backend_support import H, W, config, png_bytes, predict, rect, settings_for, task


def box_item(rid: str = "b1") -> dict:
    return {"id": rid, "from_name": "box", "to_name": "image", "type": "rectangle", "origin": "manual",
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": 10.0, "y": 10.0, "width": 50.0, "height": 60.0, "rotation": 0}}


def click_item(rid: str, x: float, y: float) -> dict:
    return {"id": rid, "from_name": "point", "to_name": "image", "type": "keypoint", "origin": "manual",
            "original_width": W, "original_height": H, "image_rotation": 0, "is_positive": True,
            "value": {"x": x, "y": y, "width": 0.5, "labels": []}}


def test_job_prompt_refines_marks_and_keeps_rectangles_as_drawn():
    poly_cfg, rect_cfg = parse_label_config(config("polygon")), parse_label_config(config("rectangle"))
    (marked,), _ = collect_regions([box_item()], poly_cfg)
    (drawn,), _ = collect_regions([rect("r1")], rect_cfg)
    assert job_prompt(marked, (W, H), 10**8) == {"prompt": {"box": [8.0, 6.0, 48.0, 42.0]}, "refine": True}
    assert job_prompt(drawn, (W, H), 10**8) == {"prompt": {"box": [8.0, 6.0, 40.0, 36.0]}, "refine": False}


def test_the_label_job_carries_prompt_and_refine_and_keys_regions_by_them():
    class Payloads(Dispatcher):
        def model_info(self, wait_s: float = 0.0):
            return None

    mask = np.zeros((H, W), bool)
    mask[5:20, 5:30] = True
    prompts = [{"prompt": {"box": [5, 5, 30, 20]}, "refine": True}, {}]
    req = LabelRequest(png_bytes(W, H), [mask, mask], ["car", "dog"], InversionParams(), prompts=prompts)
    prepared = Payloads(settings_for("prompts"), MemoryResultCache(16, 60))._prepare(req, None)
    regions = prepared.payload["regions"]
    assert len(regions) == 2 and prepared.shas[0] != prepared.shas[1]  # same mask, different questions
    refined = next(r for r in regions if r.get("refine"))
    assert refined["prompt"] == {"box": [5.0, 5.0, 30.0, 20.0]}
    assert refined["id"] == region_digest(refined["mask"]["sha256"], RegionPrompt(box=(5, 5, 30, 20)), True)
    assert next(r for r in regions if not r.get("refine")).keys() == {"id", "mask"}


@pytest.mark.parametrize("context", ["box", "clicks"])
def test_a_box_or_clicks_in_a_polygon_project_come_back_as_a_labelled_captioned_polygon(client, context):
    items = [box_item()] if context == "box" else [click_item("k1", 30, 40), click_item("k2", 35, 45)]
    resp = predict(client, "polygon", [task(1)], {"result": items})
    assert resp.status_code == 200, resp.get_json()
    (answer,) = resp.get_json()["results"]
    polys = [r for r in answer["result"] if r["type"] == "polygonlabels"]
    assert len(polys) == 1 and polys[0]["id"] == items[0]["id"] and polys[0]["from_name"] == "label"
    assert len(polys[0]["value"]["points"]) >= 3 and polys[0]["value"]["polygonlabels"][0]
    assert polys[0]["meta"]["refined_by"] in ("grabcut", "seeds", "sam", "box")
    captions = [r for r in answer["result"] if r["type"] == "textarea"]
    assert [c["id"] for c in captions] == [items[0]["id"]] and captions[0]["value"]["text"][0]
    assert not [r for r in answer["result"] if r["type"] in ("rectangle", "keypoint")]
    assert parse_label_config(config("polygon")).validate_prediction(answer) == []


def test_a_box_in_a_brush_project_comes_back_painted(client):
    resp = predict(client, "brush", [task(1)], {"result": [box_item()]})
    assert resp.status_code == 200, resp.get_json()
    (answer,) = resp.get_json()["results"]
    (painted,) = [r for r in answer["result"] if r["type"] == "brushlabels"]
    assert painted["id"] == "b1" and painted["value"]["format"] == "rle" and painted["value"]["brushlabels"]


def test_a_rectangle_in_a_rectangle_project_keeps_its_geometry(client):
    drawn = rect("r1", x=10, y=10, w=40, h=50)
    resp = predict(client, "rectangle", [task(1)], {"result": [drawn]})
    (answer,) = resp.get_json()["results"]
    (out,) = [r for r in answer["result"] if r["type"] == "rectanglelabels"]
    assert {k: out["value"][k] for k in ("x", "y", "width", "height", "rotation")} == \
        {k: drawn["value"][k] for k in ("x", "y", "width", "height", "rotation")}
