"""The backend's bounded LRU: entry and byte bounds, time limit, and dropping entries by key."""

from __future__ import annotations

from backend.bounded_cache import BoundedCache


def test_entries_beyond_the_bound_evict_the_least_recently_used() -> None:
    cache: BoundedCache[str, int] = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert cache.keys() == ["a", "c"]


def test_bytes_bound_and_a_value_larger_than_it() -> None:
    cache: BoundedCache[str, bytes] = BoundedCache(None, 10, lambda _k, v: len(v))
    cache.put("a", b"x" * 6)
    cache.put("b", b"x" * 6)
    assert cache.keys() == ["b"] and cache.bytes == 6
    cache.put("c", b"x" * 11)
    assert cache.get("c") is None


def test_values_expire_after_ttl() -> None:
    now = [0.0]
    cache: BoundedCache[str, int] = BoundedCache(4, ttl_s=5.0, clock=lambda: now[0])
    cache.put("a", 1)
    now[0] = 4.0
    assert cache.get("a") == 1
    now[0] = 5.5
    assert cache.lookup("a") == (False, None)


def test_discard_drops_the_keys_it_matches() -> None:
    cache: BoundedCache[tuple[str, str], int] = BoundedCache(8)
    for key in (("1", "m"), ("1", "n"), ("2", "m")):
        cache.put(key, 0)
    assert cache.discard(lambda key: key[0] == "1") == 2
    assert cache.keys() == [("2", "m")]
