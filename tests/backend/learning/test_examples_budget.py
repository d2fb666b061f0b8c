"""The example store's budgets: at most MASKINV_MAX_PROJECTS projects (a new one beyond is refused, nothing
stored is evicted), and in Redis the project version and count are read without reading any LET."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from backend.learning.examples import Example, ExampleBudgetError, RedisExampleStore, SqliteExampleStore


def ex(region: str, label: str, seed: int = 0) -> Example:
    return Example(region, label, "m|64|2|0.1|0.0", np.random.default_rng(seed).normal(size=8).astype(np.float32))


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request, tmp_path):
    if request.param == "sqlite":
        return SqliteExampleStore(tmp_path / "ex.sqlite3", max_projects=2)
    return RedisExampleStore(request.getfixturevalue("redis_conn"), request.getfixturevalue("redis_ns"),
                             max_projects=2)


def test_a_project_beyond_max_projects_is_refused_and_nothing_is_evicted(store):
    store.replace_annotation("1", "a", [ex("r", "cat")])
    store.replace_annotation("2", "a", [ex("r", "dog")])
    with pytest.raises(ExampleBudgetError, match="MASKINV_MAX_PROJECTS=2"):
        store.replace_annotation("3", "a", [ex("r", "cow")])
    assert store.count("3") == 0 and store.count("1") == 1 and store.count("2") == 1
    assert store.replace_annotation("2", "b", [ex("r", "bird")])  # known projects keep learning
    assert store.delete_annotation("1", "a")  # a project without examples frees its place
    assert store.replace_annotation("3", "a", [ex("r", "cow")])


class _Recorder:
    """A Redis connection that records the commands sent on it and on its pipelines."""

    def __init__(self, conn: Any, calls: list):
        self._conn, self._calls = conn, calls

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._conn, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._calls.append((name, args[:1]))
            out = attr(*args, **kwargs)
            return _Recorder(out, self._calls) if name == "pipeline" else out
        return call

    def __enter__(self) -> "_Recorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._conn.reset()


@pytest.mark.redis
def test_redis_version_and_count_read_no_let(redis_conn, redis_ns):
    calls: list = []
    store = RedisExampleStore(_Recorder(redis_conn, calls), redis_ns)
    for i in range(3):
        store.replace_annotation("1", f"a{i}", [ex("r", "cat", i), ex("s", "dog", i)])
    calls.clear()
    version = store.version("1")
    assert version and store.count("1") == 6
    examples_key = f"{redis_ns}:examples:1"
    assert not [c for c in calls if c[1] == (examples_key,) and c[0] in ("hgetall", "hvals", "hget")], calls
    calls.clear()  # a write reads no other annotation's LETs either
    store.replace_annotation("1", "a3", [ex("r", "cow", 9)])
    assert not [c for c in calls if c[1] == (examples_key,) and c[0] in ("hgetall", "hvals", "hget")], calls
    assert store.snapshot("1")[0] == store.version("1") != version


@pytest.mark.redis
def test_a_redis_store_written_without_index_keeps_its_examples(redis_conn, redis_ns):
    """Hashes written before the index existed: read, versioned and counted as before, then indexed."""
    e = ex("r", "cat")
    from backend.learning.examples import examples_digest, project_version

    digest = examples_digest([e])
    redis_conn.hset(f"{redis_ns}:examples:4", "a", json.dumps({"digest": digest, "examples": [e.to_json()]}))
    redis_conn.sadd(f"{redis_ns}:examples:projects", "4", "5")  # "5": left there with no examples
    store = RedisExampleStore(redis_conn, redis_ns, max_projects=2)
    assert store.version("4") == project_version([("a", digest)]) and store.count("4") == 1
    assert [x.label for x in store.examples("4")] == ["cat"]
    assert store.replace_annotation("6", "a", [ex("r", "dog")])  # the empty "5" does not hold a place
