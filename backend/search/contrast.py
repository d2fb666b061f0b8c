"""How a text query ranks regions: the probability that the query, rather than any label the candidate regions
carry, describes a region.

A raw cosine between a region's embedding and a text embedding is not comparable across regions: some regions
are close to every text (a cluttered LET, a small crop), and ranking a whole project by it puts them first for
any query. The product labels a region by a softmax over labels at the model's logit scale; search scores a
region the same way, with the query as one more label::

    p(query | region) = exp(s cos(r, q)) / (exp(s cos(r, q)) + sum_l exp(s cos(r, t_l)))

``s`` the model's logit scale, ``t_l`` the prompt-ensembled text embeddings of the contrast labels: the labels
of the candidate regions (their suggested or accepted labels, most frequent first, at most
:data:`MAX_CONTRAST_LABELS`; a label equal to the query is the query). Each candidate region's own label is
thus among them: a region labelled "blue star" needs to look more like "red star" than like "blue star" to
rank high for "red star". On the scene world this lifts class-name mAP from 26.0 (cosine) to 53
(``benchmarks/search.py``).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

#: labels a text query is contrasted with, at most (docs/security.md, "Region search")
MAX_CONTRAST_LABELS = 200
#: separator of a region's labels in its record (``"cat, dog"`` for a region with two labels)
LABEL_SEPARATOR = ", "


def contrast_labels(query: str, region_labels: Iterable[str], cap: int = MAX_CONTRAST_LABELS) -> list[str]:
    """The labels a query competes with: the distinct labels in ``region_labels`` (each may hold several,
    ``", "``-separated), most frequent first (ties by name), without the query itself (case-insensitive)."""
    counts: Counter[str] = Counter()
    for labels in region_labels:
        for label in labels.split(LABEL_SEPARATOR):
            label = label.strip()
            if label:
                counts[label] += 1
    folded = query.strip().casefold()
    ranked = sorted((lab for lab in counts if lab.casefold() != folded), key=lambda lab: (-counts[lab], lab))
    return ranked[:cap]


def query_log_probability(query_cos: np.ndarray, label_cos: np.ndarray, logit_scale: float) -> np.ndarray:
    """``log p(query | region)`` ``[N]`` from the regions' cosine to the query ``query_cos`` ``[N]`` and to the
    contrast labels ``label_cos`` ``[N, L]`` (``L`` may be 0: every region then has probability 1)."""
    q = logit_scale * np.asarray(query_cos, np.float64)
    lab = logit_scale * np.asarray(label_cos, np.float64).reshape(len(q), -1)
    every = np.concatenate([q[:, None], lab], axis=1)  # [N, 1 + L]
    top = every.max(axis=1)
    return q - (top + np.log(np.exp(every - top[:, None]).sum(axis=1)))


def rank(query_cos: np.ndarray, label_cos: np.ndarray, logit_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Regions best first for a text query: (order ``[N]``, probability ``[N]``), by ``p(query | region)``, ties
    (no contrast labels) by cosine."""
    logp = query_log_probability(query_cos, label_cos, logit_scale)
    order = np.lexsort((-np.asarray(query_cos, np.float64), -np.round(logp, 9)))
    return order, np.exp(logp)


def rank_vectors(vectors: np.ndarray, query: np.ndarray, labels: np.ndarray, logit_scale: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`rank` for unit region vectors ``[N, D]``, a unit query ``[D]`` and unit label vectors ``[L, D]``:
    (order ``[N]``, probability ``[N]``, cosine to the query ``[N]``)."""
    x = np.asarray(vectors, np.float32)
    cos = x @ np.asarray(query, np.float32)
    lab = x @ np.asarray(labels, np.float32).reshape(-1, x.shape[1]).T if len(labels) else np.zeros((len(x), 0))
    order, prob = rank(cos, lab, logit_scale)
    return order, prob, cos
