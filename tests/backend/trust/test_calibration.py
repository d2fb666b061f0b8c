"""backend.trust.calibration: isotonic curves, thresholds for a target precision, labels never verified."""

from __future__ import annotations

import numpy as np

from backend.trust.calibration import (MIN_EXAMPLES, PER_LABEL_MIN, Calibration, Curve, fit_calibration, isotonic,
                                       threshold)


def test_isotonic_is_monotone_and_follows_the_rate():
    rng = np.random.default_rng(0)
    score = rng.random(2000)
    right = rng.random(2000) < score  # P(right | score) = score
    xs, ys = isotonic(score, right)
    assert np.all(np.diff(xs) >= 0) and np.all(np.diff(ys) >= 0)
    curve = Curve(tuple(xs), tuple(ys))
    assert abs(float(curve(0.2)) - 0.2) < 0.1 and abs(float(curve(0.8)) - 0.8) < 0.1


def test_threshold_reaches_the_target_on_the_held_out_data():
    rng = np.random.default_rng(1)
    score = rng.random(5000)
    right = rng.random(5000) < score
    t = threshold(score, right, 0.95)
    assert t is not None
    assert right[score >= t].mean() >= 0.93
    assert threshold(score, np.zeros(5000, bool), 0.95) is None  # never right: never verified


def test_labels_with_few_examples_are_never_verified_and_few_suggestions_share_the_curve():
    rng = np.random.default_rng(2)
    n = 600
    predicted = np.where(np.arange(n) < n - 10, 0, 1)  # label b: only 10 held-out suggestions
    score = rng.random(n)
    right = rng.random(n) < score
    cal = fit_calibration(["a", "b", "c"], predicted, score, right, np.array([500, 50, MIN_EXAMPLES - 1]), 0.9)
    assert "a" in cal.curves and "b" not in cal.curves and (predicted == 0).sum() >= PER_LABEL_MIN
    assert cal.probability("b", 0.7) == float(cal.shared(0.7))
    assert "c" not in cal.thresholds and not cal.verified("c", 1.0)
    assert cal.verified("a", 1.0) and not cal.verified("a", 0.0)


def test_calibration_round_trips_through_a_dict():
    cal = fit_calibration(["a"], np.zeros(50, int), np.linspace(0, 1, 50), np.linspace(0, 1, 50) > 0.3,
                          np.array([50]), 0.95)
    again = Calibration.from_dict(cal.to_dict())
    assert again == cal
