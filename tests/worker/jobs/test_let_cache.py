"""The LET cache: bounded LRU in memory, TTL in Redis; keys name the inversion's inputs only."""

from __future__ import annotations

import numpy as np
import pytest

from worker.jobs.let_cache import MemoryLetCache, RedisLetCache, let_key


def test_key_depends_on_inversion_inputs_only():
    base = let_key("p", "m", "img", "mask", 448, 10, 0.1, 0.0)
    assert base == let_key("p", "m", "img", "mask", 448, 10, 0.1, 0.0)
    others = [let_key("p", "m2", "img", "mask", 448, 10, 0.1, 0.0),
              let_key("p", "m", "img2", "mask", 448, 10, 0.1, 0.0),
              let_key("p", "m", "img", "mask2", 448, 10, 0.1, 0.0), let_key("p", "m", "img", "mask", 224, 10, 0.1, 0.0),
              let_key("p", "m", "img", "mask", 448, 5, 0.1, 0.0), let_key("p", "m", "img", "mask", 448, 10, 0.2, 0.0),
              let_key("p", "m", "img", "mask", 448, 10, 0.1, 0.5)]
    assert len({base, *others}) == 8


def test_memory_cache_bounds_entries_and_bytes():
    c = MemoryLetCache(max_entries=3, max_bytes=10 * 4 * 2, ttl_s=60)  # two 10-d LETs fit the byte bound
    for i in range(3):
        c.put_many({f"k{i}": np.full(10, i, np.float32)})
    assert len(c) == 2 and c.nbytes == 80
    assert c.get_many(["k0", "k1", "k2"])[0] is None  # least recently used went first
    c2 = MemoryLetCache(max_entries=2, max_bytes=10**6, ttl_s=60)
    c2.put_many({"a": np.zeros(4), "b": np.ones(4)})
    c2.get_many(["a"])
    c2.put_many({"c": np.ones(4)})
    got = c2.get_many(["a", "b", "c"])
    assert got[1] is None and got[0] is not None and got[2] is not None
    np.testing.assert_array_equal(got[2], np.ones(4, np.float32))


def test_memory_cache_expires():
    c = MemoryLetCache(10, 10**6, ttl_s=0)
    c.put_many({"a": np.zeros(4)})
    assert c.get_many(["a"]) == [None]


@pytest.mark.redis
def test_redis_cache_round_trip_with_ttl(redis_conn, redis_ns):
    c = RedisLetCache(redis_conn, ttl_s=100)
    key = f"{redis_ns}:let:x"
    c.put_many({key: np.arange(6, dtype=np.float32)})
    np.testing.assert_array_equal(c.get_many([key, f"{redis_ns}:let:y"])[0], np.arange(6, dtype=np.float32))
    assert 0 < redis_conn.ttl(key) <= 100
