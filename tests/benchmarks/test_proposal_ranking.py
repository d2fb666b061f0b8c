"""benchmarks.proposal_ranking: the product's selection under a ranking score, on synthetic candidates."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from benchmarks.proposal_ranking import SCORES, Scored, detections
from benchmarks.proposals import Item, coco_ap


def test_objectness_ranking_puts_the_explained_object_first():
    gt = np.zeros((1, 16, 16), bool)
    gt[0, 2:8, 2:8] = True
    background = ~gt[0]
    part = np.zeros((16, 16), bool)
    part[2:5, 2:5] = True
    masks = np.stack([gt[0], background, part])
    probs = np.array([[0.5, 0.5], [0.8, 0.2], [0.1, 0.9]])  # the object: right label, least confident
    s = Scored(masks, probs, loss_final=np.array([0.1, 0.95, 0.9]), loss_start=np.ones(3),
               cos_global=np.zeros(3), area=masks.mean(axis=(1, 2)), source=["maskcut"] * 3)
    item = Item(1, Image.new("RGB", (16, 16)), gt, ["a"])
    by_p = detections([s], [item], ["a", "b"], SCORES["probability (product)"], 0.2, 20)
    by_obj = detections([s], [item], ["a", "b"], SCORES["p x (1 - final loss)^2"], 0.2, 20)
    assert max(by_p, key=lambda d: d["score"])["score"] == 0.9  # the partial candidate, confidently wrong
    assert max(by_obj, key=lambda d: d["score"])["score"] == 0.5 * 0.9 ** 2  # the object the LET explains
    assert coco_ap([item], ["a", "b"], by_obj)[1] >= coco_ap([item], ["a", "b"], by_p)[1]


def test_stability_is_high_for_a_seed_region_and_zero_without_a_seed_inside():
    from benchmarks.proposal_ranking import stability
    from benchmarks.proposals import SCENE_CHECKPOINT, SCENE_MODEL, scene_items
    from worker.proposals import maskcut
    from worker.proposals import pipeline as P
    from worker.engine.engine import MaskInversionEngine
    from worker.engine.models import load_clip

    engine = MaskInversionEngine(load_clip(SCENE_MODEL, str(SCENE_CHECKPOINT)))
    item = scene_items(1)[0][0]
    keys, grid = P.image_keys(engine, item.image, 112)
    region, seeds = maskcut.affinity_seeds(keys, (grid, grid))[0]  # the region most seeds agree on
    speck = np.zeros((112, 112), bool)
    speck[0, 0] = True  # covers no patch by half
    st = stability(engine, item.image, np.stack([P.upsample_grid(region, 112), speck]), 112)
    assert st.shape == (2,) and 0 < st[0] <= 1 and st[1] == 0


def test_before_after_counts_precision_recall_and_the_ceiling_share():
    from benchmarks.proposal_ranking import Labelled, before_after, select_labelled
    from worker.proposals import objectness as obj

    gt = np.zeros((2, 16, 16), bool)
    gt[0, 1:7, 1:7] = True
    gt[1, 9:15, 9:15] = True
    fragment = np.zeros((16, 16), bool)
    fragment[1:3, 1:3] = True
    masks = np.stack([gt[0], fragment, gt[1]])
    x = np.zeros((3, len(obj.FEATURES)))
    x[:, obj.FEATURES.index("stability")] = [1.0, 0.0, 1.0]
    iou = np.array([[1.0, 0.0], [4 / 36, 0.0], [0.0, 1.0]])
    lab = Labelled(masks, np.array([0.6, 0.9, 0.5]), np.array([0, 1, 1]), x, iou)
    truth = Labelled(gt, np.array([0.6, 0.5]), np.array([0, 1]), x[[0, 2]], np.eye(2))
    item = Item(1, Image.new("RGB", (16, 16)), gt, ["a", "b"])
    n = len(obj.FEATURES)
    coef = np.zeros(n)
    coef[obj.FEATURES.index("stability")] = 10.0
    model = obj.ObjectnessModel(np.zeros(n), np.ones(n), coef, -5.0, 0.5, 0.8, 1.0, curve=((0.5, 0.9),))
    assert select_labelled(lab, model.predict(x), 1.0, 0.5, 5, 0.2) == [0, 2]  # the fragment is dropped
    rows = {r["selection"]: r for r in before_after({"16:refined": [lab], "16:gt": [truth]}, [item], ["a", "b"],
                                                    model, 0.8, 5, 0.2)}
    assert rows["before"]["precision"] == pytest.approx(200 / 3, abs=0.01) and rows["before"]["per_image"] == 3
    assert rows["after"]["precision"] == 100.0 and rows["after"]["recall"] == 100.0
    assert rows["after"]["per_image"] == 2 and rows["after"]["ceiling_ap50"] == pytest.approx(100.0)
    assert rows["after"]["share_of_ceiling"] == pytest.approx(rows["after"]["ap50"], abs=0.1)
