"""The backend side of the region-result cache: look regions up before a label job, read the cached values back
as region results, and (embedded mode) store a finished job's results as a worker does.

Keys and values are worker.protocol's (:func:`~worker.protocol.result_keys`, :func:`~worker.protocol.cache_value`),
so the worker that writes and the backend that reads agree on them.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from worker.protocol import (InversionParams, JobResult, ProtocolError, RegionResult, ResultCache,
                             entries_from_result, region_from_cache, result_keys)

log = logging.getLogger(__name__)


def lookup(cache: ResultCache, prefix: str, model: Mapping[str, Any], image_sha256: str,
           encoded: Mapping[str, dict], params: InversionParams, labels: list[str],
           prototypes: Mapping[str, Any] | None, embedding: bool = False) -> dict[str, dict]:
    """The cached values of the masks ``encoded`` (mask sha -> encoded mask) for one image, model and question
    (``embedding``: answers that carry the region's embedding); returns mask sha -> cached value for the hits.
    A cache that cannot be read counts as all misses."""
    keys = result_keys(prefix, model, image_sha256, encoded, params.to_dict(), labels, prototypes, embedding)
    try:
        values = cache.get_many(list(keys.values()))
    except Exception as exc:  # noqa: BLE001 - a cache read failure only costs recomputation
        log.warning("result cache read failed: %s", exc)
        return {}
    return {sha: value for sha, value in zip(keys, values) if value is not None}


def cached_regions(hits: Mapping[str, Mapping[str, Any]]) -> dict[str, RegionResult]:
    """The region results of cache ``hits`` (mask sha -> cached value); a malformed entry is left out (and
    recomputed next time)."""
    out: dict[str, RegionResult] = {}
    for sha, value in hits.items():
        try:
            out[sha] = region_from_cache(sha, value)
        except ProtocolError as exc:
            log.warning("result cache entry for mask %s is malformed: %s", sha[:12], exc)
    return out


def store(cache: ResultCache, prefix: str, payload: Mapping[str, Any], result: Mapping[str, Any] | JobResult) -> None:
    """Cache the region results of a finished ``label_regions`` job (what the worker's success callback does in
    queue mode)."""
    cache.put_many(entries_from_result(prefix, payload, result))
