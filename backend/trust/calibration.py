"""Calibrated probabilities and per-label thresholds for a target precision (numpy only).

Input: the project's examples scored out of sample (:mod:`backend.trust.heldout`): per example the label the
product would have suggested, its score (top-1 probability) and whether it was the annotator's label. Output: a
:class:`Calibration` that maps a suggestion's (label, score) to

* ``probability``: the chance the label is right, from an isotonic (monotone) fit of right/wrong on the score,
  per label when the label was suggested at least :data:`PER_LABEL_MIN` times out of sample, else the fit shared
  by all labels;
* ``verified``: whether the score clears the label's threshold: the lowest score above which the held-out
  suggestions of that label (or all labels, when the label has too few) were right at least ``target`` of the
  time, counted conservatively (:func:`threshold`). A label with fewer than :data:`MIN_EXAMPLES` examples, or
  whose held-out suggestions never reach the target, has no threshold and is never verified.

Both are cheap lookups (a few dozen breakpoints per label), made once per example set and kept with the
prototypes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

#: examples a label needs before any suggestion of it can be verified
MIN_EXAMPLES = 5
#: held-out suggestions of a label needed for its own curve and threshold (fewer: the shared ones)
PER_LABEL_MIN = 30
#: pseudo-counts of the conservative precision: (right) / (suggested + PRIOR_WRONG) must reach the target
PRIOR_WRONG = 0.5
#: held-out suggestions that must clear a threshold (fewer: no threshold)
MIN_SUPPORT = 10


def isotonic(score: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool-adjacent-violators fit of ``right`` (0/1 ``[N]``) on ``score`` ``[N]``: the breakpoints ``(xs, ys)``
    (block mean score, block rate smoothed as (right + 0.5) / (n + 1)), non-decreasing in both."""
    order = np.argsort(score, kind="stable")
    s, r = np.asarray(score, np.float64)[order], np.asarray(right, np.float64)[order]
    sums: list[float] = []
    ns: list[float] = []
    xs: list[float] = []
    for si, ri in zip(s, r):
        sums.append(ri)
        ns.append(1.0)
        xs.append(si)
        while len(sums) > 1 and sums[-2] / ns[-2] >= sums[-1] / ns[-1]:
            n = ns[-2] + ns[-1]
            xs[-2] = (xs[-2] * ns[-2] + xs[-1] * ns[-1]) / n
            sums[-2] += sums[-1]
            ns[-2] = n
            del sums[-1], ns[-1], xs[-1]
    ys = (np.asarray(sums) + 0.5) / (np.asarray(ns) + 1.0)
    return np.asarray(xs), np.maximum.accumulate(ys) if len(ys) else ys


def threshold(score: np.ndarray, right: np.ndarray, target: float) -> float | None:
    """The lowest score ``t`` such that, among held-out suggestions with score >= ``t``, the right ones make at
    least ``target`` of them counted with :data:`PRIOR_WRONG` extra wrong ones, and at least :data:`MIN_SUPPORT`
    suggestions clear it, scanning from the top score down and stopping at the first score where the
    conservative precision falls below ``target``; None when no such ``t`` exists."""
    order = np.argsort(-np.asarray(score, np.float64), kind="stable")
    s, r = np.asarray(score, np.float64)[order], np.asarray(right, np.float64)[order]
    n = np.arange(1, len(s) + 1)
    prec = np.cumsum(r) / (n + PRIOR_WRONG)
    best = None
    for i in range(len(s)):
        if i + 1 < len(s) and s[i + 1] == s[i]:
            continue  # only between distinct scores
        if prec[i] < target:
            if best is not None:
                break
            continue
        if n[i] >= MIN_SUPPORT:
            best = float(s[i])
    return best


@dataclass(frozen=True)
class Curve:
    """A monotone map score -> probability right (linear between breakpoints, flat outside)."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]

    def __call__(self, score: float | np.ndarray) -> np.ndarray:
        if not self.xs:
            return np.zeros_like(np.asarray(score, np.float64))
        return np.asarray(np.interp(score, self.xs, self.ys))

    @classmethod
    def fit(cls, score: np.ndarray, right: np.ndarray) -> "Curve":
        xs, ys = isotonic(score, right)
        return cls(tuple(round(float(v), 6) for v in xs), tuple(round(float(v), 6) for v in ys))


@dataclass(frozen=True)
class Calibration:
    """What a project's examples say about its suggestions' scores (see the module docstring)."""

    target: float
    shared: Curve
    curves: dict[str, Curve] = field(default_factory=dict)  # labels with their own curve
    thresholds: dict[str, float] = field(default_factory=dict)  # labels that can be verified
    heldout: int = 0  # held-out suggestions behind the fit

    def probability(self, label: str, score: float) -> float:
        """Calibrated chance that a suggestion of ``label`` with ``score`` is right."""
        return float(self.curves.get(label, self.shared)(float(score)))

    def verified(self, label: str, score: float) -> bool:
        """True when ``score`` clears ``label``'s threshold for the target precision."""
        t = self.thresholds.get(label)
        return t is not None and float(score) >= t

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "heldout": self.heldout, "shared": [self.shared.xs, self.shared.ys],
                "curves": {k: [c.xs, c.ys] for k, c in self.curves.items()}, "thresholds": dict(self.thresholds)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "Calibration":
        def curve(v: Sequence[Sequence[float]]) -> Curve:
            return Curve(tuple(float(x) for x in v[0]), tuple(float(y) for y in v[1]))

        return cls(float(doc["target"]), curve(doc["shared"]), {k: curve(v) for k, v in doc["curves"].items()},
                   {k: float(v) for k, v in doc["thresholds"].items()}, int(doc.get("heldout", 0)))


def fit_calibration(labels: Sequence[str], predicted: np.ndarray, score: np.ndarray, right: np.ndarray,
                    counts: np.ndarray, target: float) -> Calibration:
    """A :class:`Calibration` from held-out suggestions: ``predicted`` ``[N]`` (label index of each suggestion),
    ``score`` ``[N]`` (its top-1 probability), ``right`` ``[N]`` (bool), ``counts`` ``[L]`` (examples per label in
    the project), ``target`` the precision a verified suggestion must reach."""
    predicted = np.asarray(predicted, int)
    score = np.asarray(score, np.float64)
    right = np.asarray(right, bool)
    shared = Curve.fit(score, right)
    shared_t = threshold(score, right, target)
    curves: dict[str, Curve] = {}
    thresholds: dict[str, float] = {}
    for i, label in enumerate(labels):
        mine = predicted == i
        if mine.sum() >= PER_LABEL_MIN:
            curves[label] = Curve.fit(score[mine], right[mine])
            t = threshold(score[mine], right[mine], target)
        else:
            t = shared_t
        if t is not None and int(counts[i]) >= MIN_EXAMPLES:
            thresholds[label] = t
    return Calibration(float(target), shared, curves, thresholds, int(len(score)))
