"""The learning features: the region embedding beside its masked crop, text over the embedding half."""

from __future__ import annotations

import numpy as np
import pytest

from worker.protocol.features import CROP_FEATURE_SCALE, learning_features, text_features, uses_crops


def test_features_are_the_unit_embedding_beside_the_scaled_unit_crop():
    e, c = np.array([[3.0, 4.0]]), np.array([[0.0, 2.0]])
    f = learning_features(e, c)
    np.testing.assert_allclose(f, [[0.6, 0.8, 0.0, CROP_FEATURE_SCALE]], rtol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        learning_features(e, np.zeros((2, 2)))


def test_text_sees_only_the_embedding_half():
    t = np.array([[1.0, 0.0], [0.0, 1.0]])
    tf = text_features(t)
    assert tf.shape == (2, 4) and not tf[:, 2:].any()
    # so a text's cosine ranks the labels of a region as on the embedding alone
    f = learning_features(np.array([[0.2, 0.9]]), np.array([[1.0, 0.0]]))
    assert np.argmax(f @ tf.T) == np.argmax(np.array([[0.2, 0.9]]) @ t.T)


def test_uses_crops_by_width():
    assert uses_crops(128, 64) and not uses_crops(64, 64)
