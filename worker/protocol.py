"""The backend <-> worker contract (torch-free; the only module of ``worker`` the backend imports).

What lives here, and nowhere else:

* the job kinds: their function names (the worker's allow-list) and their payload types;
* the result types: :class:`LabelScore`, :class:`RegionResult`, :class:`JobResult`, each with ``to_dict`` /
  ``from_dict`` (validating) so that no other module writes or reads a result dict literal;
* the queue's JSON serializer (never pickle) and the protocol version a job carries;
* the Redis key layout of the worker registry and of the caches keyed in Redis.

A job travels as a plain JSON object through RQ; its payload is ``JobPayload.to_dict()`` with a ``"v"``
(:data:`PROTOCOL_VERSION`). A worker refuses a payload of a newer major version with a clear error, and a
payload without ``"v"`` is read as version 1 (what the wave-1 backend sent), so an old backend and a new
worker interoperate.

Region results (one per region, in the job's order)::

    {"id": str, "labels": [{"label": str, "score": float}, ...], "caption": str | None,
     "caption_mode": str | None, "error": str | None, "meta": {...}}

``meta`` carries kind-specific, JSON-able extras (e.g. a proposal's mask and source, a label margin); readers
ignore keys they do not know.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

#: version of the payload/result format; bump the major on an incompatible change
PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A job payload or a result does not follow the contract; the message names the field."""


# ---------------------------------------------------------------------------------------------- job kinds
@dataclass(frozen=True)
class JobKind:
    """One kind of job: its short name and the dotted path of the plain function a worker runs."""

    name: str
    function: str
    description: str


#: every job a worker runs, by short name (add a kind here and in worker.jobs; nothing else is needed)
JOB_KINDS: dict[str, JobKind] = {
    "label_regions": JobKind("label_regions", "worker.jobs.label_regions",
                             "label and caption every region of one image"),
    "propose_regions": JobKind("propose_regions", "worker.proposal_jobs.propose_regions",
                               "propose, label and caption regions nobody drew on one image"),
}

#: RQ success callback that stores a finished job's region results in the result cache
STORE_CALLBACK = "worker.result_cache.store_job_result"


def job_function(kind: str) -> str:
    """The dotted function name of job kind ``kind``; ProtocolError for an unknown kind."""
    try:
        return JOB_KINDS[kind].function
    except KeyError:
        raise ProtocolError(f"unknown job kind {kind!r}; known: {sorted(JOB_KINDS)}") from None


def allowed_functions() -> frozenset[str]:
    """The functions a worker may run (anything else enqueued on its queue fails without being imported)."""
    return frozenset(k.function for k in JOB_KINDS.values())


def allowed_callbacks() -> frozenset[str]:
    return frozenset({STORE_CALLBACK})


# ---------------------------------------------------------------------------------------------- serializer
def job_serializer():
    """RQ's JSON serializer: job data and results on the queue (backend and worker must agree); never pickle."""
    from rq.serializers import JSONSerializer

    return JSONSerializer


# ---------------------------------------------------------------------------------------------- key layout
@dataclass(frozen=True)
class RedisKeys:
    """Redis key layout under one prefix (default ``maskinv``) and queue."""

    prefix: str = "maskinv"
    queue: str = "maskinv"

    @property
    def workers(self) -> str:
        """sorted set: worker name -> unix time of its last heartbeat"""
        return f"{self.prefix}:workers:{self.queue}"

    @property
    def worker_models(self) -> str:
        """hash: worker name -> JSON {"model": {...}, "heartbeat_s": float}"""
        return f"{self.prefix}:worker-models:{self.queue}"

    def result(self, digest: str) -> str:
        """string (JSON, with a TTL): one region's cached result"""
        return f"{self.prefix}:result:{digest}"


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
    """The result for one region: top-k labels (best first), caption, error, kind-specific ``meta``."""

    id: str
    labels: tuple[LabelScore, ...] = ()
    caption: str | None = None
    caption_mode: str | None = None
    error: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def failed(cls, region_id: str, message: str) -> "RegionResult":
        return cls(id=str(region_id), error=message)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "labels": [s.to_dict() for s in self.labels], "caption": self.caption,
                "caption_mode": self.caption_mode, "error": self.error, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, data: Any, what: str = "region") -> "RegionResult":
        data = _need(data, what)
        if "id" not in data:
            raise ProtocolError(f"{what} has no id")
        labels = data.get("labels") or []
        if not isinstance(labels, list):
            raise ProtocolError(f"{what}.labels must be a list")
        meta = data.get("meta") or {}
        if not isinstance(meta, Mapping):
            raise ProtocolError(f"{what}.meta must be an object")
        return cls(id=str(data["id"]),
                   labels=tuple(LabelScore.from_dict(s, f"{what}.labels[{i}]") for i, s in enumerate(labels)),
                   caption=_opt_str(data, "caption", what), caption_mode=_opt_str(data, "caption_mode", what),
                   error=_opt_str(data, "error", what), meta=dict(meta))


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

    @classmethod
    def rejected(cls, message: str, region_ids: list[str], model: Mapping[str, Any] | None = None,
                 kind: str = "label_regions") -> "JobResult":
        return cls(regions=tuple(RegionResult.failed(i, message) for i in region_ids), model=dict(model or {}),
                   error=message, kind=kind)

    def to_dict(self) -> dict[str, Any]:
        return {"v": self.v, "kind": self.kind, "model": dict(self.model), "image_sha256": self.image_sha256,
                "error": self.error, "regions": [r.to_dict() for r in self.regions], "timings": dict(self.timings),
                "cache": dict(self.cache), "params": dict(self.params)}

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
        for key in ("model", "timings", "cache", "params"):
            if not isinstance(data.get(key) or {}, Mapping):
                raise ProtocolError(f"job result.{key} must be an object")
        return cls(regions=tuple(RegionResult.from_dict(r, f"regions[{i}]") for i, r in enumerate(regions)),
                   model=dict(data.get("model") or {}), image_sha256=_opt_str(data, "image_sha256", "job result"),
                   error=_opt_str(data, "error", "job result"), timings=dict(data.get("timings") or {}),
                   cache=dict(data.get("cache") or {}), params=dict(data.get("params") or {}),
                   kind=str(data.get("kind") or "label_regions"), v=v)


def check_payload_version(payload: Mapping[str, Any]) -> int:
    """The protocol version of a job payload (1 when absent); ProtocolError for a newer one."""
    v = payload.get("v", 1)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ProtocolError(f"job payload has an invalid protocol version {v!r}")
    if v > PROTOCOL_VERSION:
        raise ProtocolError(f"job payload has protocol version {v}; this worker understands up to "
                            f"{PROTOCOL_VERSION} (upgrade the worker)")
    return v
