"""backend.trust.project: a calibration from an example store's examples."""

from __future__ import annotations

import numpy as np

from backend.learning.examples import Example
from backend.trust.project import MIN_CALIBRATION_EXAMPLES, calibrate_examples

DIM = 8


def examples(n_per_label: int, labels: list[str], noise: float, seed: int = 0) -> tuple[np.ndarray, list[Example]]:
    rng = np.random.default_rng(seed)
    text = np.eye(len(labels), DIM)
    out = []
    for a in range(n_per_label):  # one annotation per round: a region of every label
        for i, lab in enumerate(labels):
            out.append(Example(f"a{a}-r{i}", lab, "m", (text[i] + noise * rng.normal(size=DIM)).astype(np.float32)))
    return text, out


def test_separable_labels_are_verified_and_a_label_absent_from_the_examples_is_not():
    text, ex = examples(15, ["cat", "dog", "fox"], 0.05)
    cal = calibrate_examples(np.vstack([text, np.eye(DIM)[3]]), 20.0, ["cat", "dog", "fox", "owl"], ex, 0.95)
    assert cal is not None and cal.heldout == len(ex)
    assert set(cal.thresholds) == {"cat", "dog", "fox"}
    assert cal.verified("cat", 1.0) and not cal.verified("owl", 1.0)


def test_too_few_examples_give_no_calibration():
    text, ex = examples(1, ["cat", "dog"], 0.05)
    assert len(ex) < MIN_CALIBRATION_EXAMPLES
    assert calibrate_examples(text, 20.0, ["cat", "dog"], ex, 0.95) is None


def test_noise_means_nothing_is_verified_at_a_high_target():
    text, ex = examples(10, ["cat", "dog", "fox"], 3.0)
    cal = calibrate_examples(text, 20.0, ["cat", "dog", "fox"], ex, 0.99)
    assert cal is not None and not cal.thresholds
