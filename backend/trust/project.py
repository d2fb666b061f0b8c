"""A project's calibration from its example store (numpy only): what ``backend.learning.learner`` caches per
example set and ``/predict`` reads for every suggestion."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from backend.learning.examples import Example
from backend.learning.fit import example_features
from backend.trust.calibration import Calibration, fit_calibration
from backend.trust.heldout import DEFAULT_FOLDS, heldout_predictions

#: examples a calibration is fitted on at most (evenly spaced in the store's order beyond it): bounds its cost to
#: ``DEFAULT_FOLDS`` prototype fits on this many examples, once per example set
MAX_CALIBRATION_EXAMPLES = 4000
#: examples a project needs before anything is calibrated
MIN_CALIBRATION_EXAMPLES = 10


def calibrate_examples(text: np.ndarray, scale: float, labels: Sequence[str], examples: Sequence[Example],
                       target: float, folds: int = DEFAULT_FOLDS) -> Calibration | None:
    """The calibration of ``labels`` (text prototypes ``text`` ``[L, D]``, logit ``scale``) from ``examples`` of
    those labels, in the store's order (grouped by annotation); None with fewer than
    :data:`MIN_CALIBRATION_EXAMPLES` examples."""
    index = {lab: i for i, lab in enumerate(labels)}
    used = [e for e in examples if e.label in index]
    if len(used) < MIN_CALIBRATION_EXAMPLES:
        return None
    counts = np.bincount([index[e.label] for e in used], minlength=len(labels))
    if len(used) > MAX_CALIBRATION_EXAMPLES:
        keep = np.linspace(0, len(used) - 1, MAX_CALIBRATION_EXAMPLES).astype(int)
        used = [used[i] for i in keep]
    x, features_text, anchor = example_features(used, text)
    y = np.asarray([index[e.label] for e in used])
    predicted, score = heldout_predictions(features_text, scale, x, y, [e.region_id for e in used], folds, anchor)
    return fit_calibration(list(labels), predicted, score, predicted == y, counts, target)
