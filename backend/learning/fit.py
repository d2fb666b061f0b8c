"""Fitting class prototypes from a project's examples (numpy only, torch-free; the backend side).

The method and why it was chosen are described in :mod:`worker.text.prototypes`, which scores with what is fitted here
(``benchmarks/few_shot.py`` measures it): :func:`fit_prototypes` (the text-anchored probe with a shared
text-to-vision map) and :func:`vision_prototypes` (class means shrunk towards the mapped text). The fitted
weights, biases and vision prototypes travel to the worker in the ``label_regions`` payload (``weights``,
``bias``, ``means``, ``counts``), coded by :func:`worker.protocol.encode_vectors`.
"""

from __future__ import annotations

import numpy as np

from typing import Sequence

from worker.protocol import log_softmax_rows as _log_softmax
from worker.protocol import normalize  # noqa: F401 - part of this module's API
from worker.protocol.features import learning_features, text_features

from backend.learning.examples import Example

#: names the fitting method: part of the prototypes' version (and so of ``model_version`` and the result cache
#: keys), so prototypes fitted by another method from the same examples are never taken for these
FIT_VERSION = "shared-map-prior-crops-1"
#: strength of the pull back to the text prototypes, per label (chosen on val; see benchmarks/results/few_shot.md)
DEFAULT_ANCHOR = 1.0
#: the per-label pull when examples are fitted on learning features (embedding beside the masked crop,
#: :mod:`worker.protocol.features`): the crop half has no text to be pulled to, so the examples lead (chosen on
#: the scene world's val pool, ``benchmarks/active_loop.py``)
FEATURE_ANCHOR = 0.01
#: strength of the pull of the shared text-to-vision map ``M`` back to zero (chosen on val)
DEFAULT_SHARED_ANCHOR = 0.3
DEFAULT_STEPS = 150
DEFAULT_LR = 0.005


