"""The backend <-> worker contract (torch-free; the only module of ``worker`` the backend imports).

What lives here, and nowhere else:

* the job kinds: their function names (the worker's allow-list) and their payload types;
* the result types: :class:`LabelScore`, :class:`RegionResult`, :class:`JobResult`, each with ``to_dict`` /
  ``from_dict`` (validating) so that no other module writes or reads a result dict literal;
* the queue's JSON serializer (never pickle) and the protocol version a job carries;
* the Redis key layout of the worker registry and of the caches keyed in Redis, the registry's read side
  (:class:`RegistryReader`) and the region-result caches (:class:`MemoryResultCache`, :class:`RedisResultCache`);
* the payload codec (:class:`InversionParams`, packed-bit masks, base64 images) and the job payload
  :class:`LabelRegionsJob`;
* the environment-variable parsers (:func:`env_int`, :func:`env_float`, :func:`env_bool`, :func:`env_str`) that
  ``backend.settings`` and ``worker.settings`` share (one family for the whole project, errors name the variable).

Everything here is torch-free (numpy, json, hashlib; rq and redis only inside functions), so the backend can import
it without the model stack.

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

import base64
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from string import Formatter
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

#: version of the payload/result format; bump the major on an incompatible change
PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A job payload or a result does not follow the contract; the message names the field."""


#: the name the payload codec has always used for its errors (same class)
PayloadError = ProtocolError


# ---------------------------------------------------------------------------------------------- job kinds
@dataclass(frozen=True)
class JobKind:
    """One kind of job: its short name and the dotted path of the plain function a worker runs."""

    name: str
    function: str
    description: str


#: every job a worker runs, by short name (add a kind here and in worker.jobs.regions; nothing else is needed)
JOB_KINDS: dict[str, JobKind] = {
    "label_regions": JobKind("label_regions", "worker.jobs.regions.label_regions",
                             "label and caption every region of one image"),
    "prepare_labels": JobKind("prepare_labels", "worker.jobs.regions.prepare_labels",
                              "build and cache the text prototypes (and caption phrases) of a project's label sets"),
    "embed_regions": JobKind("embed_regions", "worker.jobs.embed.embed_regions",
                             "the LETs of regions of one image (examples), and text prototypes of labels"),
    "propose_regions": JobKind("propose_regions", "worker.jobs.propose.propose_regions",
                               "propose, label and caption regions nobody drew on one image"),
    "warm_up": JobKind("warm_up", "worker.jobs.regions.warm_up", "load the model; answers the model's identity"),
}

#: RQ success callback that stores a finished job's region results in the result cache
STORE_CALLBACK = "worker.jobs.store_result.store_job_result"


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


def delete_namespace(conn: Any, ns: str) -> None:
    """Delete every Redis key containing ``ns`` (a test's or benchmark's prefix/queue name: its queue, job,
    result, LET and example keys) and drop ``ns`` members from RQ's global ``rq:workers`` / ``rq:queues`` sets."""
    keys = list(conn.scan_iter(match=f"*{ns}*", count=1000))
    if keys:
        conn.delete(*keys)
    for registry in ("rq:workers", "rq:queues"):
        members = [m for m in conn.smembers(registry) if ns.encode() in m]
        if members:
            conn.srem(registry, *members)


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


def check_payload_version(payload: Mapping[str, Any]) -> int:
    """The protocol version of a job payload (1 when absent); ProtocolError for a newer one."""
    v = payload.get("v", 1)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ProtocolError(f"job payload has an invalid protocol version {v!r}")
    if v > PROTOCOL_VERSION:
        raise ProtocolError(f"job payload has protocol version {v}; this worker understands up to "
                            f"{PROTOCOL_VERSION} (upgrade the worker)")
    return v


# ---------------------------------------------------------------------------------------------- env parsers
class SettingError(ValueError):
    """An environment variable has a value that cannot be used; the message names the variable."""


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    """``env[name]`` stripped, or ``default`` when unset or blank."""
    value = env.get(name)
    return default if value is None or value.strip() == "" else value.strip()


def _range_error(name: str, value: float, lo: float | None, hi: float | None) -> str | None:
    if lo is not None and hi is not None and not lo <= value <= hi:
        return f"{name} must be in [{lo}, {hi}], got {value}"
    if lo is not None and not value >= lo:
        return f"{name} must be >= {lo}, got {value}"
    if hi is not None and not value <= hi:
        return f"{name} must be <= {hi}, got {value}"
    return None


