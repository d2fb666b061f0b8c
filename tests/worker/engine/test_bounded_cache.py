"""The worker's bounded LRU: entry and byte bounds, TTL, counters."""

from __future__ import annotations

import pytest

from worker.engine.bounded_cache import BoundedCache


def _len(_key, value: bytes) -> int:
    return len(value)


def test_entries_and_bytes_both_bound_the_cache():
    cache: BoundedCache[bytes] = BoundedCache(2, 100, _len)
    for key in "abc":
        assert cache.put(key, b"x" * 10)
    assert len(cache) == 2 and "a" not in cache and cache.stats.evictions == 1  # the entry bound
    cache.put("big", b"x" * 90)  # 110 bytes > 100: the least recently used goes
    assert "b" not in cache and "c" in cache and cache.nbytes == 100
    assert not cache.put("huge", b"x" * 101) and "huge" not in cache


def test_a_replaced_value_is_counted_once_and_a_too_large_one_drops_the_old():
    cache: BoundedCache[bytes] = BoundedCache(None, 10, _len)
    cache.put("a", b"1234")
    cache.put("a", b"12")
    assert cache.nbytes == 2 and len(cache) == 1
    cache.put("a", b"x" * 11)
    assert "a" not in cache and cache.nbytes == 0


def test_zero_entries_keeps_nothing_and_counts_misses():
    cache: BoundedCache[bytes] = BoundedCache(0, 100, _len)
    assert not cache.put("a", b"1") and cache.get("a") is None
    assert cache.stats.as_dict() == {"hits": 0, "misses": 1, "evictions": 0, "entries": 0, "bytes": 0,
                                     "max_bytes": 100}


def test_ttl_expires_values():
    cache: BoundedCache[bytes] = BoundedCache(10, 100, _len, ttl_s=0)
    cache.put("a", b"1")
    assert cache.get("a") is None and cache.stats.misses == 1
    kept: BoundedCache[bytes] = BoundedCache(10, 100, _len, ttl_s=3600)
    kept.put("a", b"1")
    assert kept.get("a") == b"1" and kept.stats.hits == 1


def test_clear_is_no_eviction_and_bounds_are_checked():
    cache: BoundedCache[bytes] = BoundedCache(None, 10, _len)
    cache.put("a", b"1")
    cache.clear()
    assert len(cache) == 0 and cache.stats.evictions == 0
    with pytest.raises(ValueError):
        BoundedCache(-1, 10, _len)
