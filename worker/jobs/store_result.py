"""Per-region result cache: the worker-side RQ callback that stores a finished job's results (torch-free).

Design: the result of one region depends only on (model id, image bytes, mask bits, inversion params + label
set + the project's example prototypes + the worker's caption mode). The cache key is the SHA-256 of those, made by
one function (:func:`worker.protocol.result_keys`) on both sides, so the same region on the same image hits
whatever URL the image came from and whichever task or request it belongs to, and an answer scored with one
project's examples is never served to another project::

    {prefix}:result:{sha256(model_id | image_sha256 | mask_sha256 | answer_digest)}  ->  JSON, with a TTL

    value = {"labels": [{"label": str, "score": float}, ...], "caption": str | None,
             "caption_mode": str | None, "model": {"name", "pretrained", "id"}}

Only successful regions are stored (errors are cheap to recompute and may be transient).

Keys, values and the two caches (:class:`MemoryResultCache`, :class:`RedisResultCache`) are part of the contract and
live in :mod:`worker.protocol` (re-exported here). Who writes: in queue mode the *worker* stores every finished job's
regions through the RQ success callback :func:`store_job_result` (named in the job by the backend), so results
survive a backend that stopped waiting; the backend reads the cache before enqueueing and only sends regions that
miss. The backend learns the model id to build keys from the workers' registry. In embedded mode the backend stores
results in a :class:`MemoryResultCache` itself.
"""

from __future__ import annotations

import logging
from typing import Any

from worker.protocol import (JOB_META_KEY, MemoryResultCache, RedisResultCache, ResultCache, answer_digest, cache_value,
                       entries_from_result, params_digest, region_key, result_keys)

__all__ = ["JOB_META_KEY", "MemoryResultCache", "RedisResultCache", "ResultCache", "answer_digest", "cache_value",
           "entries_from_result", "params_digest", "region_key", "result_keys", "store_job_result"]

log = logging.getLogger(__name__)


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
