"""label_regions with prompts: a refined region is inverted on its refined mask and says so in its meta; bad
prompts fail their region alone; refined answers are cached under their own keys."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from refine_support import disc_scene, iou, save_tiny_sam
from worker.protocol import (InversionParams, LabelRegionsJob, RegionPrompt, box_mask, decode_mask,
                             entries_from_result, encode_mask, payload_region_digest)

BOX = (12.0, 8.0, 38.0, 32.0)


@pytest.fixture(scope="module")
def jobs():
    mp = pytest.MonkeyPatch()
    for k, v in {"MASKINV_MODEL": "maskinv-test-tiny", "MASKINV_PRETRAINED": "none", "MASKINV_DEVICE": "cpu"}.items():
        mp.setenv(k, v)
    from worker.jobs import regions as module
    from worker.jobs import runtime

    mp.setattr(runtime, "_runtime", None)
    yield module
    mp.undo()
    runtime._runtime = None


def scene_png() -> tuple[bytes, np.ndarray]:
    img, obj = disc_scene()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue(), obj


def test_a_refined_region_returns_its_mask_and_method(jobs):
    data, obj = scene_png()
    m = box_mask(BOX, obj.shape)
    job = LabelRegionsJob.build(data, [("plain", m), ("box", m), ("click", np.zeros_like(m))], ["cat", "dog"],
                                InversionParams(size=32, steps=2),
                                prompts={"box": (RegionPrompt(box=BOX), True),
                                         "click": (RegionPrompt(points=((25.0, 20.0),)), True)}).to_dict()
    job["regions"][2]["mask"] = encode_mask(np.pad(np.ones((3, 3), bool), ((18, 29), (23, 34))))
    res = jobs.label_regions(job)
    assert res["model"]["refine"] == "grabcut"
    plain, box, click = res["regions"]
    assert plain["error"] is None and "mask" not in plain["meta"] and "refined_by" not in plain["meta"]
    assert box["error"] is None and box["meta"]["refined_by"] == "grabcut" and box["labels"]
    refined = decode_mask(box["meta"]["mask"])
    assert refined.shape == obj.shape and iou(refined, obj) > 0.9
    assert click["error"] is None and click["meta"]["refined_by"] in ("grabcut", "seeds", "box")
    assert decode_mask(click["meta"]["mask"]).shape == obj.shape
    # the refined region is inverted on the refined mask: its label scores differ from the raw box's
    assert plain["labels"] != box["labels"]


def test_bad_prompts_fail_their_region_alone(jobs):
    data, obj = scene_png()
    m = box_mask(BOX, obj.shape)
    job = LabelRegionsJob.build(data, [("good", m), ("bad", m), ("flag", m)], ["cat"],
                                InversionParams(size=32, steps=1)).to_dict()
    job["regions"][1]["prompt"] = {"box": [5, 5, 5, 9]}
    job["regions"][2]["refine"] = "yes"
    res = jobs.label_regions(job)
    good, bad, flag = res["regions"]
    assert good["error"] is None and good["labels"]
    assert "regions[1].prompt.box must have x1 > x0" in bad["error"]
    assert "regions[2].refine must be true or false" in flag["error"]


def test_refined_answers_are_cached_apart_from_the_raw_box(jobs):
    data, obj = scene_png()
    m = box_mask(BOX, obj.shape)
    job = LabelRegionsJob.build(data, [("raw", m), ("refined", m)], ["cat"], InversionParams(size=32, steps=1),
                                prompts={"refined": (RegionPrompt(box=BOX), True)}).to_dict()
    res = jobs.label_regions(job)
    entries = entries_from_result("p", job, res)
    assert len(entries) == 2  # same mask, two keys
    raw, refined = job["regions"]
    assert payload_region_digest(raw) == raw["mask"]["sha256"] != payload_region_digest(refined)
    stored = {v.get("meta", {}).get("refined_by") for v in entries.values()}
    assert stored == {None, "grabcut"}


def test_rectangles_are_refined_by_sam_when_the_worker_is_set_to(tmp_path, monkeypatch):
    from worker.jobs import regions as module

    pytest.importorskip("transformers")
    tiny_sam = save_tiny_sam(tmp_path / "tiny-sam")

    for k, v in {"MASKINV_MODEL": "maskinv-test-tiny", "MASKINV_PRETRAINED": "none", "MASKINV_DEVICE": "cpu",
                 "MASKINV_SAM_CHECKPOINT": tiny_sam, "MASKINV_REFINE_BOXES": "sam"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("worker.jobs.runtime._runtime", None)  # built with SAM, undone after the test
    data, obj = scene_png()
    m = box_mask(BOX, obj.shape)
    job = LabelRegionsJob.build(data, [("rect", m), ("plain", m)], ["cat"], InversionParams(size=32, steps=1),
                                prompts={"rect": (RegionPrompt(box=BOX), False)}).to_dict()
    res = module.label_regions(job)
    assert res["model"]["refine"] == f"sam;sam={tiny_sam};boxes=sam"
    rect, plain = res["regions"]
    assert rect["error"] is None and rect["meta"]["refined_by"] in ("sam", "grabcut", "seeds", "box")
    assert "mask" not in rect["meta"]  # the annotator's rectangle is kept: no geometry is sent back
    assert "refined_by" not in plain["meta"]
