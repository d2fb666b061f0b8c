"""Verified suggestions in Label Studio JSON: each region's ``meta`` says its calibrated probability and whether
it is verified, and the verified regions of a task travel once more as a prediction of their own.

Label Studio 1.23 Community stores every prediction an ML backend returns for a task (a list per task is
accepted, each with its own ``model_version``), and its Data Manager action *Create Annotations From
Predictions* turns the predictions of one chosen model version of the selected tasks into annotations, as new
annotations beside any that exist (``data_manager/actions/predictions_to_annotations.py``). The verified
prediction's model version is the main one plus :data:`VERIFIED_SUFFIX`, so a curator picks it there and gets
annotations holding only the verified regions; the other suggestions stay suggestions.
"""

from __future__ import annotations

import copy
from typing import Any

from backend.trust.calibration import Calibration

#: appended to the model version of the prediction holding only verified regions
VERIFIED_SUFFIX = "-verified"


def mark_region(items: list[dict[str, Any]], calibration: Calibration | None, label: str, score: float) -> float:
    """Write ``calibrated`` and ``verified`` into the ``meta`` of one region's labelled items (those with a
    ``score``: not its caption) for its suggested ``label`` with ``score``; returns the probability the region's
    priority uses (calibrated, else ``score``). Without a calibration nothing is verified."""
    verified = calibration is not None and calibration.verified(label, score)
    p = calibration.probability(label, score) if calibration is not None else float(score)
    for item in items:
        meta = item.get("meta")
        if "score" not in item or not isinstance(meta, dict):
            continue
        meta["verified"] = bool(verified)
        if calibration is not None:
            meta["calibrated"] = round(p, 4)
            if verified and isinstance(meta.get("text"), list):
                meta["text"].append(f"verified at {calibration.target:.0%} precision (calibrated {p:.2f})")
    return p


def verified_prediction(answer: dict[str, Any]) -> dict[str, Any] | None:
    """The prediction holding only ``answer``'s verified regions (and their captions), model version
    ``answer["model_version"] + VERIFIED_SUFFIX``, score the lowest calibrated probability among them; None when
    no region is verified."""
    items = answer.get("result")
    if not isinstance(items, list):
        return None
    ids = {it.get("id") for it in items
           if isinstance(it, dict) and isinstance(it.get("meta"), dict) and it["meta"].get("verified") is True}
    if not ids:
        return None
    kept = [copy.deepcopy(it) for it in items if isinstance(it, dict) and it.get("id") in ids]
    probs = [float(it["meta"]["calibrated"]) for it in kept
             if isinstance(it.get("meta"), dict) and isinstance(it["meta"].get("calibrated"), (int, float))]
    return {"result": kept, "score": min(probs) if probs else None,
            "model_version": f"{answer.get('model_version') or ''}{VERIFIED_SUFFIX}"}


def with_verified(answers: list[Any]) -> list[Any]:
    """Batch answers (one per task) with each prediction that holds verified regions replaced by the list
    ``[prediction, verified prediction]`` (Label Studio stores both); other answers unchanged."""
    out: list[Any] = []
    for answer in answers:
        extra = verified_prediction(answer) if isinstance(answer, dict) and "result" in answer else None
        out.append([answer, extra] if extra is not None else answer)
    return out
