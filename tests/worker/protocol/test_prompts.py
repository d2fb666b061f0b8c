"""worker.protocol.prompts: a region's box / click prompt and refine flag, their validation, masks and cache digest."""

from __future__ import annotations

import numpy as np
import pytest

from worker.protocol import (MAX_PROMPT_POINTS, InversionParams, LabelRegionsJob, PayloadError, RegionPrompt,
                             box_mask, encode_mask, entries_from_result, payload_region_digest, points_mask,
                             prompt_mask, region_digest, region_prompt, result_keys)


def test_box_and_points_round_trip():
    box = RegionPrompt.from_dict({"box": [1, 2.5, 10, 20]})
    assert box.kind == "box" and box.box == (1.0, 2.5, 10.0, 20.0)
    assert RegionPrompt.from_dict(box.to_dict()) == box
    pts = RegionPrompt.from_dict({"points": [[3, 4], [5.5, 6]]})
    assert pts.kind == "points" and pts.points == ((3.0, 4.0), (5.5, 6.0))
    assert RegionPrompt.from_dict(pts.to_dict()) == pts


@pytest.mark.parametrize("prompt, match", [
    ("box", "prompt must be an object"),
    ({}, "exactly one key"),
    ({"box": [0, 0, 1, 1], "points": [[0, 0]]}, "exactly one key"),
    ({"box": [0, 0, 1, 1], "extra": 1}, "exactly one key"),
    ({"box": [0, 0, 1]}, r"prompt.box must be \[x0, y0, x1, y1\]"),
    ({"box": [0, 0, "1", 1]}, r"prompt.box\[2\] must be a finite number"),
    ({"box": [0, 0, float("nan"), 1]}, r"prompt.box\[2\] must be a finite number"),
    ({"box": [0, 0, True, 1]}, r"prompt.box\[2\] must be a finite number"),
    ({"box": [0, 0, 1e9, 1]}, r"prompt.box\[2\] must be within"),
    ({"box": [5, 0, 5, 1]}, "x1 > x0 and y1 > y0"),
    ({"box": [0, 3, 5, 1]}, "x1 > x0 and y1 > y0"),
    ({"points": []}, f"1 to {MAX_PROMPT_POINTS}"),
    ({"points": [[1, 1]] * (MAX_PROMPT_POINTS + 1)}, f"1 to {MAX_PROMPT_POINTS}"),
    ({"points": [[1, 1], [2]]}, r"prompt.points\[1\] must be \[x, y\]"),
    ({"points": [[1, None]]}, r"prompt.points\[0\]\[1\] must be a finite number"),
])
def test_bad_prompts_name_the_field(prompt, match):
    with pytest.raises(PayloadError, match=match):
        region_prompt({"prompt": prompt}, "regions[0]")


def test_refine_must_be_boolean_and_needs_a_prompt():
    assert region_prompt({}) == (None, False)
    assert region_prompt({"prompt": {"points": [[1, 2]]}, "refine": True}) == (
        RegionPrompt(points=((1.0, 2.0),)), True)
    with pytest.raises(PayloadError, match=r"regions\[3\].refine must be true or false"):
        region_prompt({"prompt": {"points": [[1, 2]]}, "refine": "yes"}, "regions[3]")
    with pytest.raises(PayloadError, match="refine is true but the region has no prompt"):
        region_prompt({"refine": True})


def test_box_mask_covers_the_box_clipped_to_the_image():
    m = box_mask([2, 1, 6, 4], (8, 10))
    assert m.shape == (8, 10) and m.sum() == 4 * 3 and m[1:4, 2:6].all()
    assert box_mask([-5, -5, 3, 2], (8, 10)).sum() == 3 * 2
    assert box_mask([2.2, 2.2, 2.4, 2.4], (8, 10)).sum() == 1  # a tiny box still marks a pixel
    assert not box_mask([20, 20, 30, 30], (8, 10)).any()


def test_points_mask_draws_a_disc_per_click():
    m = points_mask([[5.5, 5.5], [20, 20]], (12, 12), radius=2)
    assert m[5, 5] and m.sum() == 13 and not m[0, 0]
    assert np.array_equal(prompt_mask(RegionPrompt(points=((5.5, 5.5),)), (12, 12)), points_mask([[5.5, 5.5]],
                                                                                                    (12, 12)))


def test_region_digest_keeps_plain_regions_and_separates_prompts_and_refine():
    sha = "ab" * 32
    assert region_digest(sha) == sha
    box = RegionPrompt(box=(0, 0, 4, 4))
    d_box, d_ref = region_digest(sha, box), region_digest(sha, box, True)
    assert len({sha, d_box, d_ref, region_digest(sha, RegionPrompt(box=(0, 0, 4, 5)), True)}) == 4
    assert region_digest(sha, box.to_dict(), True) == d_ref  # typed or as sent
    assert payload_region_digest({"mask": {"sha256": sha}, "prompt": {"box": [0, 0, 4, 4]}, "refine": True}) == d_ref
    assert payload_region_digest({"mask": "x"}) is None


def test_build_carries_prompts_and_from_dict_keeps_them():
    params = InversionParams(size=64, steps=2)
    mask = box_mask([1, 1, 5, 5], (8, 8))
    prompts = {"b": (RegionPrompt(box=(1, 1, 5, 5)), True)}
    job = LabelRegionsJob.build(b"img", [("a", mask), ("b", mask)], ["cat"], params, prompts=prompts)
    doc = job.to_dict()
    assert "prompt" not in doc["regions"][0] and "refine" not in doc["regions"][0]
    assert doc["regions"][1]["prompt"] == {"box": [1.0, 1.0, 5.0, 5.0]} and doc["regions"][1]["refine"] is True
    assert LabelRegionsJob.from_dict(doc) == job


def test_cache_keys_differ_with_prompt_refine_and_worker_refinement():
    enc = encode_mask(box_mask([1, 1, 5, 5], (8, 8)))
    region = {"id": "r", "mask": enc, "prompt": {"box": [1, 1, 5, 5]}, "refine": True}
    model = {"id": "m", "captions": "retrieval"}
    params = InversionParams(size=64).to_dict()
    plain = result_keys("p", model, "img", [enc["sha256"]], params, ["cat"])[enc["sha256"]]
    d = payload_region_digest(region)
    refined = result_keys("p", model, "img", [d], params, ["cat"])[d]
    other = result_keys("p", {**model, "refine": "grabcut"}, "img", [d], params, ["cat"])[d]
    assert len({plain, refined, other}) == 3
    # the worker writes under the key the backend computes
    result = {"model": {**model, "refine": "grabcut"}, "image_sha256": "img",
              "regions": [{"id": "r", "labels": [{"label": "cat", "score": 1.0}], "caption": None,
                           "caption_mode": None, "error": None}]}
    job = {"regions": [region], "params": params, "labels": ["cat"]}
    assert list(entries_from_result("p", job, result)) == [other]
