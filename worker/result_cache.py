"""Per-region result cache (torch-free; imported by the backend and the worker).

Design: the result of one region depends only on (model id, image bytes, mask bits, inversion params +
label set). The cache key is the SHA-256 of those four, so the same region on the same image hits whatever
URL the image came from and whichever task or request it belongs to::

    {prefix}:result:{sha256(model_id | image_sha256 | mask_sha256 | params_digest)}  ->  JSON, with a TTL

    value = {"labels": [{"label": str, "score": float}, ...], "caption": str | None,
             "caption_mode": str | None, "model": {"name", "pretrained", "id"}}

Only successful regions are stored (errors are cheap to recompute and may be transient).

Who writes: in queue mode the *worker* stores every finished job's regions through the RQ success callback
:func:`store_job_result` (named in the job by the backend), so results survive a backend that stopped
waiting; the backend reads the cache before enqueueing and only sends regions that miss. The backend learns
the model id to build keys from the workers' registry (:mod:`worker.queue_worker`). In embedded mode the
backend stores results in a :class:`MemoryResultCache` itself.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Protocol

from .payload import InversionParams, sha256_hex

log = logging.getLogger(__name__)

#: Key in an RQ job's ``meta`` telling the worker-side callback where and how long to store results.
JOB_META_KEY = "maskinv_cache"


def params_digest(params: Mapping[str, Any], labels: Iterable[str]) -> str:
    """Digest of the inversion parameters (normalised through :class:`InversionParams`) and the label set."""
    canon = InversionParams.from_dict(dict(params)).to_dict()
    blob = json.dumps({"params": canon, "labels": list(labels)}, sort_keys=True, separators=(",", ":"))
    return sha256_hex(blob.encode())


def region_key(prefix: str, model_id: str, image_sha256: str, mask_sha256: str, pdigest: str) -> str:
    """Redis key of one region's result."""
    h = sha256_hex(f"{model_id}\n{image_sha256}\n{mask_sha256}\n{pdigest}".encode())
    return f"{prefix}:result:{h}"


def cache_value(region: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cached form of one result region, or None if it must not be cached (error or no labels)."""
    if region.get("error") is not None or not region.get("labels"):
        return None
    return {"labels": list(region["labels"]), "caption": region.get("caption"),
            "caption_mode": region.get("caption_mode"),
            "model": {k: model.get(k) for k in ("name", "pretrained", "id")},
            **({"meta": dict(region["meta"])} if region.get("meta") else {})}  # margin, examples (issue 14)


def entries_from_result(prefix: str, job: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, dict]:
    """Cache entries ``{key: value}`` for every successful region of a finished job.

    ``job`` is the payload (worker.payload format); its regions' mask digests give the keys.
    """
    model = result.get("model") or {}
    model_id, image_sha = model.get("id"), result.get("image_sha256")
    if not model_id or not image_sha or result.get("error"):
        return {}
    pdigest = params_digest(job.get("params") or {}, job.get("labels") or [])
    mask_sha = {str(r.get("id")): (r.get("mask") or {}).get("sha256") for r in job.get("regions") or []}
    out = {}
    for region in result.get("regions") or []:
        sha = mask_sha.get(str(region.get("id")))
        value = cache_value(region, model)
        if sha and value is not None:
            out[region_key(prefix, model_id, image_sha, sha, pdigest)] = value
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


def store_job_result(job: Any, connection: Any, result: Any) -> None:
    """RQ success callback (runs in the worker): store the job's successful regions in Redis.

    The job's ``meta[JOB_META_KEY]`` carries ``{"prefix": str, "ttl_s": int}``; without it nothing is stored.
    Never raises: a cache write failure must not turn a finished job into a failed one.
    """
    try:
        conf = (job.meta or {}).get(JOB_META_KEY)
        if not conf or not isinstance(result, dict) or not job.args:
            return
        entries = entries_from_result(conf["prefix"], job.args[0], result)
        RedisResultCache(connection, int(conf["ttl_s"])).put_many(entries)
        log.debug("job %s: cached %d region result(s)", job.id, len(entries))
    except Exception:  # noqa: BLE001 - see docstring
        log.exception("job %s: could not store region results in the cache", getattr(job, "id", "?"))
