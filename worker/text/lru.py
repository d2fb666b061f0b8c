"""Small LRU caches bounded by entries AND bytes (text prototypes, caption phrase banks, tokenizer memo)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterable, TypeVar

V = TypeVar("V")


class BoundedLRU(Generic[V]):
    """Thread-safe LRU keeping at most ``max_entries`` values and ``max_bytes`` bytes (``sizeof(key, value)``
    summed). A value larger than ``max_bytes`` is not kept; ``max_entries=0`` keeps nothing."""

    def __init__(self, max_entries: int, max_bytes: int, sizeof: Callable[[Hashable, V], int]):
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(f"cache bounds must be >= 0, got {max_entries} entries / {max_bytes} bytes")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._sizeof = sizeof
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is cached (no hit counted, recency unchanged)."""
        with self._lock:
            return key in self._items

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: V) -> None:
        size = int(self._sizeof(key, value))
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if size > self.max_bytes or self.max_entries == 0:
                return
            self._items[key] = (value, size)
            self.bytes += size
            while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._items), "bytes": self.bytes, "max_entries": self.max_entries,
                    "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses,
                    "evictions": self.evictions}


class BoundedMemo(dict):
    """A ``dict`` for memo tables that other code fills with ``memo[k] = v`` (open_clip's BPE cache): at most
    ``max_entries`` keys and ``max_chars`` characters of ``str`` keys and values beyond the ``pinned`` ones,
    oldest insertions dropped first. Pinned keys (e.g. special tokens) are never dropped."""

    def __init__(self, pinned: Iterable[tuple[str, str]] = (), max_entries: int = 50_000,
                 max_chars: int = 4 << 20):
        super().__init__(pinned)
        self._pinned = frozenset(self)
        self._order: OrderedDict[str, int] = OrderedDict()
        self._chars = 0
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._lock = threading.Lock()

    def __setitem__(self, key, value) -> None:
        size = len(str(key)) + len(str(value))
        with self._lock:
            if key in self._pinned:
                return super().__setitem__(key, value)
            if key in self._order:
                self._chars -= self._order.pop(key)
            super().__setitem__(key, value)
            self._order[key] = size
            self._chars += size
            while self._order and (len(self._order) > self.max_entries or self._chars > self.max_chars):
                old, old_size = self._order.popitem(last=False)
                self._chars -= old_size
                super().pop(old, None)

    @property
    def chars(self) -> int:
        return self._chars

    @property
    def unpinned(self) -> int:
        return len(self._order)
