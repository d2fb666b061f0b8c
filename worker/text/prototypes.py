"""Scoring with class prototypes from text and annotated examples (numpy only; the worker side).

The prototypes are fitted by the backend (:mod:`backend.learning.fit`) from the project's examples and travel to
the worker in the ``label_regions`` payload (vectors coded by :func:`worker.protocol.encode_vectors`).

The method (chosen on the scene world's val scenes by ``benchmarks/few_shot.py``): a *text-anchored linear
probe with a shared text-to-vision map*. Each label's weight vector starts at its text prototype ``t_c`` and is
fitted to the project's examples (normalised LETs ``x_i`` with labels ``y_i``) by softmax cross-entropy at CLIP's
logit scale, with L2 pulls back to the text prototypes::

    w_c = t_c + M t_c + d_c       (M: [D, D] shared by every label, d_c: [D] the label's own)
    M, d = argmin  mean_i CE(s * W x_i, y_i) + shared_anchor * ||M||^2 + anchor * sum_c ||d_c||^2

``M`` carries what the examples of one label teach to every label whose text says the same thing (the examples
of every "... circle" move every circle label); ``d_c`` corrects the label alone. A region is then scored by
``softmax(s * W x)`` exactly like text prototypes (``W = T`` without examples). Only the rows of labels that have
examples move (``w_c = t_c`` for the others: a label without examples keeps its text prototype). Adam,
``steps`` full-batch steps from ``M = 0, d = 0``; what travels is ``W`` and a bias per label, as before.

Why this and not class means: a LET is the global embedding moved only as far as its map needs (cos 0.71 with
the image's global embedding in the scene world), so class means of LETs carry every example's context; means
alone reach text-only accuracy only at k = 4 per class. The probe keeps the text's knowledge and moves each
prototype only along the directions that separate the examples; the shared map lets 8 examples per label
teach more than 8 examples' worth (48.1 -> 49.2 Acc@1 at k = 8 on val with plain class means).

Combined score (what :func:`combined_logits` computes): the probe's log-softmax plus ``VISION_WEIGHT`` times the
log-softmax of the vision prototypes (``VISION_SCALE * cos(x, m_c)``), both over the labels that have examples.
``m_c`` (the payload's ``means``; :func:`backend.learning.fit.vision_prototypes`) is the label's class mean
shrunk towards its text mapped into the vision cone by a ridge map fitted on all the project's examples
(49.2 -> 50.6 Acc@1 at k = 8 on val over plain class means). When only some labels have examples, that
combination only re-ranks *those* labels: it is shifted so that its best value equals the best text logit among
them, and labels without examples keep their text logits. So the examples never change whether a label without
examples wins (top-1) -- the "falls back to text" guarantee -- and with examples for every label it is the plain
combination.
"""

from __future__ import annotations

import numpy as np

from worker.protocol import log_softmax_rows as _log_softmax
from worker.protocol import normalize  # noqa: F401 - part of this module's API

from worker.protocol import decode_vectors, encode_vectors  # noqa: F401 - the vector codec, re-exported

#: weight and logit scale of the vision-prototype term in the combined score (chosen on val)
VISION_WEIGHT = 1.5
VISION_SCALE = 10.0
#: the vision term of a label with n examples is weighted n / (n + VISION_SHRINK); 0: always VISION_WEIGHT (the
#: vision prototypes of backend.learning.fit.vision_prototypes already lean on the text when n is small)
VISION_SHRINK = 0.0


def _lsm_rows(z: np.ndarray) -> np.ndarray:
    return _log_softmax(z) if z.shape[1] else z


def combined_logits(x: np.ndarray, text: np.ndarray, logit_scale: float, weights: np.ndarray | None = None,
                    bias: np.ndarray | None = None, means: np.ndarray | None = None,
                    counts: np.ndarray | None = None, vision_weight: float = VISION_WEIGHT,
                    vision_scale: float = VISION_SCALE, shrink: float | None = None) -> np.ndarray:
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
