"""A bounded memo table for the tokenizer's BPE words (a ``dict`` that open_clip fills itself).

Not a ``cachetools`` cache: open_clip writes ``memo[word] = bpe`` into it, its special tokens must never go, and
its bound counts the characters of keys and values; the LRU caches of the worker are
:class:`worker.engine.bounded_cache.BoundedCache`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable


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
