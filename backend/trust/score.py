"""The task score Label Studio sorts by: low = label this task first (uncertain and not covered by examples).

Per suggested region::

    uncertainty = 1 - p                    p: the calibrated probability of its label (backend.trust.calibration),
                                              else its score (top-1 probability)
    coverage    = 1 - max(0, s)            s: meta.labelled_similarity, the largest cosine of the region's
                                              embedding to any human-labelled region of the project: how far the
                                              region is from what is labelled, in the embedding space
                  1 / sqrt(1 + n)          without s: n the project's examples of its label; 1 for a label
                                              nobody labelled, 0.5 at 3 examples, 0.2 at 24
    priority    = (uncertainty + w * coverage) / (1 + w)       in [0, 1]; w = SIMILARITY_WEIGHT with s, else
                                                               COVERAGE_WEIGHT

A proposed region (nobody drew it) is worth labelling only if it is an object: its priority is multiplied by
its ``objectness`` in [0, 1]. A task's score is ``1 - max(priority)`` over its regions, in [0, 1]: sorting the
Data Manager's *Prediction score* ascending shows first the tasks holding the region that is most uncertain and
least like anything labelled. Coverage keeps the next batch from being many copies of one hard case: once a
region like it is labelled (or, without similarities, once its label has examples), it moves down.
``benchmarks/active_loop.py`` measures the order against random and uncertainty alone and chose both weights
on its val pool.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

#: weight of the example-count coverage against uncertainty (chosen on the scene world's val pool by
#: benchmarks/active_loop.py)
COVERAGE_WEIGHT = 1.0
#: weight of the similarity coverage ``1 - labelled_similarity`` against uncertainty (same choice)
SIMILARITY_WEIGHT = 2.5


def coverage(examples: int, similarity: float | None = None) -> float:
    """How far a suggestion is from what is labelled: ``1 - max(0, similarity)`` given the region's largest
    cosine to a labelled region, else ``1 / sqrt(1 + n)`` of its label's ``examples``."""
    if similarity is not None:
        return 1.0 - min(1.0, max(0.0, float(similarity)))
    return 1.0 / math.sqrt(1.0 + max(0, int(examples)))


def region_priority(probability: float, examples: int, objectness: float | None = None,
                    coverage_weight: float | None = None, similarity: float | None = None) -> float:
    """A region's labelling priority in [0, 1] (module docstring): uncertainty of its suggestion (``probability``
    right) and its coverage (``similarity`` to the labelled regions, else its label's ``examples``), times
    ``objectness`` for a proposed region. ``coverage_weight``: default :data:`SIMILARITY_WEIGHT` with a
    similarity, else :data:`COVERAGE_WEIGHT`."""
    p = min(1.0, max(0.0, float(probability)))
    if coverage_weight is None:
        coverage_weight = COVERAGE_WEIGHT if similarity is None else SIMILARITY_WEIGHT
    value = ((1.0 - p) + coverage_weight * coverage(examples, similarity)) / (1.0 + coverage_weight)
    if objectness is not None:
        value *= min(1.0, max(0.0, float(objectness)))
    return value


def task_score(priorities: Iterable[float]) -> float | None:
    """``1 - max(priority)`` over a task's regions (low = label first); None without regions."""
    values = list(priorities)
    return round(1.0 - max(values), 6) if values else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def prediction_score(items: Iterable[Any]) -> float | None:
    """The task score of a prediction's result ``items``, read from its labelled regions (items with a
    ``score``): ``meta.calibrated`` (else the item's score) as the probability, ``meta.labelled_similarity``
    (else ``meta.examples`` as the label's examples) for its coverage, and, for a proposed region
    (``meta.proposed``), ``meta.objectness`` (else its score) as its objectness. None without labelled
    regions."""
    priorities = []
    for item in items:
        if not isinstance(item, dict) or not _number(item.get("score")):
            continue
        raw = item.get("meta")
        meta: dict[str, Any] = raw if isinstance(raw, dict) else {}
        p = float(meta["calibrated"]) if _number(meta.get("calibrated")) else float(item["score"])
        examples = int(meta["examples"]) if _number(meta.get("examples")) else 0
        similarity = float(meta["labelled_similarity"]) if _number(meta.get("labelled_similarity")) else None
        objectness = None
        if meta.get("proposed"):
            objectness = float(meta["objectness"]) if _number(meta.get("objectness")) else float(item["score"])
        priorities.append(region_priority(p, examples, objectness, similarity=similarity))
    return task_score(priorities)
