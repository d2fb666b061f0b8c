"""backend.trust.score: uncertainty + coverage, objectness for proposals, the task's score."""

from __future__ import annotations

from backend.trust.score import coverage, region_priority, task_score


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