def env_int(env: Mapping[str, str], name: str, default: int, lo: int | None = None, hi: int | None = None, *,
            error: type[Exception] = SettingError, prefix: str = "") -> int:
    """``int(env[name])``, or ``default`` when unset or blank; ``error("<prefix><name> must be ...")`` otherwise."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise error(f"{prefix}{name} must be an integer, got {raw!r}") from None
    problem = _range_error(name, value, lo, hi)
    if problem:
        raise error(prefix + problem)
    return value


def env_float(env: Mapping[str, str], name: str, default: float, lo: float | None = None, hi: float | None = None,
              *, error: type[Exception] = SettingError, prefix: str = "") -> float:
    """``float(env[name])`` (finite), or ``default`` when unset or blank."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise error(f"{prefix}{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise error(f"{prefix}{name} must be a finite number, got {raw!r}")
    problem = _range_error(name, value, lo, hi)
    if problem:
        raise error(prefix + problem)
    return value


def env_bool(env: Mapping[str, str], name: str, default: bool, *, error: type[Exception] = SettingError) -> bool:
    """1/0, true/false, yes/no, on/off (any case), or ``default`` when unset or blank."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise error(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_choice(env: Mapping[str, str], name: str, default: str, choices: Sequence[str], *,
               error: type[Exception] = SettingError) -> str:
    """``env[name]`` lower-cased, one of ``choices``, or ``default`` when unset or blank."""
    value = env_str(env, name, default).lower()
    if value not in choices:
        raise error(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def process_env() -> Mapping[str, str]:
    """The process environment (the one place ``from_env`` defaults read it)."""
    return os.environ


# ---------------------------------------------------------------------------------------------- payload codec
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "an image of a {}.",
)

#: Service-wide bounds on K and S that requests may ask for (MASKINV_MAX_STEPS / MASKINV_MAX_SIZE), enforced by the
#: backend on requests and again by the worker on jobs.
DEFAULT_MAX_STEPS = 200
DEFAULT_MAX_SIZE = 1024


#: allowed values of ``InversionParams.views``
VIEWS = (1, 2)
#: largest ``InversionParams.crop_weight`` (beyond it the LET barely counts)
MAX_CROP_WEIGHT = 10.0
#: the service's default ``crop_weight`` (``MASKINV_CROP_WEIGHT``): chosen on the scene world's val split
#: (weights 0 .. 1.0, zero-shot; ``benchmarks/results/region_classification_scene_world_val.md``)
DEFAULT_CROP_WEIGHT = 0.3


@dataclass(frozen=True)
class InversionParams:
    """Per-request MaskInversion parameters (defaults: the paper's label setting)."""

    steps: int = 10
    lr: float = 0.1
    alpha: float = 0.0
    size: int = 448
    top_k: int = 3
    templates: tuple[str, ...] = field(default=DEFAULT_TEMPLATES)
    caption: bool = True
    #: views a region is embedded from: 1 = the image; 2 = also its horizontal mirror (image and mask flipped),
    #: the region's embedding then being the mean direction of the two LETs (see ``worker.jobs.embed``)
    views: int = 1
    #: weight of the region's masked-crop embedding in its embedding (0: the LET alone); the region's embedding is
    #: then the direction of unit(LET) + crop_weight x unit(masked crop), at the LET's norm (``worker.jobs.embed``)
    crop_weight: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["templates"] = list(self.templates)
        if self.views == 1:  # the default stays implicit: a worker that predates views reads the payload unchanged
            del d["views"]
        if not self.crop_weight:  # likewise
            del d["crop_weight"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "InversionParams":
        if data is not None and not isinstance(data, dict):
            raise PayloadError(f"params must be an object, got {type(data).__name__}")
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PayloadError(f"unknown inversion parameter(s): {sorted(unknown)}")
        if "templates" in data:
            t = data["templates"]
            if not isinstance(t, (list, tuple)) or not t or not all(isinstance(s, str) for s in t):
                raise PayloadError("params.templates must be a non-empty list of strings each containing '{}'")
            data["templates"] = tuple(t)  # each is checked by validate() (check_templates)
        p = cls(**data)
        p.validate()
        return p

    def validate(self) -> None:
        for name in ("steps", "size", "top_k", "lr", "alpha", "views", "crop_weight"):
            if isinstance(getattr(self, name), bool):
                raise PayloadError(f"params.{name} must be a number, got a boolean")
        if not isinstance(self.caption, bool):
            raise PayloadError(f"params.caption must be true or false, got {self.caption!r}")
        if not isinstance(self.steps, int) or not 0 <= self.steps <= 1000:
            raise PayloadError(f"params.steps must be an integer in [0, 1000], got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < float(self.lr) <= 10):
            raise PayloadError(f"params.lr must be in (0, 10], got {self.lr!r}")
        if not (isinstance(self.alpha, (int, float)) and 0 <= float(self.alpha) <= 1000):
            raise PayloadError(f"params.alpha must be in [0, 1000], got {self.alpha!r}")
        if not isinstance(self.size, int) or not 32 <= self.size <= 2048:
            raise PayloadError(f"params.size must be an integer in [32, 2048], got {self.size!r}")
        if not isinstance(self.views, int) or self.views not in VIEWS:
            raise PayloadError(f"params.views must be one of {list(VIEWS)}, got {self.views!r}")
        if not (isinstance(self.crop_weight, (int, float)) and 0 <= float(self.crop_weight) <= MAX_CROP_WEIGHT):
            raise PayloadError(f"params.crop_weight must be in [0, {MAX_CROP_WEIGHT:g}], got {self.crop_weight!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= 100:
            raise PayloadError(f"params.top_k must be an integer in [1, 100], got {self.top_k!r}")
        if not isinstance(self.templates, tuple):
            raise PayloadError("params.templates must be a non-empty list of strings each containing '{}'")
        try:
            check_templates(self.templates)
        except PayloadError as exc:
            raise PayloadError(f"params.templates: {exc}") from None


def check_limits(params: InversionParams, max_steps: int, max_size: int) -> None:
    """Raise PayloadError when ``params`` asks for more steps or a larger input than the service allows."""
    if params.steps > max_steps:
        raise PayloadError(f"params.steps={params.steps} is more than MASKINV_MAX_STEPS={max_steps}")
    if params.size > max_size:
        raise PayloadError(f"params.size={params.size} is more than MASKINV_MAX_SIZE={max_size}")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Encode a boolean mask ``[H, W]`` as packed bits: ``{"shape": [H, W], "bits_b64": str, "sha256": str}``."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise PayloadError(f"mask must be 2-D [H, W], got shape {m.shape}")
    bits = np.packbits(m.astype(bool), axis=None)
    raw = bits.tobytes()
    return {"shape": [int(m.shape[0]), int(m.shape[1])], "bits_b64": base64.b64encode(raw).decode("ascii"),
            "sha256": _mask_digest(raw, int(m.shape[0]), int(m.shape[1]))}


def decode_mask(enc: dict[str, Any]) -> np.ndarray:
    """Decode :func:`encode_mask` output back to a boolean ``[H, W]`` array."""
    try:
        h, w = (int(v) for v in enc["shape"])
        raw = base64.b64decode(enc["bits_b64"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"malformed mask encoding: {exc}") from exc
    if h <= 0 or w <= 0:
        raise PayloadError(f"mask shape must be positive, got {h}x{w}")
    need = (h * w + 7) // 8
    if len(raw) != need:
        raise PayloadError(f"mask bits have {len(raw)} bytes, expected {need} for shape {h}x{w}")
    if "sha256" in enc and enc["sha256"] != _mask_digest(raw, h, w):
        raise PayloadError("mask sha256 does not match its bits and shape")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=h * w).reshape(h, w).astype(bool)


def decode_region_masks(regions: Sequence[Any]) -> tuple[list[np.ndarray], dict[int, str]]:
    """Masks ``[H, W]`` of a payload's regions (``{"id", "mask": EncodedMask}`` each) and the error of each that
    cannot be decoded, by position (its mask is then a ``[1, 1]`` placeholder: one bad region fails alone)."""
    masks, errors = [], {}
    for k, r in enumerate(regions):
        try:
            if not isinstance(r, dict):
                raise PayloadError("region must be an object")
            masks.append(decode_mask(r.get("mask") or {}))
        except PayloadError as exc:
            errors[k] = str(exc)
            masks.append(np.zeros((1, 1), bool))
    return masks, errors


def _mask_digest(raw: bytes, h: int, w: int) -> str:
    return sha256_hex(raw + f"{h}x{w}".encode())


def encode_image(data: bytes) -> dict[str, str]:
    return {"sha256": sha256_hex(data), "data_b64": base64.b64encode(data).decode("ascii")}


def decode_image(enc: dict[str, Any]) -> tuple[bytes, str]:
    """Return ``(image bytes, sha256)``; checks the hash."""
    try:
        data = base64.b64decode(enc["data_b64"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"malformed image encoding: {exc}") from exc
    digest = sha256_hex(data)
    if enc.get("sha256") not in (None, digest):
        raise PayloadError("image sha256 does not match its bytes")
    return data, digest


def check_labels(labels: Any) -> list[str]:
    """``labels`` as a list of unique non-empty strings (empty allowed); PayloadError otherwise."""
    labels = labels or []
    if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
        raise PayloadError("labels must be a list of non-empty strings")
    if len(set(labels)) != len(labels):
        raise PayloadError("labels must be unique")
    return labels


# ---------------------------------------------------------------------------------------------- prompts and label caps
# Prompt templates and label names: validation, caps and prompt building (torch-free; backend and worker).
#
# User text is never a format string. A template must contain exactly one bare ``{}`` field (no name, index,
# attribute, conversion or format spec: ``{0}``, ``{x}``, ``{!r}``, ``{:>9999}`` are refused) and may contain
# literal braces as ``{{`` / ``}}``; it is checked with :class:`string.Formatter` ``parse`` and filled by
# :func:`fill_template`, which puts the label where the ``{}`` was without calling ``str.format``.
#
# Caps (every text a request can lengthen has one; defaults below, env vars read by the backend's settings and
# by the worker where its runtime is built):
#
# * ``MASKINV_MAX_LABEL_CHARS`` — characters of one label (config ``<Label value>``, ``MASKINV_LABELS`` and
#   ``params.maskinv.labels``); CLIP reads 77 tokens, and tokenising one long word costs super-linear time;
# * ``MASKINV_MAX_VOCAB_BYTES`` — UTF-8 bytes of one vocabulary (all labels of a control or of the override);
# * ``MASKINV_MAX_TEMPLATE_CHARS`` — characters of one template.

DEFAULT_MAX_LABEL_CHARS = 200
DEFAULT_MAX_VOCAB_BYTES = 64 * 1024
DEFAULT_MAX_TEMPLATE_CHARS = 300
#: hard ceiling on a template's length, whatever the settings (InversionParams.validate)
TEMPLATE_CHARS_CEILING = 1000


def _show(text: str, n: int = 40) -> str:
    """``text`` quoted and truncated for an error message."""
    return repr(text[:n] + "...") if len(text) > n else repr(text)


def check_template(template: object, max_chars: int = TEMPLATE_CHARS_CEILING) -> str:
    """Return ``template`` if it is a string with exactly one bare ``{}`` field; raises PayloadError naming it."""
    if not isinstance(template, str):
        raise PayloadError(f"template must be a string, got {type(template).__name__}")
    if len(template) > max_chars:
        raise PayloadError(f"template {_show(template)} has {len(template)} characters, more than "
                           f"{max_chars} (MASKINV_MAX_TEMPLATE_CHARS); templates must be at most {max_chars} "
                           "characters")
    try:
        parts = list(Formatter().parse(template))
    except ValueError as exc:
        raise PayloadError(f"template {_show(template)} is malformed ({exc}); write literal braces as '{{{{' and "
                           "'}}'") from None
    fields = [(name, spec, conv) for _, name, spec, conv in parts if name is not None]
    if len(fields) != 1:
        raise PayloadError(f"template {_show(template)} must contain exactly one '{{}}' field, got {len(fields)}")
    name, spec, conv = fields[0]
    if name != "" or spec or conv is not None:
        raise PayloadError(f"template {_show(template)}: its field must be a bare '{{}}' (no name, index, "
                           "attribute, '!' conversion or ':' format spec)")
    return template


def fill_template(template: str, label: str) -> str:
    """``template`` with its one ``{}`` replaced by ``label`` (``{{``/``}}`` become ``{``/``}``); validates first."""
    check_template(template)
    return "".join(literal + (label if name is not None else "")
                   for literal, name, _, _ in Formatter().parse(template))


def check_templates(templates: Iterable[object], max_chars: int = TEMPLATE_CHARS_CEILING) -> tuple[str, ...]:
    out = tuple(check_template(t, max_chars) for t in templates)
    if not out:
        raise PayloadError("templates must be a non-empty list")
    return out


def check_label_caps(labels: Iterable[str], max_chars: int = DEFAULT_MAX_LABEL_CHARS,
                 max_vocab_bytes: int = DEFAULT_MAX_VOCAB_BYTES, what: str = "label") -> None:
    """Raise PayloadError naming the first label over ``max_chars`` characters, or the vocabulary when all its
    labels together have more than ``max_vocab_bytes`` UTF-8 bytes."""
    total = 0
    labels = list(labels)
    for label in labels:
        if len(label) > max_chars:
            raise PayloadError(f"{what} {_show(label)} has {len(label)} characters, more than "
                               f"MASKINV_MAX_LABEL_CHARS={max_chars}; labels must be at most {max_chars} characters")
        total += len(label.encode("utf-8", "surrogatepass"))
    if total > max_vocab_bytes:
        raise PayloadError(f"the vocabulary ({len(labels)} labels, starting {_show(labels[0], 20)}) has {total} "
                           f"bytes, more than MASKINV_MAX_VOCAB_BYTES={max_vocab_bytes}")


# ---------------------------------------------------------------------------------------------- vectors
def encode_vectors(x: np.ndarray, dtype: str = "float32") -> dict:
    """``[N, D]`` -> ``{"dtype", "shape", "data": base64 of the little-endian array}`` (dtype float32 or float16)."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    arr = np.ascontiguousarray(np.asarray(x, dtype="<f4" if dtype == "float32" else "<f2"))
    if arr.ndim != 2:
        raise ValueError(f"expected a [N, D] array, got shape {arr.shape}")
    return {"dtype": dtype, "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_vectors(doc: dict, max_bytes: int = 64 << 20) -> np.ndarray:
    """Inverse of :func:`encode_vectors` -> float32 ``[N, D]``; ValueError on a malformed document."""
    if not isinstance(doc, dict):
        raise ValueError("vectors must be an object {dtype, shape, data}")
    dtype, shape, data = doc.get("dtype"), doc.get("shape"), doc.get("data")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"vectors.dtype must be float32 or float16, got {dtype!r}")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ValueError(f"vectors.shape must be [N, D] with non-negative integers, got {shape!r}")
    if not isinstance(data, str) or len(data) > max_bytes * 4 // 3 + 4:
        raise ValueError("vectors.data must be a base64 string within the size limit")
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError):
        raise ValueError("vectors.data is not valid base64") from None
    item = 4 if dtype == "float32" else 2
    if len(raw) != shape[0] * shape[1] * item:
        need = shape[0] * shape[1] * item
        raise ValueError(f"vectors.data has {len(raw)} bytes, expected {need} for {shape} {dtype}")
    arr = np.frombuffer(raw, dtype="<f4" if dtype == "float32" else "<f2").reshape(shape).astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("vectors contain non-finite values")
    return arr


# numpy helpers of the prototype vectors (fitted by backend.learning.fit, scored by worker.text.prototypes)
def normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` ``[N, D]`` scaled to unit length (zero rows stay zero)."""
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def log_softmax_rows(z: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis of ``z`` ``[N, L]``."""
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))



# ---------------------------------------------------------------------------------------------- job payloads
def region_ids(regions: Sequence[Any]) -> list[str]:
    """Each region's id as sent (its position when it has none, or when the region is not an object)."""
    return [str(r.get("id", k)) if isinstance(r, dict) else str(k) for k, r in enumerate(regions)]


def _job_version(data: Any) -> int:
    """The protocol version of a job payload, after checking that it is an object."""
    if not isinstance(data, dict):
        raise PayloadError(f"job must be a dict, got {type(data).__name__}")
    return check_payload_version(data)


def _optional_prototypes(data: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """A payload's optional ``prototypes`` object (checked in full by the worker that scores with it)."""
    prototypes = data.get("prototypes")
    if prototypes is not None and not isinstance(prototypes, dict):
        raise PayloadError("prototypes must be an object")
    return prototypes


def _with_prototypes(out: dict[str, Any], prototypes: Mapping[str, Any] | None) -> dict[str, Any]:
    if prototypes is not None:
        out["prototypes"] = dict(prototypes)
    return out


def _regions_list(data: Mapping[str, Any]) -> tuple[Any, ...]:
    regions = data.get("regions") if data.get("regions") is not None else []
    if not isinstance(regions, list):
        raise PayloadError("regions must be a list")
    return tuple(regions)


def _image_object(data: Mapping[str, Any]) -> Mapping[str, Any]:
    image = data.get("image") if data.get("image") is not None else {}
    if not isinstance(image, dict):
        raise PayloadError(f"image must be an object, got {type(image).__name__}")
    return image


@dataclass(frozen=True)
class LabelRegionsJob:
    """Payload of a ``label_regions`` job: every region of one image, one vocabulary, one set of parameters.

    Wire format (``to_dict``; version 1 is the wave-1 format plus ``"v"``, which older workers ignore)::

        {"v": 1, "image": {"sha256": str, "data_b64": str},
         "regions": [{"id": str, "mask": {"shape": [H, W], "bits_b64": str, "sha256": str}}, ...],
         "labels": [str, ...], "params": InversionParams.to_dict(),
         "prototypes": {...}}   # optional: the project's example prototypes (worker.jobs.embed.parse_prototypes)

    ``regions`` are kept as sent (``from_dict`` does not decode masks: a bad mask fails only its region);
    ``prototypes`` is checked by the worker that scores with it.
    """

    image: Mapping[str, Any]
    regions: tuple[Mapping[str, Any], ...]
    labels: tuple[str, ...] = ()
    params: InversionParams = field(default_factory=InversionParams)
    v: int = PROTOCOL_VERSION
    prototypes: Mapping[str, Any] | None = None

    kind = "label_regions"

    @classmethod
    def build(cls, image_bytes: bytes, regions: Iterable[tuple[str, np.ndarray | Mapping[str, Any]]],
              labels: Sequence[str], params: InversionParams,
              prototypes: Mapping[str, Any] | None = None) -> "LabelRegionsJob":
        """From image bytes and ``(region_id, mask [H, W] or encoded mask)`` pairs."""
        return cls(image=encode_image(image_bytes),
                   regions=tuple({"id": str(rid), "mask": m if isinstance(m, Mapping) else encode_mask(m)}
                                 for rid, m in regions),
                   labels=tuple(labels), params=params, prototypes=prototypes)

    def to_dict(self) -> dict[str, Any]:
        out = {"v": self.v, "image": dict(self.image), "regions": [dict(r) for r in self.regions],
               "labels": list(self.labels), "params": self.params.to_dict()}
        return _with_prototypes(out, self.prototypes)

    @classmethod
    def from_dict(cls, data: Any) -> "LabelRegionsJob":
        """Validate a payload (version, params, labels, image, regions list); PayloadError names the field."""
        v = _job_version(data)
        params = InversionParams.from_dict(data.get("params"))
        labels = check_labels(data.get("labels"))
        image = _image_object(data)
        regions = data.get("regions")
        if not isinstance(regions, list):
            raise PayloadError("regions must be a list")
        prototypes = _optional_prototypes(data)
        return cls(image=image, regions=tuple(regions), labels=tuple(labels), params=params, v=v,
                   prototypes=prototypes)

    def region_ids(self) -> list[str]:
        """Each region's id (its position when it has none)."""
        return region_ids(self.regions)


#: most labels an ``embed_regions`` job computes text prototypes for
MAX_EMBED_LABELS = 1000
#: vector encodings an ``embed_regions`` job may ask for (:func:`encode_vectors`)
EMBED_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class EmbedRegionsJob:
    """Payload of an ``embed_regions`` job: the LETs of regions of one image (a project's examples) and, optionally,
    the text prototypes of a label set (``regions`` may then be empty and ``image`` absent)::

        {"v": 1, "image": {"sha256", "data_b64"}, "regions": [{"id": str, "mask": EncodedMask}, ...],
         "params": InversionParams.to_dict(), "labels": [str, ...], "dtype": "float16" | "float32"}

    Caps: :data:`MAX_EMBED_LABELS` labels; regions are kept as sent (a bad mask fails only its region).
    """

    regions: tuple[Mapping[str, Any], ...] = ()
    image: Mapping[str, Any] | None = None
    params: InversionParams = field(default_factory=InversionParams)
    labels: tuple[str, ...] = ()
    dtype: str = "float16"
    v: int = PROTOCOL_VERSION

    kind = "embed_regions"

    @classmethod
    def build(cls, image_bytes: bytes | None, regions: Iterable[tuple[str, np.ndarray]], params: InversionParams,
              labels: Sequence[str] = (), dtype: str = "float16") -> "EmbedRegionsJob":
        """From image bytes (None for text prototypes only) and ``(region_id, mask [H, W])`` pairs."""
        return cls(regions=tuple({"id": str(rid), "mask": encode_mask(m)} for rid, m in regions),
                   image=encode_image(image_bytes) if image_bytes is not None else None, params=params,
                   labels=tuple(labels), dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        out = {"v": self.v, "regions": [dict(r) for r in self.regions], "params": self.params.to_dict(),
               "dtype": self.dtype}
        if self.image is not None:
            out["image"] = dict(self.image)
        if self.labels:
            out["labels"] = list(self.labels)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "EmbedRegionsJob":
        """Validate a payload (version, params, labels, dtype, image, regions list); PayloadError names the field."""
        v = _job_version(data)
        regions = _regions_list(data)
        params = InversionParams.from_dict(data.get("params"))
        labels = data.get("labels") or []
        if (not isinstance(labels, list) or len(labels) > MAX_EMBED_LABELS
                or not all(isinstance(x, str) and x.strip() for x in labels)):
            raise PayloadError(f"labels must be a list of at most {MAX_EMBED_LABELS} non-empty strings")
        dtype = data.get("dtype", "float16")
        if dtype not in EMBED_DTYPES:
            raise PayloadError(f"dtype must be float16 or float32, got {dtype!r}")
        image = _image_object(data) if regions else None
        return cls(regions=regions, image=image, params=params, labels=tuple(labels), dtype=dtype, v=v)

    def region_ids(self) -> list[str]:
        """Each region's id (its position when it has none)."""
        return region_ids(self.regions)


@dataclass(frozen=True)
class ProposeRegionsJob:
    """Payload of a ``propose_regions`` job: propose, label and caption regions nobody drew on one image::

        {"v": 1, "image": {"sha256", "data_b64"}, "labels": [str, ...], "params": InversionParams.to_dict(),
         "proposals": {"sources": [str, ...], "max_proposals": int, "min_score": float, "refine": bool},
         "prototypes": {...}}   # optional: the project's example prototypes, as in LabelRegionsJob

    ``proposals`` (every key optional) is checked by the worker against its own settings
    (``worker.jobs.propose.ProposalOptions``: which sources it has, its cap on proposals).
    """

    image: Mapping[str, Any]
    labels: tuple[str, ...]
    params: InversionParams = field(default_factory=InversionParams)
    proposals: Mapping[str, Any] = field(default_factory=dict)
    v: int = PROTOCOL_VERSION
    prototypes: Mapping[str, Any] | None = None

    kind = "propose_regions"

    @classmethod
    def build(cls, image_bytes: bytes, labels: Sequence[str], params: InversionParams,
              proposals: Mapping[str, Any] | None = None,
              prototypes: Mapping[str, Any] | None = None) -> "ProposeRegionsJob":
        return cls(image=encode_image(image_bytes), labels=tuple(labels), params=params,
                   proposals=dict(proposals or {}), prototypes=prototypes)

    def to_dict(self) -> dict[str, Any]:
        out = {"v": self.v, "image": dict(self.image), "labels": list(self.labels), "params": self.params.to_dict(),
               "proposals": dict(self.proposals)}
        return _with_prototypes(out, self.prototypes)

    @classmethod
    def from_dict(cls, data: Any) -> "ProposeRegionsJob":
        """Validate a payload (version, params, labels: non-empty and unique, image, proposals object)."""
        v = _job_version(data)
        params = InversionParams.from_dict(data.get("params"))
        labels = check_labels(data.get("labels"))
        if not labels:
            raise PayloadError("labels must be a non-empty list of non-empty strings")
        proposals = data.get("proposals")
        if proposals is not None and not isinstance(proposals, dict):
            raise PayloadError(f"proposals must be an object, got {type(proposals).__name__}")
        prototypes = _optional_prototypes(data)
        return cls(image=_image_object(data), labels=tuple(labels), params=params, proposals=dict(proposals or {}),
                   v=v, prototypes=prototypes)


#: most label sets (region controls) and labels in all one ``prepare_labels`` job may name
MAX_PREPARE_LABEL_SETS = 64
MAX_PREPARE_LABELS = 10_000


@dataclass(frozen=True)
class PrepareLabelsJob:
    """Payload of a ``prepare_labels`` job (sent when Label Studio calls ``/setup``): warm the worker's caches of
    text prototypes (and retrieval-caption phrases when ``captions``) for a project's label sets::

        {"v": 1, "kind": "prepare_labels", "label_sets": [[str, ...], ...], "templates": [str, ...],
         "captions": bool}

    Caps: :data:`MAX_PREPARE_LABEL_SETS` sets, :data:`MAX_PREPARE_LABELS` labels in all.
    """

    label_sets: tuple[tuple[str, ...], ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    captions: bool = True
    v: int = PROTOCOL_VERSION

    kind = "prepare_labels"

    def to_dict(self) -> dict[str, Any]:
        return {"v": self.v, "kind": self.kind, "label_sets": [list(s) for s in self.label_sets],
                "templates": list(self.templates), "captions": self.captions}

    @classmethod
    def from_dict(cls, data: Any) -> "PrepareLabelsJob":
        v = _job_version(data)
        sets = data.get("label_sets")
        if not isinstance(sets, list) or len(sets) > MAX_PREPARE_LABEL_SETS:
            raise PayloadError(f"label_sets must be a list of at most {MAX_PREPARE_LABEL_SETS} label lists")
        label_sets = tuple(tuple(check_labels(s)) for s in sets)
        if sum(len(s) for s in label_sets) > MAX_PREPARE_LABELS:
            raise PayloadError(f"label_sets hold more than {MAX_PREPARE_LABELS} labels")
        templates = InversionParams.from_dict({"templates": data.get("templates") or list(DEFAULT_TEMPLATES)})
        captions = data.get("captions", True)
        if not isinstance(captions, bool):
            raise PayloadError(f"captions must be true or false, got {captions!r}")
        return cls(label_sets=label_sets, templates=templates.templates, captions=captions, v=v)


def payload_region_ids(payload: Any) -> list[str]:
    """Region ids of a payload that may be malformed (for a rejection result naming every region)."""
    regions = payload.get("regions") if isinstance(payload, dict) else None
    return [str(r.get("id")) for r in regions if isinstance(r, dict)] if isinstance(regions, list) else []


# ---------------------------------------------------------------------------------------------- result cache
#: Key in an RQ job's ``meta`` telling the worker-side callback where and how long to store results.
JOB_META_KEY = "maskinv_cache"
#: Key in an RQ job's ``meta``: ``{"prefix": str, "ttl_s": int}``, where the worker keeps LETs in Redis
#: (``worker.jobs.let_cache``; keys ``{prefix}:let:{sha256(model | image | mask | size | steps | lr | alpha)}``)
LET_META_KEY = "maskinv_let_cache"


def params_digest(params: Mapping[str, Any], labels: Iterable[str]) -> str:
    """Digest of the inversion parameters (normalised through :class:`InversionParams`) and the label set."""
    canon = InversionParams.from_dict(dict(params)).to_dict()
    blob = json.dumps({"params": canon, "labels": list(labels)}, sort_keys=True, separators=(",", ":"))
    return sha256_hex(blob.encode())


def prototypes_digest(prototypes: Mapping[str, Any] | None) -> str:
    """SHA-256 of a payload's example prototypes (their whole content: version, labels, vectors); "" without."""
    if not prototypes:
        return ""
    return sha256_hex(json.dumps(prototypes, sort_keys=True, separators=(",", ":")).encode())


def answer_digest(params: Mapping[str, Any], labels: Iterable[str], prototypes: Mapping[str, Any] | None = None,
                  captions: str | None = None) -> str:
    """Digest of what a region's answer depends on besides model, image and mask: the inversion parameters
    (templates, views and crop weight included), the label set, the example prototypes' content and the
    worker's caption mode."""
    blob = json.dumps({"params": params_digest(params, labels), "examples": prototypes_digest(prototypes),
                       "captions": captions}, sort_keys=True)
    return sha256_hex(blob.encode())


def region_key(prefix: str, model_id: str, image_sha256: str, mask_sha256: str, digest: str) -> str:
    """Redis key of one region's result: ``{prefix}:result:{sha256(model | image | mask | answer_digest)}``."""
    h = sha256_hex(f"{model_id}\n{image_sha256}\n{mask_sha256}\n{digest}".encode())
    return RedisKeys(prefix=prefix).result(h)


def result_keys(prefix: str, model: Mapping[str, Any], image_sha256: str, mask_sha256s: Iterable[str],
                params: Mapping[str, Any], labels: Iterable[str],
                prototypes: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The result-cache key of each mask digest: the one key function of the cache, used by the worker that
    writes (:func:`entries_from_result`) and the backend that reads (``backend.dispatch.dispatchers``).

    A key covers the model id, the image and mask digests and :func:`answer_digest` (parameters, labels,
    example prototypes, the model's caption mode), so an answer scored with one project's examples is never
    served to another project, nor to a request without examples."""
    digest = answer_digest(params, labels, prototypes, model.get("captions"))
    return {sha: region_key(prefix, str(model.get("id")), image_sha256, sha, digest) for sha in mask_sha256s}


def cache_value(region: RegionResult | Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cached form of one region result, or None if it must not be cached (error or no labels)::

        {"labels": [{"label", "score"}, ...], "caption", "caption_mode", "model": {"name", "pretrained", "id"}}
    """
    r = region if isinstance(region, RegionResult) else RegionResult.from_dict({"id": "", **region})
    if r.error is not None or not r.labels:
        return None
    value = {"labels": [s.to_dict() for s in r.labels], "caption": r.caption, "caption_mode": r.caption_mode,
             "model": {k: model.get(k) for k in ("name", "pretrained", "id")}}
    if r.meta:
        value["meta"] = dict(r.meta)
    return value


def region_from_cache(region_id: str, value: Mapping[str, Any]) -> RegionResult:
    """The :class:`RegionResult` a cached value stands for (ProtocolError when it is malformed)."""
    return RegionResult.from_dict({**value, "id": region_id, "error": None}, "cached region")


def entries_from_result(prefix: str, job: Mapping[str, Any], result: Mapping[str, Any] | JobResult) -> dict[str, dict]:
    """Cache entries ``{key: value}`` for every successful region of a finished ``label_regions`` job.

    ``job`` is the payload (:class:`LabelRegionsJob` format): its regions' mask digests, parameters, labels and
    example prototypes give the keys (:func:`result_keys`).
    """
    res = result if isinstance(result, JobResult) else JobResult.from_dict(result)
    model_id, image_sha = res.model.get("id"), res.image_sha256
    if not model_id or not image_sha or res.error:
        return {}
    mask_sha = {str(r.get("id")): (r.get("mask") or {}).get("sha256") for r in job.get("regions") or []}
    keys = result_keys(prefix, res.model, image_sha, {s for s in mask_sha.values() if s}, job.get("params") or {},
                       job.get("labels") or [], job.get("prototypes"))
    out = {}
    for region in res.regions:
        sha = mask_sha.get(region.id)
        value = cache_value(region, res.model)
        if sha and value is not None:
            out[keys[sha]] = value
    return out


class ResultCache(Protocol):
    def get_many(self, keys: list[str]) -> list[dict | None]: ...

    def put_many(self, entries: Mapping[str, dict]) -> None: ...


class RedisResultCache:
    """Region results in Redis as JSON strings with a TTL."""

    def __init__(self, connection: Any, ttl_s: int):
        self.connection = connection
        self.ttl_s = int(ttl_s)

    def get_many(self, keys: list[str]) -> list[dict | None]:
        if not keys:
            return []
        out = []
        for raw in self.connection.mget(keys):
            try:
                out.append(json.loads(raw) if raw is not None else None)
            except (TypeError, ValueError):
                out.append(None)
        return out

    def put_many(self, entries: Mapping[str, dict]) -> None:
        if not entries:
            return
        pipe = self.connection.pipeline(transaction=False)
        for key, value in entries.items():
            pipe.set(key, json.dumps(value), ex=self.ttl_s)
        pipe.execute()


class MemoryResultCache:
    """In-process LRU of region results (embedded mode), bounded by entry count, with a TTL."""

    def __init__(self, max_entries: int, ttl_s: int):
        self.max_entries = int(max_entries)
        self.ttl_s = float(ttl_s)
        self._data: OrderedDict[str, tuple[float, dict]] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, keys: list[str]) -> list[dict | None]:
        now = time.monotonic()
        out: list[dict | None] = []
        with self._lock:
            for key in keys:
                hit = self._data.get(key)
                if hit is None or hit[0] < now:
                    self._data.pop(key, None)
                    out.append(None)
                else:
                    self._data.move_to_end(key)
                    out.append(hit[1])
        return out

    def put_many(self, entries: Mapping[str, dict]) -> None:
        if self.max_entries <= 0:
            return
        expires = time.monotonic() + self.ttl_s
        with self._lock:
            for key, value in entries.items():
                self._data[key] = (expires, value)
                self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)


# ---------------------------------------------------------------------------------------------- registry (read side)
class RegistryReader:
    """Reads the worker registry of one queue (layout: :class:`RedisKeys`); the backend's view of the workers.

    A worker is alive while its last beat is younger than 4 of its own heartbeat periods.
    ``worker.queue_worker.WorkerRegistry`` adds the worker side (beating, registering).
    """

    def __init__(self, connection: Any, queue: str, prefix: str = "maskinv", heartbeat_s: float = 5.0):
        self.connection = connection
        self.queue = queue
        self.prefix = prefix
        self.heartbeat_s = float(heartbeat_s)  # the default period for entries without one
        self.keys = RedisKeys(prefix=prefix, queue=queue)
        self.workers_key = self.keys.workers
        self.models_key = self.keys.worker_models

    @staticmethod
    def entry_json(model_info: Mapping[str, Any], heartbeat_s: float) -> str:
        """A worker's hash entry: ``{"model": {...}, "heartbeat_s": float}``."""
        return json.dumps({"model": dict(model_info), "heartbeat_s": float(heartbeat_s)})

    def _entry(self, raw: Any) -> tuple[dict[str, Any], float]:
        """(model info, heartbeat period) of a worker's hash entry."""
        try:
            data = json.loads(raw) if raw is not None else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        return dict(data.get("model") or {}), float(data.get("heartbeat_s") or self.heartbeat_s)

    def live_models(self) -> dict[str, dict[str, Any]]:
        """``{worker name: model info}`` of the workers whose last beat is younger than 4 of their periods."""
        beats = self.connection.zrange(self.workers_key, 0, -1, withscores=True)
        if not beats:
            return {}
        names = [n.decode() if isinstance(n, bytes) else n for n, _ in beats]
        now = time.time()
        out = {}
        for name, (_, last), raw in zip(names, beats, self.connection.hmget(self.models_key, names)):
            info, period = self._entry(raw)
            if last >= now - 4 * period:
                out[name] = info
        return out

    def live_workers(self) -> list[str]:
        return list(self.live_models())

    def _beat_is_fresh(self, name: str) -> bool | None:
        """Whether ``name``'s last beat is younger than 4 of its periods; None when it has no registry entry."""
        score = self.connection.zscore(self.workers_key, name)
        if score is None:
            return None
        _, period = self._entry(self.connection.hget(self.models_key, name))
        return float(score) >= time.time() - 4 * period

    def is_alive(self, name: str) -> bool:
        return self._beat_is_fresh(name) is True

    def is_dead(self, name: str) -> bool:
        """True only when ``name`` has a registry entry whose last beat is older than 4 of its periods.

        A worker with no entry at all is not called dead: after a Redis restart the registry is empty until each
        worker's next beat (at most one period), and a job a worker starts in that window is being run."""
        return self._beat_is_fresh(name) is False

    def model_id(self) -> str | None:
        """The model id served on this queue if all live workers agree on one, else None."""
        ids = {m.get("id") for m in self.live_models().values()}
        return ids.pop() if len(ids) == 1 else None
