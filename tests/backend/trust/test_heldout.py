"""backend.trust.heldout: the backend scores as the worker does; folds keep regions together."""

from __future__ import annotations

import numpy as np

from backend.learning.fit import fit_prototypes, vision_prototypes
from backend.trust.heldout import fold_of, heldout_predictions, label_probabilities


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_label_probabilities_equal_the_workers_scoring():
    from worker.text.prototypes import combined_logits

    rng = np.random.default_rng(0)
    text = rng.normal(size=(4, 8))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    ex, ey = rng.normal(size=(12, 8)), np.array([0, 0, 1, 1, 2, 2] * 2)  # label 3 has no examples
    w, b = fit_prototypes(text, ex, ey, 20.0, steps=20)
    means, counts = vision_prototypes(text, ex, ey)
    x = rng.normal(size=(5, 8))
    ours = label_probabilities(x, text, 20.0, w, b, means, counts)
    theirs = _softmax(combined_logits(x, text, 20.0, w, b, means, counts).astype(np.float64))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    zero = np.zeros(4, np.int64)
    np.testing.assert_allclose(label_probabilities(x, text, 20.0, w, b, means, zero),
                               _softmax(combined_logits(x, text, 20.0).astype(np.float64)), atol=1e-5)


def test_folds_never_split_a_group():
    groups = ["a", "a", "b", "b", "b", "c", "d", "d", "e", "e"]
    fold = fold_of(groups, 3)
    assert len(set(fold)) == 3
    for g in set(groups):
        assert len({f for f, h in zip(fold, groups) if h == g}) == 1
    assert list(fold) == sorted(fold)


def test_held_out_suggestions_are_right_on_separable_data():
    rng = np.random.default_rng(1)
    text = np.eye(3, 6)
    y = np.repeat(np.arange(3), 10)
    x = text[y] + 0.05 * rng.normal(size=(30, 6))
    pred, score = heldout_predictions(text, 20.0, x, y, [str(i) for i in range(30)], folds=5)
    assert (pred == y).mean() > 0.9 and np.all((score > 0) & (score <= 1))
