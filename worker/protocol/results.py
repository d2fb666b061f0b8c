"""The result types a job returns: :class:`LabelScore`, :class:`RegionResult`, :class:`JobResult`.

Each has ``to_dict`` / ``from_dict`` (validating), so that no other module writes or reads a result dict literal.
Region results (one per region, in the job's order)::

    {"id": str, "labels": [{"label": str, "score": float}, ...], "caption": str | None,
     "caption_mode": str | None, "error": str | None, "meta": {...},
     "embedding": {"dtype": "float16" | "float32", "shape": [1, D], "data": str}}   # only when asked for

``meta`` carries kind-specific, JSON-able extras (e.g. a proposal's mask and source, a label margin); readers
ignore keys they do not know. ``embedding`` (:func:`worker.protocol.vectors.encode_vectors` of one row) is the
vector the region's labels were scored on, sent only when the job's payload asked for it (``"embedding": true``)
and absent otherwise, so results of older workers and jobs stay as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from worker.protocol.errors import PROTOCOL_VERSION, ProtocolError
from worker.protocol.vectors import decode_vectors, encode_vectors


# ---------------------------------------------------------------------------------------------- results
def _need(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ProtocolError(f"{what} must be an object, got {type(data).__name__}")
    return data


def _opt_str(data: Mapping[str, Any], key: str, what: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ProtocolError(f"{what}.{key} must be a string or null, got {type(value).__name__}")
    return value


#: most dimensions a region's embedding may have (the widest open_clip towers have 1280)
MAX_EMBEDDING_DIM = 4096


def _embedding(data: Mapping[str, Any], what: str) -> Mapping[str, Any] | None:
    """A region's ``embedding`` as sent (checked as far as its form: one row, dtype, a base64 string), or None."""
    value = data.get("embedding")
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{what}.embedding must be an object {{dtype, shape, data}}, got {type(value).__name__}")
    shape, dtype = value.get("shape"), value.get("dtype")
    if dtype not in ("float16", "float32"):
        raise ProtocolError(f"{what}.embedding.dtype must be float16 or float32, got {dtype!r}")
    if (not isinstance(shape, list) or len(shape) != 2 or shape[0] != 1 or isinstance(shape[1], bool)
            or not isinstance(shape[1], int) or not 1 <= shape[1] <= MAX_EMBEDDING_DIM):
        raise ProtocolError(f"{what}.embedding.shape must be [1, D] with 1 <= D <= {MAX_EMBEDDING_DIM}, "
                            f"got {shape!r}")
    if not isinstance(value.get("data"), str):
        raise ProtocolError(f"{what}.embedding.data must be a base64 string")
    return {"dtype": dtype, "shape": [1, int(shape[1])], "data": value["data"]}


def embedding_doc(vector: np.ndarray) -> dict[str, Any]:
    """A region's ``embedding`` on the wire: its vector ``[D]`` as one float16 row (2 bytes a dimension)."""
    return encode_vectors(np.asarray(vector, np.float32).reshape(1, -1), "float16")


@dataclass(frozen=True)
class LabelScore:
    """One suggested label and its probability in [0, 1]."""

    label: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": float(self.score)}

    @classmethod
    def from_dict(cls, data: Any, what: str = "label") -> "LabelScore":
        data = _need(data, what)
        label, score = data.get("label"), data.get("score")
        if not isinstance(label, str):
            raise ProtocolError(f"{what}.label must be a string")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ProtocolError(f"{what}.score must be a finite number, got {score!r}")
        return cls(label, float(score))


