"""A byte-bounded LRU cache of per-image forward-pass states, with hit/miss counters."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, TypeVar

log = logging.getLogger(__name__)

V = TypeVar("V")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    max_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class ByteLRUCache(Generic[V]):
    """LRU cache whose total size (``sizeof(value)`` summed) stays at most ``max_bytes``.

    A value larger than the whole bound is returned to the caller but not kept.
    """

    def __init__(self, max_bytes: int, sizeof: Callable[[V], int]):
        if max_bytes < 0:
            raise ValueError(f"cache bound must be >= 0 bytes, got {max_bytes}")
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._sizeof = sizeof
        self._lock = threading.Lock()
        self.stats = CacheStats(max_bytes=max_bytes)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.stats.misses += 1
                return None
            self._items.move_to_end(key)
            self.stats.hits += 1
            return item[0]

    def put(self, key: Hashable, value: V) -> None:
        size = int(self._sizeof(value))
        with self._lock:
            if key in self._items:
                self.stats.bytes -= self._items.pop(key)[1]
            if size > self.stats.max_bytes:
                log.warning("image state of %.1f MiB exceeds the cache bound (%.1f MiB): not cached",
                            size / 2**20, self.stats.max_bytes / 2**20)
            else:
                self._items[key] = (value, size)
                self.stats.bytes += size
                while self.stats.bytes > self.stats.max_bytes:
                    _, (_, old) = self._items.popitem(last=False)
                    self.stats.bytes -= old
                    self.stats.evictions += 1
            self.stats.entries = len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.stats.bytes = 0
            self.stats.entries = 0
