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

import threading
import time
from collections import OrderedDict
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

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
        self.max_entries, self.max_bytes, self.ttl_s = int(max_entries), int(max_bytes), float(ttl_s)
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get_many(self, keys: Sequence[str]) -> list[np.ndarray | None]:
        now = time.monotonic()
        out: list[np.ndarray | None] = []
        with self._lock:
            for key in keys:
                hit = self._data.get(key)
                if hit is not None and hit[0] < now:
                    self._drop(key)
                    hit = None
                if hit is None:
                    self.misses += 1
                    out.append(None)
                else:
                    self.hits += 1
                    self._data.move_to_end(key)
                    out.append(_from_bytes(hit[1]))
        return out

    def put_many(self, entries: Mapping[str, np.ndarray]) -> None:
        expires = time.monotonic() + self.ttl_s
        with self._lock:
            for key, let in entries.items():
                raw = _to_bytes(let)
                if self.max_entries == 0 or len(raw) > self.max_bytes:
                    continue
                self._drop(key)
                self._data[key] = (expires, raw)
                self._bytes += len(raw)
            while self._data and (len(self._data) > self.max_entries or self._bytes > self.max_bytes):
                self._drop(next(iter(self._data)))

    def _drop(self, key: str) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self._bytes -= len(old[1])

    def stats(self) -> dict[str, int]:
        return {"let_entries": len(self._data), "let_bytes": self._bytes, "let_hits": self.hits,
                "let_misses": self.misses}


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
