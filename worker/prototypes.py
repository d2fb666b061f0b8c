"""Class prototypes from text and annotated examples (torch-free: numpy only; used by the backend and the worker).

The method (chosen on the scene world's val scenes by ``benchmarks/few_shot.py``): a *text-anchored linear
probe*. Each label's weight vector starts at its text prototype ``t_c`` and is fitted to the project's examples
(normalised LETs ``x_i`` with labels ``y_i``) by softmax cross-entropy at CLIP's logit scale, with an L2 pull back
to the text prototypes::

    W = argmin_W  mean_i CE(s * W x_i, y_i) + anchor * sum_c ||w_c - t_c||^2      (W: [L, D])

A region is then scored by ``softmax(s * W x)`` exactly like text prototypes (``W = T`` without examples). Only
the rows of labels that have examples move (``w_c = t_c`` for the others: a label without examples keeps its
text prototype). Adam, ``steps`` full-batch steps from ``W = T``.

Why this and not class means: a LET is the global embedding moved only as far as its map needs (cos 0.71 with
the image's global embedding in the scene world), so class means of LETs carry every example's context; means
alone reach text-only accuracy only at k = 4 per class. The probe keeps the text's knowledge and moves each
prototype only along the directions that separate the examples.

Combined score (what :func:`combined_logits` computes): the probe's log-softmax plus ``VISION_WEIGHT`` times the
log-softmax of the class-mean vision prototypes (``VISION_SCALE * cos(x, mean_c)``), both over the labels that
have examples. When only some labels have examples, that combination only re-ranks *those* labels: it is shifted
so that its best value equals the best text logit among them, and labels without examples keep their text
logits. So the examples never change whether a label without examples wins (top-1) -- the "falls back to text"
guarantee -- and with examples for every label it is the plain combination.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

#: strength of the pull back to the text prototypes (chosen on val; see benchmarks/results/few_shot.md)
DEFAULT_ANCHOR = 1.0
DEFAULT_STEPS = 150
DEFAULT_LR = 0.005
#: weight and logit scale of the class-mean term in the combined score (chosen on val)
VISION_WEIGHT = 1.0
VISION_SCALE = 10.0
#: the class-mean term of a label with n examples is weighted n / (n + VISION_SHRINK)
VISION_SHRINK = 4.0


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` ``[N, D]`` scaled to unit length (zero rows stay zero)."""
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def fit_prototypes(text: np.ndarray, examples: np.ndarray, labels: np.ndarray, logit_scale: float,
                   anchor: float = DEFAULT_ANCHOR, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
                   trainable: np.ndarray | None = None, centred: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Text-anchored probe: weights ``[L, D]`` from text prototypes ``text`` ``[L, D]`` and ``examples`` ``[N, D]``
    with label indices ``labels`` ``[N]`` (see the module docstring).

    ``trainable`` ``[L]`` (bool): rows allowed to move; default: the labels that have examples.
    """
    text = np.asarray(text, np.float64)
    n_labels = text.shape[0]
    if len(examples) == 0:
        return text.astype(np.float32), np.zeros(n_labels, np.float32)
    x = normalize(np.asarray(examples, np.float64))
    y = np.asarray(labels, int)
    if y.min() < 0 or y.max() >= n_labels:
        raise ValueError(f"example labels must be in [0, {n_labels}), got {y.min()}..{y.max()}")
    if trainable is None:
        trainable = np.bincount(y, minlength=n_labels) > 0
    mask = np.asarray(trainable, bool)[:, None]
    onehot = np.eye(n_labels)[y]
    centre = x.mean(axis=0) if centred else np.zeros(x.shape[1])
    xc = x - centre
    base = logit_scale * x @ text.T  # [N, L] text logits
    delta = np.zeros_like(text)
    m, v = np.zeros_like(delta), np.zeros_like(delta)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        p = np.exp(_log_softmax(base + logit_scale * xc @ delta.T))  # [N, L]
        grad = logit_scale * (p - onehot).T @ xc / len(x) + 2 * anchor * delta
        grad *= mask
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        delta -= lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    w = text + delta
    bias = -(delta @ centre)  # [L]: score = s * (w . x + bias)
    return w.astype(np.float32), bias.astype(np.float32)


def encode_vectors(x: np.ndarray, dtype: str = "float32") -> dict:
    """``[N, D]`` -> ``{"dtype", "shape", "data": base64 of the little-endian array}`` (dtype float32 or float16)."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    arr = np.ascontiguousarray(np.asarray(x, dtype="<f4" if dtype == "float32" else "<f2"))
    if arr.ndim != 2:
        raise ValueError(f"expected a [N, D] array, got shape {arr.shape}")
    return {"dtype": dtype, "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_vectors(doc: dict, max_bytes: int = 64 << 20) -> np.ndarray:
    """Inverse of :func:`encode_vectors` -> float32 ``[N, D]``; ValueError on a malformed document."""
    if not isinstance(doc, dict):
        raise ValueError("vectors must be an object {dtype, shape, data}")
    dtype, shape, data = doc.get("dtype"), doc.get("shape"), doc.get("data")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"vectors.dtype must be float32 or float16, got {dtype!r}")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ValueError(f"vectors.shape must be [N, D] with non-negative integers, got {shape!r}")
    if not isinstance(data, str) or len(data) > max_bytes * 4 // 3 + 4:
        raise ValueError("vectors.data must be a base64 string within the size limit")
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError):
        raise ValueError("vectors.data is not valid base64") from None
    item = 4 if dtype == "float32" else 2
    if len(raw) != shape[0] * shape[1] * item:
        raise ValueError(f"vectors.data has {len(raw)} bytes, expected {shape[0] * shape[1] * item} for {shape} {dtype}")
    arr = np.frombuffer(raw, dtype="<f4" if dtype == "float32" else "<f2").reshape(shape).astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("vectors contain non-finite values")
    return arr


