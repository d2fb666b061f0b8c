"""Region-embedding arithmetic: the two-view combination and the masked-crop mix."""

from __future__ import annotations

import numpy as np

from worker.engine.embedding import combine_views, mix_crop


def test_combine_views_shapes_and_scale():
    rng = np.random.default_rng(0)
    lets = rng.normal(size=(2, 5, 8)).astype(np.float32)
    out = combine_views(lets)
    assert out.shape == (5, 8)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), np.linalg.norm(lets[0], axis=1), rtol=1e-5)
    unit = lets / np.linalg.norm(lets, axis=2, keepdims=True)
    d = unit.sum(0)
    np.testing.assert_allclose(out / np.linalg.norm(out, axis=1, keepdims=True),
                               d / np.linalg.norm(d, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(combine_views(lets[:1]), lets[0], rtol=1e-6)


def test_mix_crop_directions_and_scale():
    rng = np.random.default_rng(1)
    lets, crops = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(4, 8)).astype(np.float32) * 3
    np.testing.assert_array_equal(mix_crop(lets, crops, 0.0), lets)
    out = mix_crop(lets, crops, 2.0)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), np.linalg.norm(lets, axis=1), rtol=1e-5)
    u = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(u(out), u(u(lets) + 2.0 * u(crops)), rtol=1e-5, atol=1e-6)
    # a zero crop (none could be made) leaves the LET as it is
    np.testing.assert_allclose(mix_crop(lets, np.zeros_like(crops), 1.0), lets, rtol=1e-6)
