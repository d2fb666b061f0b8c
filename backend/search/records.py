"""What the region index keeps and how it is asked: :class:`RegionRecord`, :class:`SearchFilter`,
:class:`SearchHit`, and the caps every surface (``POST /search``, ``maskinv-search``) checks.

One record = one region embedded by one model: project, task, annotation (human regions), region id, label,
score, source (``human`` / ``suggested`` / ``proposed``), model id, image digest and box ``[x, y, w, h]`` in
percent of the image. Its vector (``[D]``, unit length) is stored beside it by the store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

#: where a region came from: an annotator's region, a suggestion for a drawn region, a proposed region
SOURCES = ("human", "suggested", "proposed")
#: caps on a query (docs/security.md, "Region search")
MAX_K = 500
MAX_PROJECTS = 20
MAX_LABELS = 50
MAX_QUERY_CHARS = 200
MAX_EXAMPLES = 50
MAX_ID_CHARS = 200


class SearchInputError(ValueError):
    """A search request or record that cannot be used; the message names the field."""


def _text(value: Any, what: str, max_chars: int = MAX_ID_CHARS, allow_empty: bool = False) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise SearchInputError(f"{what} must be a string, got {type(value).__name__}")
    text = str(value)
    if (not text and not allow_empty) or len(text) > max_chars:
        raise SearchInputError(f"{what} must have 1 to {max_chars} characters")
    return text


@dataclass(frozen=True)
class RegionRecord:
    """One indexed region (its vector is stored beside it)."""

    model: str
    project: str
    task: int
    region: str
    label: str = ""
    score: float = 0.0
    source: str = "suggested"
    annotation: str = ""
    image_sha256: str = ""
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise SearchInputError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if isinstance(self.task, bool) or not isinstance(self.task, int) or self.task < 0:
            raise SearchInputError(f"task must be a non-negative integer, got {self.task!r}")
        for name in ("model", "project", "region"):
            _text(getattr(self, name), name)
        if not math.isfinite(self.score):
            raise SearchInputError("score must be finite")
        if len(self.box) != 4:
            raise SearchInputError("box must be [x, y, width, height]")

    @property
    def key(self) -> tuple[str, str, int, str, str]:
        """What makes a record unique: model, project, task, annotation, region."""
        return (self.model, self.project, self.task, self.annotation, self.region)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "project": self.project, "task": self.task, "annotation": self.annotation,
                "region": self.region, "label": self.label, "score": float(self.score), "source": self.source,
                "image_sha256": self.image_sha256, "box": [float(b) for b in self.box]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RegionRecord":
        box = d.get("box") or (0.0, 0.0, 0.0, 0.0)
        return cls(model=str(d["model"]), project=str(d["project"]), task=int(d["task"]), region=str(d["region"]),
                   label=str(d.get("label") or ""), score=float(d.get("score") or 0.0),
                   source=str(d.get("source") or "suggested"), annotation=str(d.get("annotation") or ""),
                   image_sha256=str(d.get("image_sha256") or ""), box=tuple(float(b) for b in box))  # type: ignore[arg-type]


@dataclass(frozen=True)
class SearchFilter:
    """Which regions a query may return: one model, one or more projects, optionally labels, sources and a score
    range (the region's label score)."""

    model: str
    projects: tuple[str, ...]
    labels: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    min_score: float | None = None
    max_score: float | None = None

    def __post_init__(self) -> None:
        _text(self.model, "model")
        if not self.projects or len(self.projects) > MAX_PROJECTS:
            raise SearchInputError(f"projects must name 1 to {MAX_PROJECTS} projects")
        for p in self.projects:
            _text(p, "projects[]")
        if len(self.labels) > MAX_LABELS:
            raise SearchInputError(f"labels: at most {MAX_LABELS}")
        for lab in self.labels:
            _text(lab, "labels[]")
        bad = [s for s in self.sources if s not in SOURCES]
        if bad:
            raise SearchInputError(f"sources must be among {', '.join(SOURCES)}, got {bad[0]!r}")
        for name in ("min_score", "max_score"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise SearchInputError(f"{name} must be a finite number")

    @property
    def restricts_rows(self) -> bool:
        """Whether anything beyond model and project filters the rows."""
        return bool(self.labels or self.sources or self.min_score is not None or self.max_score is not None)

    def accepts(self, rec: RegionRecord) -> bool:
        """Whether ``rec`` passes the filter (model and project included)."""
        return (rec.model == self.model and rec.project in self.projects
                and (not self.labels or rec.label in self.labels)
                and (not self.sources or rec.source in self.sources)
                and (self.min_score is None or rec.score >= self.min_score)
                and (self.max_score is None or rec.score <= self.max_score))


@dataclass(frozen=True)
class SearchHit:
    """One result: the region and its similarity to the query (cosine, higher is closer; for a coverage query
    the similarity to the nearest labelled prototype, lower first)."""

    record: RegionRecord
    similarity: float
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.record.to_dict(), "similarity": round(float(self.similarity), 6), **dict(self.extra)}


def check_k(k: Any) -> int:
    """``k`` as an int in 1..MAX_K."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise SearchInputError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
    return k


def unit_rows(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    """``[N, D]`` float32 rows of unit length; SearchInputError on non-finite or zero rows or a wrong width."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise SearchInputError(f"vectors must be [N, {dim or 'D'}], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise SearchInputError("vectors contain non-finite values")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    if (n == 0).any():
        raise SearchInputError("vectors contain a zero row")
    return np.ascontiguousarray(x / n, dtype=np.float32)


def check_records(records: Sequence[RegionRecord], vectors: np.ndarray) -> np.ndarray:
    """Vectors of ``records`` made unit length; one model per call and one row per record."""
    x = unit_rows(vectors)
    if len(records) != x.shape[0]:
        raise SearchInputError(f"{len(records)} records but {x.shape[0]} vectors")
    if len({r.model for r in records}) > 1:
        raise SearchInputError("one model per write")
    return x
