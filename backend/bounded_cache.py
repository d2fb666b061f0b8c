"""One thread-safe, bounded LRU for the backend's in-process caches (configs, images, versions, prototypes)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """LRU of at most ``max_entries`` entries and ``max_bytes`` bytes (``sizeof(value)`` per entry; no byte bound
    without ``sizeof``); with ``ttl_s`` an entry is served for that many seconds of ``clock`` at most.

    A value larger than ``max_bytes`` is not kept. The key must name everything the value depends on.
    """

    def __init__(self, max_entries: int, max_bytes: int | None = None, sizeof: Callable[[V], int] | None = None,
                 ttl_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.max_entries = int(max_entries)
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.bytes = 0
        self._sizeof = sizeof
        self._clock = clock
        self._items: OrderedDict[K, tuple[V, int, float]] = OrderedDict()  # key -> (value, size, stored at)
        self._lock = threading.Lock()

    def lookup(self, key: K) -> tuple[bool, V | None]:
        """``(hit, value)``; a hit becomes the most recently used entry."""
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return False, None
            if self.ttl_s is not None and self._clock() - entry[2] > self.ttl_s:
                self._drop(key)
                return False, None
            self._items.move_to_end(key)
            return True, entry[0]

    def get(self, key: K) -> V | None:
        """The cached value, or None on a miss."""
        return self.lookup(key)[1]

    def put(self, key: K, value: V) -> None:
        """Keep ``value`` as the newest entry, evicting the least recently used beyond the bounds."""
        size = int(self._sizeof(value)) if self._sizeof is not None else 0
        with self._lock:
            if key in self._items:
                self._drop(key)
            if self.max_bytes is not None and size > self.max_bytes:
                return
            self._items[key] = (value, size, self._clock())
            self.bytes += size
            while len(self._items) > self.max_entries or (self.max_bytes is not None and self.bytes > self.max_bytes):
                self._drop(next(iter(self._items)))

    def keys(self) -> list[K]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def values(self) -> list[V]:
        """Values, least recently used first."""
        with self._lock:
            return [entry[0] for entry in self._items.values()]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def _drop(self, key: K) -> None:
        self.bytes -= self._items.pop(key)[1]

    def __len__(self) -> int:
        return len(self._items)
