"""A project's example prototypes (:class:`ExamplePrototypes`): fitted by the backend from the project's examples
(``backend.learning``), carried by ``label_regions`` and ``propose_regions`` payloads, scored by the worker."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from worker.protocol.errors import PayloadError
from worker.protocol.vectors import decode_vectors, encode_vectors
from worker.protocol.vocabulary import MAX_EMBED_LABELS


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class ExamplePrototypes:
    """One row per label *with examples* (P rows; a job's labels not listed fall back to their text prototype)::

        {"version": str, "labels": [str] * P, "weights": Vectors [P, D], "bias": [float] * P,
         "means": Vectors [P, D], "counts": [int] * P}

    ``weights`` (the fitted probe) and ``means`` (the class means) stay encoded as sent
    (:func:`~worker.protocol.vectors.encode_vectors`); :meth:`weight_vectors` / :meth:`mean_vectors` decode them
    where D is known (the worker). ``from_dict`` checks everything a document can show without D.
    """

    version: str
    labels: tuple[str, ...]
    weights: Mapping[str, Any]
    bias: tuple[float, ...]
    means: Mapping[str, Any]
    counts: tuple[int, ...]

    @classmethod
    def build(cls, version: str, labels: Sequence[str], weights: np.ndarray, bias: Sequence[float],
              means: np.ndarray, counts: Sequence[int], dtype: str = "float32") -> "ExamplePrototypes":
        """From arrays: ``weights`` and ``means`` ``[P, D]``, ``bias`` and ``counts`` ``[P]``."""
        return cls(version=version, labels=tuple(labels), weights=encode_vectors(weights, dtype),
                   bias=tuple(float(b) for b in bias), means=encode_vectors(means, dtype),
                   counts=tuple(int(c) for c in counts))

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "labels": list(self.labels), "weights": dict(self.weights),
                "bias": list(self.bias), "means": dict(self.means), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, data: Any) -> "ExamplePrototypes":
        """Validate a document (labels, vectors as objects, one bias and count per label); PayloadError names
        the field."""
        if not isinstance(data, Mapping):
            raise PayloadError("prototypes must be an object")
        labels = data.get("labels")
        if (not isinstance(labels, list) or len(labels) > MAX_EMBED_LABELS
                or not all(isinstance(x, str) for x in labels)):
            raise PayloadError(f"prototypes.labels must be a list of at most {MAX_EMBED_LABELS} strings")
        for key in ("weights", "means"):
            if not isinstance(data.get(key), Mapping):
                raise PayloadError(f"prototypes.{key} must be an object {{dtype, shape, data}}")
        p, bias, counts = len(labels), data.get("bias"), data.get("counts")
        if not isinstance(bias, list) or len(bias) != p or not all(_is_number(b) for b in bias):
            raise PayloadError(f"prototypes.bias must be {p} finite numbers")
        if not isinstance(counts, list) or len(counts) != p or not all(_is_count(c) for c in counts):
            raise PayloadError(f"prototypes.counts must be {p} non-negative integers")
        return cls(version=str(data.get("version") or ""), labels=tuple(labels), weights=dict(data["weights"]),
                   bias=tuple(bias), means=dict(data["means"]), counts=tuple(counts))

    @classmethod
    def optional(cls, data: "ExamplePrototypes | Mapping[str, Any] | None") -> "ExamplePrototypes | None":
        """``data`` as prototypes: None stays None, a document is validated (:meth:`from_dict`)."""
        if data is None or isinstance(data, ExamplePrototypes):
            return data
        return cls.from_dict(data)

    def weight_vectors(self) -> np.ndarray:
        """The fitted weights, float32 ``[P, D]``; PayloadError when they do not decode to P rows."""
        return self._decode("weights", self.weights)

    def mean_vectors(self) -> np.ndarray:
        """The class means, float32 ``[P, D]``; PayloadError when they do not decode to P rows."""
        return self._decode("means", self.means)

    def _decode(self, key: str, doc: Mapping[str, Any]) -> np.ndarray:
        try:
            arr = decode_vectors(dict(doc))
        except ValueError as exc:
            raise PayloadError(f"prototypes.{key}: {exc}") from None
        if arr.shape[0] != len(self.labels):
            raise PayloadError(f"prototypes.{key} must have {len(self.labels)} rows, got {arr.shape[0]}")
        return arr
