"""The region-result caches: the cached form of a region result, the entries of a finished job, and the caches
(:class:`RedisResultCache` in queue mode, :class:`MemoryResultCache` embedded)."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import Any, Mapping, Protocol

from worker.protocol.cache_keys import result_keys
from worker.protocol.prompts import payload_region_digest
from worker.protocol.results import JobResult, RegionResult


def cache_value(region: RegionResult | Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cached form of one region result, or None if it must not be cached (error or no labels)::

        {"labels": [{"label", "score"}, ...], "caption", "caption_mode", "model": {"name", "pretrained", "id"},
         "meta": {...}, "embedding": Vectors [1, D]}   # meta and embedding when the result has them
    """
    r = region if isinstance(region, RegionResult) else RegionResult.from_dict({"id": "", **region})
    if r.error is not None or not r.labels:
        return None
    value = {"labels": [s.to_dict() for s in r.labels], "caption": r.caption, "caption_mode": r.caption_mode,
             "model": {k: model.get(k) for k in ("name", "pretrained", "id")}}
    if r.meta:
        value["meta"] = dict(r.meta)
    if r.embedding is not None:
        value["embedding"] = dict(r.embedding)
    return value


def region_from_cache(region_id: str, value: Mapping[str, Any]) -> RegionResult:
    """The :class:`RegionResult` a cached value stands for (ProtocolError when it is malformed)."""
    return RegionResult.from_dict({**value, "id": region_id, "error": None}, "cached region")


def entries_from_result(prefix: str, job: Mapping[str, Any], result: Mapping[str, Any] | JobResult) -> dict[str, dict]:
    """Cache entries ``{key: value}`` for every successful region of a finished ``label_regions`` job.

    ``job`` is the payload (:class:`LabelRegionsJob` format): its regions' digests (mask, and prompt when sent:
    :func:`~worker.protocol.prompts.payload_region_digest`), parameters, labels, example prototypes and
    ``embedding`` flag give the keys (:func:`result_keys`); a job that asked for embeddings caches only the
    regions whose result carries one, so a hit under its key always has it.
    """
    res = result if isinstance(result, JobResult) else JobResult.from_dict(result)
    model_id, image_sha = res.model.get("id"), res.image_sha256
    if not model_id or not image_sha or res.error:
        return {}
    mask_sha = {str(r.get("id")): payload_region_digest(r) for r in job.get("regions") or [] if isinstance(r, dict)}
    embedding = job.get("embedding") is True
    keys = result_keys(prefix, res.model, image_sha, {s for s in mask_sha.values() if s}, job.get("params") or {},
                       job.get("labels") or [], job.get("prototypes"), embedding)
    out = {}
    for region in res.regions:
        sha = mask_sha.get(region.id)
        value = cache_value(region, res.model)
        if sha and value is not None and (not embedding or "embedding" in value):
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