def _adam(param: np.ndarray, grad: np.ndarray, state: list[np.ndarray], t: int, lr: float) -> None:
    """One Adam step on ``param`` in place (``state``: first and second moments, updated in place)."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    m, v = state
    m *= b1
    m += (1 - b1) * grad
    v *= b2
    v += (1 - b2) * grad * grad
    param -= lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)


def fit_prototypes(text: np.ndarray, examples: np.ndarray, labels: np.ndarray, logit_scale: float,
                   anchor: float = DEFAULT_ANCHOR, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
                   trainable: np.ndarray | None = None, centred: bool = True,
                   shared_anchor: float | None = DEFAULT_SHARED_ANCHOR) -> tuple[np.ndarray, np.ndarray]:
    """Text-anchored probe with a shared text-to-vision map: weights ``[L, D]`` and biases ``[L]`` from text
    prototypes ``text`` ``[L, D]`` and ``examples`` ``[N, D]`` with label indices ``labels`` ``[N]``.

    Each trainable row is ``w_c = t_c + M t_c + d_c``: ``M`` ``[D, D]`` is shared by all labels (what the
    examples of one label teach about a word, e.g. a shape, moves every label whose text holds that word),
    ``d_c`` is the label's own correction; both are pulled back to zero (``shared_anchor * ||M||^2``,
    ``anchor * sum_c ||d_c||^2``). ``shared_anchor=None`` turns ``M`` off (the per-label probe alone).
    ``trainable`` ``[L]`` (bool): rows allowed to move; default: the labels that have examples.
    """
    text = np.asarray(text, np.float64)
    n_labels, dim = text.shape
    if len(examples) == 0:
        return text.astype(np.float32), np.zeros(n_labels, np.float32)
    x = normalize(np.asarray(examples, np.float64))
    y = np.asarray(labels, int)
    if y.min() < 0 or y.max() >= n_labels:
        raise ValueError(f"example labels must be in [0, {n_labels}), got {y.min()}..{y.max()}")
    if trainable is None:
        trainable = np.bincount(y, minlength=n_labels) > 0
    mask = np.asarray(trainable, bool)[:, None].astype(np.float64)
    onehot = np.eye(n_labels)[y]
    centre = x.mean(axis=0) if centred else np.zeros(dim)
    xc = x - centre
    base = logit_scale * x @ text.T  # [N, L] text logits
    shared = np.zeros((dim, dim))
    own = np.zeros_like(text)
    s_state = [np.zeros_like(shared), np.zeros_like(shared)]
    o_state = [np.zeros_like(own), np.zeros_like(own)]
    for t in range(1, steps + 1):
        delta = mask * (text @ shared.T + own)  # [L, D]
        p = np.exp(_log_softmax(base + logit_scale * xc @ delta.T))  # [N, L]
        g_delta = mask * (logit_scale * (p - onehot).T @ xc / len(x))  # [L, D]
        _adam(own, g_delta + 2 * anchor * own, o_state, t, lr)
        if shared_anchor is not None:
            _adam(shared, g_delta.T @ text + 2 * shared_anchor * shared, s_state, t, lr)
    delta = mask * (text @ shared.T + own)
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


#: examples' worth of the text-mapped prior in each label's vision prototype, and the ridge of that map (val)
DEFAULT_PRIOR = 16.0
DEFAULT_RIDGE = 1.0


def vision_prototypes(text: np.ndarray, examples: np.ndarray, labels: np.ndarray, prior: float = DEFAULT_PRIOR,
                      ridge: float = DEFAULT_RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """Class means shrunk towards the text mapped into the vision cone: per label ``[L, D]`` (zero rows without
    examples) and the example count ``[L]``.

    A ridge map ``x ≈ A [t_y; 1]`` from text prototypes ``text`` ``[L, D]`` to the normalised ``examples``
    ``[N, D]`` is fitted on all the examples (one map for the project's labels: it bridges the modality gap);
    label ``c`` with ``n_c`` examples then gets ``normalize((sum_i x_i + prior * A [t_c; 1]) / (n_c + prior))``.
    A label with one example is thus mostly where the other labels' examples put its text, and ``n_c >> prior``
    gives its plain class mean.
    """
    text = np.asarray(text, np.float64)
    n_labels, dim = text.shape
    y = np.asarray(labels, int)
    if len(y) == 0:
        return np.zeros((n_labels, dim), np.float32), np.zeros(n_labels, np.int64)
    x = normalize(np.asarray(examples, np.float64))
    counts = np.bincount(y, minlength=n_labels)
    z = np.hstack([text, np.ones((n_labels, 1))])  # [L, D + 1]
    zy = z[y]
    a = np.linalg.solve(zy.T @ zy + ridge * np.eye(dim + 1), zy.T @ x)  # [D + 1, D]
    sums = np.zeros((n_labels, dim))
    np.add.at(sums, y, x)
    protos = (sums + prior * (z @ a)) / (counts[:, None] + prior)
    protos[counts == 0] = 0.0
    return normalize(protos).astype(np.float32), counts.astype(np.int64)


def example_features(examples: Sequence[Example], text: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """What ``examples`` are fitted on: (features ``[N, F]``, text prototypes ``[L, F]``, per-label anchor).
    Learning features (``F = 2D``: each embedding beside its masked crop, text over the embedding half,
    :data:`FEATURE_ANCHOR`) when every example kept its crop; else the embeddings alone (``F = D``, examples
    stored before crops were kept, or a project that mixes no crop in; :data:`DEFAULT_ANCHOR`)."""
    x = np.stack([np.asarray(e.let, np.float32) for e in examples])
    crops = [e.crop for e in examples]
    if all(c is not None and np.shape(c) == x.shape[1:] for c in crops):
        return learning_features(x, np.stack(crops)), text_features(text), FEATURE_ANCHOR  # type: ignore[arg-type]
    return x, np.asarray(text, np.float32), DEFAULT_ANCHOR
