"""The project's examples scored out of sample: what the product would have suggested for each (numpy only).

The examples are split into ``folds`` contiguous blocks in the store's order, which keeps each annotation's
examples together (both example stores return them grouped by annotation; a block boundary never splits the
examples of one region). Each block is scored by prototypes fitted on the others (:func:`backend.learning.fit`),
exactly as the worker scores regions (:func:`label_probabilities` is ``worker.jobs.embed.score_regions``'s
softmax of ``worker.text.prototypes.combined_logits``; a test pins them equal). With ``folds`` at least the
number of annotations this is leave-one-annotation-out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from worker.protocol import log_softmax_rows, normalize

from backend.learning.fit import DEFAULT_ANCHOR, fit_prototypes, vision_prototypes

#: weight and logit scale of the vision term (the worker's ``worker.text.prototypes.VISION_WEIGHT`` / ``SCALE``)
VISION_WEIGHT = 1.5
VISION_SCALE = 10.0
#: held-out folds (each costs one prototype fit per example set)
DEFAULT_FOLDS = 5


def label_probabilities(x: np.ndarray, text: np.ndarray, scale: float, weights: np.ndarray, bias: np.ndarray,
                        means: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Label probabilities ``[N, L]`` of embeddings ``x`` ``[N, D]`` (text prototypes ``text`` ``[L, D]``; the
    fitted probe ``weights`` / ``bias``, vision prototypes ``means`` and example ``counts`` per label)."""
    xn = normalize(np.asarray(x, np.float64))
    logits = scale * xn @ np.asarray(text, np.float64).T
    has = np.asarray(counts) > 0
    if has.any():
        probe = scale * (xn @ np.asarray(weights, np.float64)[has].T + np.asarray(bias, np.float64)[has])
        vision = VISION_SCALE * xn @ normalize(np.asarray(means, np.float64)[has]).T
        comb = log_softmax_rows(probe) + VISION_WEIGHT * log_softmax_rows(vision)
        if has.all():
            logits = comb
        else:
            logits[:, has] = comb - comb.max(axis=1, keepdims=True) + logits[:, has].max(axis=1, keepdims=True)
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def fold_of(groups: Sequence[str], folds: int) -> np.ndarray:
    """Fold index ``[N]`` per example: ``folds`` contiguous blocks of about equal size whose boundaries fall only
    where ``groups`` (e.g. region ids, in store order) changes."""
    n = len(groups)
    out = np.zeros(n, int)
    k = max(1, min(int(folds), n))
    fold = 0
    for i in range(1, n):
        if fold + 1 < k and i >= (fold + 1) * n / k and groups[i] != groups[i - 1]:
            fold += 1
        out[i] = fold
    return out


def heldout_predictions(text: np.ndarray, scale: float, x: np.ndarray, y: np.ndarray, groups: Sequence[str],
                        folds: int = DEFAULT_FOLDS, anchor: float = DEFAULT_ANCHOR) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-sample suggestions for examples ``x`` ``[N, F]`` with label indices ``y`` ``[N]`` (``F``: the width of
    ``text`` ``[L, F]``; both from :func:`backend.learning.fit.example_features`, with its ``anchor``): the
    suggested label index ``[N]`` and its probability ``[N]``, each block scored by prototypes fitted on the
    others."""
    y = np.asarray(y, int)
    fold = fold_of(groups, folds)
    predicted = np.zeros(len(y), int)
    score = np.zeros(len(y))
    for f in np.unique(fold):
        test, train = fold == f, fold != f
        if train.any():
            w, b = fit_prototypes(text, x[train], y[train], scale, anchor=anchor)
            means, counts = vision_prototypes(text, x[train], y[train])
        else:
            w, b = np.asarray(text, np.float32), np.zeros(len(text), np.float32)
            means, counts = np.zeros_like(w), np.zeros(len(text), np.int64)
        p = label_probabilities(x[test], text, scale, w, b, means, counts)
        predicted[test] = p.argmax(axis=1)
        score[test] = p.max(axis=1)
    return predicted, score
