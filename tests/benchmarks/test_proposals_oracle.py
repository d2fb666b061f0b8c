"""benchmarks.proposals: the ground-truth-mask oracle row (the AP ceiling of the labeller) on three scenes."""

from __future__ import annotations

import pytest

from benchmarks.proposals import SCENE_CHECKPOINT, SCENE_MODEL, evaluate, scene_items, summary_json


@pytest.fixture(scope="module")
def report():
    from worker.engine.models import load_clip

    clip = load_clip(SCENE_MODEL, str(SCENE_CHECKPOINT))
    items, labels = scene_items(3)
    return evaluate(clip, items, labels, [112], steps=2, min_score=0.0, max_proposals=20,
                    methods=("gt_masks", "sliding_window"), progress=False, refine_settings=(False,))


def test_ground_truth_masks_cover_every_object_and_get_one_setting(report):
    (gt,) = [r for r in report["rows"] if r["method"] == "gt_masks"]
    assert gt["refined"] is True  # one setting, like the colour baseline
    assert gt["recall50"] == gt["recall75"] == gt["recall50_all"] == 100.0
    assert gt["recall50_kept"] == 100.0  # disjoint masks: NMS keeps them all (min_score 0)
    assert gt["candidates_per_image"] == report["objects_all"] / report["images"]
    assert 0.0 <= gt["ap50"] <= 100.0


def test_summary_reports_the_oracle_beside_the_baselines(report):
    report = {**report, "rows": report["rows"] + [
        {**r, "method": m, "refined": ref} for r in report["rows"][:1]
        for m in ("union", "text", "maskcut", "keyseeds", "slic_colour") for ref in (False, True)]}
    head = summary_json(report, 112, True)
    assert set(head["ap50"]) >= {"gt_masks", "sliding_window", "union"}
