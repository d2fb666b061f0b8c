"""The task score Label Studio sorts by: low = label this task first (uncertain and not covered by examples).

Per suggested region::

    uncertainty = 1 - p                    p: the calibrated probability of its label (backend.trust.calibration),
                                              else its score (top-1 probability)
    coverage    = 1 / sqrt(1 + n)          n: the project's examples of its label; 1 for a label nobody labelled,
                                              0.5 at 3 examples, 0.2 at 24: how far the region is from what is
                                              labelled, in the label space the suggestion lives in
    priority    = (uncertainty + COVERAGE_WEIGHT * coverage) / (1 + COVERAGE_WEIGHT)       in [0, 1]

A proposed region (nobody drew it) is worth labelling only if it is an object: its priority is multiplied by
its ``objectness`` in [0, 1]. A task's score is ``1 - max(priority)`` over its regions, in [0, 1]: sorting the
Data Manager's *Prediction score* ascending shows first the tasks holding the region that is most uncertain and
least like anything labelled. Coverage keeps the next batch from being many copies of one hard case: once a
label has examples, its regions move down. ``benchmarks/active_loop.py`` measures the order against random and
uncertainty alone.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

#: weight of coverage against uncertainty (chosen on the scene world's val pool by benchmarks/active_loop.py)
COVERAGE_WEIGHT = 1.0


def coverage(examples: int) -> float:
    """How far a suggestion of a label with ``examples`` examples is from what is labelled: ``1 / sqrt(1 + n)``."""
    return 1.0 / math.sqrt(1.0 + max(0, int(examples)))


def region_priority(probability: float, examples: int, objectness: float | None = None,
                    coverage_weight: float = COVERAGE_WEIGHT) -> float:
    """A region's labelling priority in [0, 1] (module docstring): uncertainty of its suggestion (``probability``
    right) and coverage of its label (``examples``), times ``objectness`` for a proposed region."""
    p = min(1.0, max(0.0, float(probability)))
    value = ((1.0 - p) + coverage_weight * coverage(examples)) / (1.0 + coverage_weight)
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
    ``score``): ``meta.calibrated`` (else the item's score) as the probability, ``meta.examples`` as the label's
    examples, and, for a proposed region (``meta.proposed``), ``meta.objectness`` (else its score) as its
    objectness. None without labelled regions."""
    priorities = []
    for item in items:
        if not isinstance(item, dict) or not _number(item.get("score")):
            continue
        raw = item.get("meta")
        meta: dict[str, Any] = raw if isinstance(raw, dict) else {}
        p = float(meta["calibrated"]) if _number(meta.get("calibrated")) else float(item["score"])
        examples = int(meta["examples"]) if _number(meta.get("examples")) else 0
        objectness = None
        if meta.get("proposed"):
            objectness = float(meta["objectness"]) if _number(meta.get("objectness")) else float(item["score"])
        priorities.append(region_priority(p, examples, objectness))
    return task_score(priorities)
