"""Fitting class prototypes from a project's examples (numpy only, torch-free; the backend side).

The method and why it was chosen are described in :mod:`worker.prototypes`, which scores with what is fitted here
(``benchmarks/few_shot.py`` measures it). The fitted weights, biases and class means travel to the worker in the
``label_regions`` payload, coded by :func:`worker.protocol.encode_vectors`.
"""

from __future__ import annotations

import numpy as np

from worker.protocol import log_softmax_rows as _log_softmax
from worker.protocol import normalize  # noqa: F401 - part of this module's API

#: strength of the pull back to the text prototypes (chosen on val; see benchmarks/results/few_shot.md)
DEFAULT_ANCHOR = 1.0
DEFAULT_STEPS = 150
DEFAULT_LR = 0.005


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
