"""The LET cache: a region's localized embedding token, kept apart from any label (torch-free).

A region's LET depends only on (model id, image bytes, mask bits, input size, steps, lr, alpha), never on the
labels, templates, top-k or the project's examples. So the worker caches LETs under exactly that key and scores
labels afterwards: a changed label set, new templates or new examples re-score cached regions without a new
inversion (``benchmarks/let_cache.py`` measures it)::

    {prefix}:let:{sha256(model_id | image_sha256 | mask_sha256 | size | steps | lr | alpha)}
        -> the LET as little-endian float32 bytes [D], with a TTL (queue mode: Redis)

Embedded mode keeps them in :class:`MemoryLetCache`, an LRU bounded by entries and bytes (and a TTL).
Queue mode keeps them in Redis (:class:`RedisLetCache`) so every worker shares them; the backend names the
prefix and TTL in the job's meta (:data:`JOB_META_KEY`).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from worker.engine.bounded_cache import BoundedCache
from worker.protocol import LET_META_KEY, sha256_hex

#: key in an RQ job's ``meta``: ``{"prefix": str, "ttl_s": int}`` (where the worker keeps LETs in Redis)
JOB_META_KEY = LET_META_KEY


def let_key(prefix: str, model_id: str, image_sha256: str, mask_sha256: str, size: int, steps: int, lr: float,
            alpha: float, view: str = "") -> str:
    """Cache key of one region's LET (the inversion's inputs only; no label, template or example).

    ``view``: "" for the image as sent, ``"hflip"`` for its horizontal mirror (image and mask flipped)."""
    blob = f"{model_id}\n{image_sha256}\n{mask_sha256}\n{int(size)}\n{int(steps)}\n{float(lr)!r}\n{float(alpha)!r}"
    if view:
        blob += f"\n{view}"
    return f"{prefix}:let:{sha256_hex(blob.encode())}"


def _to_bytes(let: np.ndarray) -> bytes:
    return np.ascontiguousarray(np.asarray(let, dtype="<f4").reshape(-1)).tobytes()


def _payload_bytes(_key: object, raw: bytes) -> int:
    return len(raw)


def _from_bytes(raw: bytes | None) -> np.ndarray | None:
    if raw is None or len(raw) % 4 or not raw:
        return None
    arr = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return arr if np.isfinite(arr).all() else None


class LetCache(Protocol):
    def get_many(self, keys: Sequence[str]) -> list[np.ndarray | None]: ...

    def put_many(self, entries: Mapping[str, np.ndarray]) -> None: ...


class MemoryLetCache:
    """In-process LRU of LETs bounded by ``max_entries`` and ``max_bytes`` (payload bytes), with a TTL."""

    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float):
        if max_entries < 0 or max_bytes < 0 or ttl_s < 0:
            raise ValueError("LET cache bounds and TTL must be >= 0")
        self._cache: BoundedCache[bytes] = BoundedCache(int(max_entries), int(max_bytes), _payload_bytes,
                                                        ttl_s=float(ttl_s))

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def nbytes(self) -> int:
        return self._cache.nbytes

    def get_many(self, keys: Sequence[str]) -> list[np.ndarray | None]:
        return [_from_bytes(self._cache.get(key)) for key in keys]

    def put_many(self, entries: Mapping[str, np.ndarray]) -> None:
        for key, let in entries.items():
            self._cache.put(key, _to_bytes(let))

    def stats(self) -> dict[str, int]:
        stats = self._cache.stats
        return {"let_entries": stats.entries, "let_bytes": stats.bytes, "let_hits": stats.hits,
                "let_misses": stats.misses}


class RedisLetCache:
    """LETs in Redis (float32 bytes) with a TTL, shared by every worker of a queue."""

    def __init__(self, connection: Any, ttl_s: int):
        self.connection = connection
        self.ttl_s = int(ttl_s)
        self.hits = self.misses = 0

    def get_many(self, keys: Sequence[str]) -> list[np.ndarray | None]:
        if not keys:
            return []
        out = [_from_bytes(raw) for raw in self.connection.mget(list(keys))]
        self.hits += sum(v is not None for v in out)
        self.misses += sum(v is None for v in out)
        return out

    def put_many(self, entries: Mapping[str, np.ndarray]) -> None:
        if not entries or self.ttl_s <= 0:
            return
        pipe = self.connection.pipeline(transaction=False)
        for key, let in entries.items():
            pipe.set(key, _to_bytes(let), ex=self.ttl_s)
        pipe.execute()

    def stats(self) -> dict[str, int]:
        return {"let_hits": self.hits, "let_misses": self.misses}
