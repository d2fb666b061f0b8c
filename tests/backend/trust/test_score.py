"""backend.trust.score: uncertainty + coverage, objectness for proposals, the task's score."""

from __future__ import annotations

import pytest

from backend.trust.score import coverage, prediction_score, region_priority, task_score


def test_uncertain_and_uncovered_regions_come_first():
    assert region_priority(0.3, 0) > region_priority(0.9, 0)  # uncertain first
    assert region_priority(0.6, 0) > region_priority(0.6, 20)  # a label without examples first
    assert coverage(0) == 1.0 and coverage(3) == 0.5
    assert 0.0 <= region_priority(0.0, 0) <= 1.0 and 0.0 <= region_priority(1.0, 1000) <= 1.0


def test_proposals_are_weighted_by_objectness():
    assert region_priority(0.3, 0, objectness=0.1) < region_priority(0.3, 0, objectness=0.9)
    assert region_priority(0.3, 0, objectness=0.0) == 0.0


def test_task_score_is_low_for_the_task_to_label_first():
    a = task_score([region_priority(0.95, 30), region_priority(0.2, 0)])
    b = task_score([region_priority(0.95, 30)])
    assert a is not None and b is not None and a < b
    assert task_score([]) is None


def test_a_region_far_from_every_labelled_region_comes_first():
    near = region_priority(0.5, 30, similarity=0.98)
    far = region_priority(0.5, 30, similarity=0.4)
    assert far > near
    assert coverage(30, similarity=0.4) == pytest.approx(0.6) and coverage(0, similarity=-0.2) == 1.0
    assert 0.0 <= region_priority(0.0, 0, similarity=-1.0) <= 1.0 and region_priority(1.0, 0, similarity=1.0) == 0.0


def test_prediction_score_reads_labelled_similarity_and_falls_back_to_example_counts():
    def item(**meta: object) -> dict:
        return {"id": "r", "score": 0.6, "meta": {"calibrated": 0.6, "examples": 2, **meta}}

    fallback = prediction_score([item()])
    assert fallback == task_score([region_priority(0.6, 2)])
    assert prediction_score([item(labelled_similarity=0.9)]) == task_score([region_priority(0.6, 2, similarity=0.9)])
    assert prediction_score([item(labelled_similarity=None)]) == fallback  # unknown: the count coverage
    near = prediction_score([item(labelled_similarity=0.99)])
    far = prediction_score([item(labelled_similarity=0.3)])
    assert near is not None and far is not None and far < near  # far from the labelled regions: label first
