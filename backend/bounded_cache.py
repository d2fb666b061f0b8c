"""One thread-safe, bounded LRU (over ``cachetools``) for the backend's in-process caches: parsed label configs,
task images, answered model versions, text prototypes and example prototypes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import cachetools

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _stored_size(item: tuple[Any, int]) -> int:
    return item[1]


class BoundedCache(Generic[K, V]):
    """LRU of at most ``max_entries`` values (None: no entry bound) and ``max_bytes`` bytes (``sizeof(key, value)``
    per value; no byte bound without ``sizeof``), each served for ``ttl_s`` seconds of ``clock`` at most (None: no
    time limit; 0: nothing is kept).

    A value larger than ``max_bytes`` is not kept. The key must name everything the value depends on.
    """

    def __init__(self, max_entries: int | None, max_bytes: int | None = None,
                 sizeof: Callable[[K, V], int] | None = None, ttl_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if max_entries is None and (max_bytes is None or sizeof is None):
            raise ValueError("a BoundedCache needs max_entries, or max_bytes and sizeof")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._sizeof = sizeof
        bound = max_bytes if sizeof is not None and max_bytes is not None else max_entries
        assert bound is not None
        self._store: cachetools.LRUCache = (
            cachetools.LRUCache(bound, getsizeof=_stored_size) if ttl_s is None
            else cachetools.TTLCache(bound, float(ttl_s), timer=clock, getsizeof=_stored_size))
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        """Bytes held now (``sizeof`` summed; 0 without ``sizeof``)."""
        return int(self._store.currsize) if self._sizeof is not None and self.max_bytes is not None else 0

    def lookup(self, key: K) -> tuple[bool, V | None]:
        """``(hit, value)``; a hit becomes the most recently used value (a stored None is a hit too)."""
        with self._lock:
            item = self._store.get(key)
            return (False, None) if item is None else (True, item[0])

    def get(self, key: K) -> V | None:
        """The value of ``key``, or None on a miss."""
        return self.lookup(key)[1]

    def put(self, key: K, value: V) -> None:
        """Keep ``value`` as the newest, evicting the least recently used values beyond the bounds."""
        bounded_by_bytes = self._sizeof is not None and self.max_bytes is not None
        size = int(self._sizeof(key, value)) if bounded_by_bytes and self._sizeof is not None else 1
        with self._lock:
            self._store.pop(key, None)
            if size > self._store.maxsize or self.max_entries == 0 or (self.ttl_s is not None and self.ttl_s <= 0):
                return
            self._store[key] = (value, size)
            while self.max_entries is not None and len(self._store) > self.max_entries:
                self._store.popitem()

    def items(self) -> list[tuple[K, V]]:
        """``(key, value)`` pairs, the oldest stored first."""
        with self._lock:
            return [(key, item[0]) for key, item in self._store.items()]

    def keys(self) -> list[K]:
        """Keys, the oldest stored first."""
        with self._lock:
            return list(self._store.keys())

    def values(self) -> list[V]:
        """Values, the oldest stored first."""
        with self._lock:
            return [item[0] for item in self._store.values()]

    def discard(self, match: Callable[[K], bool]) -> int:
        """Drop every value whose key ``match`` accepts; how many."""
        with self._lock:
            gone = [key for key in self._store.keys() if match(key)]
            for key in gone:
                self._store.pop(key, None)
            return len(gone)

    def clear(self) -> None:
        with self._lock:
            self._store.clear()

    def __len__(self) -> int:
        return len(self._store)