@dataclass(frozen=True)
class RegionResult:
    """The result for one region: top-k labels (best first), caption, error, kind-specific ``meta``, and the
    region's ``embedding`` when the job asked for it (:meth:`vector` decodes it)."""

    id: str
    labels: tuple[LabelScore, ...] = ()
    caption: str | None = None
    caption_mode: str | None = None
    error: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    embedding: Mapping[str, Any] | None = None

    @classmethod
    def failed(cls, region_id: str, message: str) -> "RegionResult":
        return cls(id=str(region_id), error=message)

    @property
    def ok(self) -> bool:
        return self.error is None

    def vector(self) -> np.ndarray | None:
        """The embedding as float32 ``[D]`` (None without one); ProtocolError when it does not decode."""
        if self.embedding is None:
            return None
        try:
            return decode_vectors(dict(self.embedding))[0]
        except ValueError as exc:
            raise ProtocolError(f"region {self.id}: embedding: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The wire form; ``"embedding"`` only when set."""
        out = {"id": self.id, "labels": [s.to_dict() for s in self.labels], "caption": self.caption,
               "caption_mode": self.caption_mode, "error": self.error, "meta": dict(self.meta)}
        if self.embedding is not None:
            out["embedding"] = dict(self.embedding)
        return out

    @classmethod
    def from_dict(cls, data: Any, what: str = "region") -> "RegionResult":
        data = _need(data, what)
        if "id" not in data:
            raise ProtocolError(f"{what} has no id")
        labels = data.get("labels")
        labels = [] if labels is None else labels
        if not isinstance(labels, list):
            raise ProtocolError(f"{what}.labels must be a list")
        meta = {} if data.get("meta") is None else data["meta"]
        if not isinstance(meta, Mapping):
            raise ProtocolError(f"{what}.meta must be an object")
        return cls(id=str(data["id"]),
                   labels=tuple(LabelScore.from_dict(s, f"{what}.labels[{i}]") for i, s in enumerate(labels)),
                   caption=_opt_str(data, "caption", what), caption_mode=_opt_str(data, "caption_mode", what),
                   error=_opt_str(data, "error", what), meta=dict(meta), embedding=_embedding(data, what))


@dataclass(frozen=True)
class JobResult:
    """What a job function returns: the model that ran it, per-region results, counters.

    ``error`` set means the whole job was rejected (malformed payload, undecodable image); every region then
    carries that error too.
    """

    regions: tuple[RegionResult, ...]
    model: Mapping[str, Any] = field(default_factory=dict)
    image_sha256: str | None = None
    error: str | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    cache: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "label_regions"
    v: int = PROTOCOL_VERSION
    #: kind-specific, JSON-able extras (readers ignore unknown keys)
    meta: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def rejected(cls, message: str, region_ids: list[str], model: Mapping[str, Any] | None = None,
                 kind: str = "label_regions") -> "JobResult":
        return cls(regions=tuple(RegionResult.failed(i, message) for i in region_ids), model=dict(model or {}),
                   error=message, kind=kind)

    def to_dict(self) -> dict[str, Any]:
        """The wire form; ``"error"`` only when the job was rejected (as the version-1 worker wrote it), ``"meta"``
        only when set."""
        out = {"v": self.v, "kind": self.kind, "model": dict(self.model), "image_sha256": self.image_sha256,
               "regions": [r.to_dict() for r in self.regions], "timings": dict(self.timings),
               "cache": dict(self.cache), "params": dict(self.params)}
        if self.error is not None:
            out["error"] = self.error
        if self.meta:
            out["meta"] = dict(self.meta)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "JobResult":
        data = _need(data, "job result")
        v = data.get("v", 1)
        if not isinstance(v, int) or v > PROTOCOL_VERSION:
            raise ProtocolError(f"job result has protocol version {v!r}; this side understands up to "
                                f"{PROTOCOL_VERSION} (upgrade the backend)")
        regions = data.get("regions") or []
        if not isinstance(regions, list):
            raise ProtocolError("job result.regions must be a list")
        for key in ("model", "timings", "cache", "params", "meta"):
            if not isinstance(data.get(key) or {}, Mapping):
                raise ProtocolError(f"job result.{key} must be an object")
        return cls(regions=tuple(RegionResult.from_dict(r, f"regions[{i}]") for i, r in enumerate(regions)),
                   model=dict(data.get("model") or {}), image_sha256=_opt_str(data, "image_sha256", "job result"),
                   error=_opt_str(data, "error", "job result"), timings=dict(data.get("timings") or {}),
                   cache=dict(data.get("cache") or {}), params=dict(data.get("params") or {}),
                   kind=str(data.get("kind") or "label_regions"), v=v, meta=dict(data.get("meta") or {}))
