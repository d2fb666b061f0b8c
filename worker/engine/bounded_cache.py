"""A thread-safe LRU cache bounded by entries and bytes, with an optional time-to-live (over ``cachetools``).

One class for the worker's in-process caches: image forward-pass states (bytes only), text prototypes and caption
phrase banks (entries and bytes), and LETs (entries, bytes and a TTL). Each value's size is ``sizeof(key, value)``;
a value larger than the byte bound is not kept, and ``max_entries=0`` keeps nothing.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Generic, Hashable, TypeVar

import cachetools

V = TypeVar("V")


@dataclass
class CacheStats:
    """Counters of one cache: lookups that hit or missed, values evicted by a bound, and what it holds now."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    max_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _stored_size(item: tuple[Any, int]) -> int:
    return item[1]


class _CountingLRU(cachetools.LRUCache):
    """``cachetools.LRUCache`` counting the values its bound (or ours) evicts."""

    evictions = 0

    def popitem(self) -> tuple[Any, Any]:
        item = super().popitem()
        self.evictions += 1
        return item


class _CountingTTL(cachetools.TTLCache):
    """``cachetools.TTLCache`` (LRU order, per-value TTL) counting the values a bound evicts (expiry is no
    eviction)."""

    evictions = 0

    def popitem(self) -> tuple[Any, Any]:
        item = super().popitem()
        self.evictions += 1
        return item


class BoundedCache(Generic[V]):
    """LRU keeping at most ``max_entries`` values (None: no entry bound) and ``max_bytes`` bytes of
    ``sizeof(key, value)``, each value for ``ttl_s`` seconds (None: no TTL). Safe to share between threads."""

    def __init__(self, max_entries: int | None, max_bytes: int, sizeof: Callable[[Hashable, V], int],
                 ttl_s: float | None = None):
        if (max_entries is not None and max_entries < 0) or max_bytes < 0 or (ttl_s is not None and ttl_s < 0):
            raise ValueError(f"cache bounds must be >= 0, got {max_entries} entries / {max_bytes} bytes / "
                             f"TTL {ttl_s}")
        self.max_entries = max_entries
        self.max_bytes = int(max_bytes)
        self._sizeof = sizeof
        self._store: _CountingLRU | _CountingTTL = (
            _CountingLRU(self.max_bytes, getsizeof=_stored_size) if ttl_s is None
            else _CountingTTL(self.max_bytes, float(ttl_s), timer=time.monotonic, getsizeof=_stored_size))
        self._lock = threading.Lock()
        self._hits = self._misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is cached (no hit counted, recency unchanged)."""
        with self._lock:
            return key in self._store

    @property
    def nbytes(self) -> int:
        """Bytes held now (``sizeof`` summed)."""
        return int(self._store.currsize)

    def get(self, key: Hashable) -> V | None:
        """The value of ``key`` (now the most recently used), or None; counts a hit or a miss."""
        with self._lock:
            item = self._store.get(key)
            if item is None:
                self._misses += 1
                return None
            self._hits += 1
            return item[0]

    def put(self, key: Hashable, value: V) -> bool:
        """Keep ``value`` under ``key`` (replacing what was there), evicting the least recently used values
        beyond the bounds; False when the value is not kept (larger than ``max_bytes``, or ``max_entries=0``)."""
        size = int(self._sizeof(key, value))
        with self._lock:
            self._store.pop(key, None)
            if size > self.max_bytes or self.max_entries == 0:
                return False
            self._store[key] = (value, size)
            while self.max_entries is not None and len(self._store) > self.max_entries:
                self._store.popitem()
            return True

    def clear(self) -> None:
        """Drop every value (not counted as evictions)."""
        with self._lock:
            evictions = self._store.evictions
            self._store.clear()  # MutableMapping.clear pops item by item
            self._store.evictions = evictions

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return CacheStats(hits=self._hits, misses=self._misses, evictions=self._store.evictions,
                              entries=len(self._store), bytes=self.nbytes, max_bytes=self.max_bytes)