def class_means(examples: np.ndarray, labels: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per label: the normalised mean of its normalised examples ``[L, D]`` (zero rows without examples) and the
    example count ``[L]``."""
    x = normalize(np.asarray(examples, np.float64))
    y = np.asarray(labels, int)
    counts = np.bincount(y, minlength=n_labels) if len(y) else np.zeros(n_labels, int)
    sums = np.zeros((n_labels, x.shape[1] if x.ndim == 2 else 0))
    if len(y):
        np.add.at(sums, y, x)
    return normalize(sums).astype(np.float32), counts.astype(np.int64)


def _lsm_rows(z: np.ndarray) -> np.ndarray:
    return _log_softmax(z) if z.shape[1] else z


def combined_logits(x: np.ndarray, text: np.ndarray, logit_scale: float, weights: np.ndarray | None = None,
                    bias: np.ndarray | None = None, means: np.ndarray | None = None,
                    counts: np.ndarray | None = None, vision_weight: float = VISION_WEIGHT,
                    vision_scale: float = VISION_SCALE, shrink: float = None) -> np.ndarray:
    """Logits ``[N, L]`` of embeddings ``x`` ``[N, D]`` against labels with text prototypes ``text`` ``[L, D]`` and,
    optionally, the examples' probe ``weights`` ``[L, D]`` + ``bias`` ``[L]``, class ``means`` ``[L, D]`` and
    ``counts`` ``[L]`` (see the module docstring). Without examples: ``logit_scale * cos(x, text)``."""
    x = normalize(np.asarray(x, np.float64))
    text_logits = logit_scale * x @ np.asarray(text, np.float64).T
    if counts is None or weights is None or not (np.asarray(counts) > 0).any():
        return text_logits.astype(np.float32)
    has = np.asarray(counts) > 0
    probe = logit_scale * (x @ np.asarray(weights, np.float64)[has].T + np.asarray(bias, np.float64)[has])
    vision = vision_scale * x @ normalize(np.asarray(means, np.float64)[has]).T
    shrink = VISION_SHRINK if shrink is None else shrink
    n = np.asarray(counts, np.float64)[has]
    comb = _lsm_rows(probe) + vision_weight * (n / (n + shrink)) * _lsm_rows(vision)
    out = text_logits.copy()
    if has.all():
        return comb.astype(np.float32)
    out[:, has] = comb - comb.max(axis=1, keepdims=True) + text_logits[:, has].max(axis=1, keepdims=True)
    return out.astype(np.float32)


def vision_logits(x: np.ndarray, means: np.ndarray, counts: np.ndarray,
                  vision_scale: float = VISION_SCALE) -> np.ndarray:
    """Vision-only logits ``[N, L]``: ``vision_scale * cos(x, mean_c)``; -inf for labels without examples."""
    out = vision_scale * normalize(np.asarray(x, np.float64)) @ normalize(np.asarray(means, np.float64)).T
    out[:, np.asarray(counts) <= 0] = -np.inf
    return out.astype(np.float32)
