"""What a project's examples are learned on: each region's embedding beside its masked crop.

A region's embedding (the LET mixed with its masked crop, ``worker.engine.embedding.mix_crop``) is what text
scores best zero-shot, but in a sum the LET's variation swamps the crop's, and the crop is what separates labels
once a person has labelled some (scene world, 500 labels: a probe on the crop alone is right 91 % of the time, on
the mix 62 %). So the learned classifier (``backend.learning.fit``; scored by
``worker.text.prototypes.combined_logits`` and ``backend.trust.heldout``) sees both, concatenated::

    features = [unit(embedding), CROP_FEATURE_SCALE * unit(crop)]      [N, 2D]
    text     = [t, 0]                                                   [L, 2D]

Text prototypes see only the embedding half, so a label without examples is scored as zero-shot ranks it. The
scale and the examples' anchor (``backend.learning.fit.FEATURE_ANCHOR``) were chosen on the scene world's val pool
(``benchmarks/active_loop.py``). Torch-free: the backend fits, the worker scores, with these same functions.
"""

from __future__ import annotations

import numpy as np

#: weight of the unit masked crop beside the unit region embedding in the learning features
CROP_FEATURE_SCALE = 10.0


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def learning_features(embeddings: np.ndarray, crops: np.ndarray, scale: float = CROP_FEATURE_SCALE) -> np.ndarray:
    """``[N, 2D]`` features of regions with embeddings ``[N, D]`` and masked-crop embeddings ``[N, D]``."""
    e, c = np.atleast_2d(embeddings), np.atleast_2d(crops)
    if e.shape != c.shape:
        raise ValueError(f"embeddings and crops must have the same shape, got {e.shape} and {c.shape}")
    return np.concatenate([_unit(e), scale * _unit(c)], axis=1).astype(np.float32)


def text_features(text: np.ndarray) -> np.ndarray:
    """Text prototypes ``[L, D]`` as ``[L, 2D]`` learning features (zeros over the crop half)."""
    t = np.atleast_2d(np.asarray(text, np.float32))
    return np.concatenate([t, np.zeros_like(t)], axis=1)


def uses_crops(width: int, dim: int) -> bool:
    """Whether prototypes of ``width`` columns are over learning features of a ``dim``-wide model (else over the
    embedding alone: examples stored before crops were kept, or a project embedding without crops)."""
    return int(width) == 2 * int(dim)
