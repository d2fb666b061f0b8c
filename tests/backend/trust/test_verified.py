"""backend.trust.verified: region meta, the prediction of verified regions, batch answers with both."""

from __future__ import annotations

import numpy as np

from backend.trust.calibration import fit_calibration
from backend.trust.verified import VERIFIED_SUFFIX, mark_region, verified_prediction, with_verified


def _calibration():
    score = np.linspace(0.01, 1.0, 400)
    right = score > 0.5  # right exactly above 0.5
    return fit_calibration(["cat", "dog"], np.zeros(400, int), score, right, np.array([200, 2]), 0.95)


def _answer(cal):
    items = []
    for rid, label, score in (("a", "cat", 0.9), ("b", "cat", 0.2), ("c", "dog", 0.99)):
        region = {"id": rid, "type": "rectanglelabels", "value": {"rectanglelabels": [label]}, "score": score,
                  "meta": {"text": [f"MaskInversion top-1: {label}"]}}
        caption = {"id": rid, "type": "textarea", "value": {"text": [f"a {label}"]}}
        mark_region([region, caption], cal, label, score)
        items += [region, caption]
    return {"result": items, "score": 0.5, "model_version": "maskinversion-x-1234"}


def test_regions_say_calibrated_and_verified_and_labels_without_examples_never_verify():
    answer = _answer(_calibration())
    meta = {it["id"]: it["meta"] for it in answer["result"] if "score" in it}
    assert meta["a"]["verified"] is True and meta["a"]["calibrated"] > 0.9
    assert "verified at 95% precision" in meta["a"]["text"][-1]
    assert meta["b"]["verified"] is False and meta["b"]["calibrated"] < 0.5
    assert meta["c"]["verified"] is False  # two examples of dog: never verified, whatever its score


def test_without_calibration_nothing_is_verified():
    region = {"id": "a", "score": 0.99, "meta": {"text": []}}
    assert mark_region([region], None, "cat", 0.99) == 0.99
    assert region["meta"] == {"text": [], "verified": False}


def test_the_verified_prediction_holds_only_verified_regions_and_their_captions():
    answer = _answer(_calibration())
    v = verified_prediction(answer)
    assert v is not None and v["model_version"] == "maskinversion-x-1234" + VERIFIED_SUFFIX
    assert {it["id"] for it in v["result"]} == {"a"} and len(v["result"]) == 2
    assert len(answer["result"]) == 6  # the main prediction keeps every suggestion


def test_batch_answers_get_a_second_prediction_only_when_something_is_verified():
    cal = _calibration()
    verified, unverified = _answer(cal), _answer(None)
    out = with_verified([verified, unverified, [], {"error": "x"}])
    assert isinstance(out[0], list) and out[0][0] is verified and out[0][1]["model_version"].endswith(VERIFIED_SUFFIX)
    assert out[1] is unverified and out[2] == [] and out[3] == {"error": "x"}
