"""The example store: SQLite (embedded) and Redis (queue mode) behave the same."""

from __future__ import annotations

import numpy as np
import pytest

from backend.learning.examples import Example, ExampleStoreError, RedisExampleStore, SqliteExampleStore


def ex(region: str, label: str, seed: int = 0, key: str = "m|64|2|0.1|0.0") -> Example:
    return Example(region, label, key, np.random.default_rng(seed).normal(size=8).astype(np.float32))


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request, tmp_path):
    if request.param == "sqlite":
        return SqliteExampleStore(tmp_path / "ex.sqlite3", max_examples=5)
    conn = request.getfixturevalue("redis_conn")
    ns = request.getfixturevalue("redis_ns")
    return RedisExampleStore(conn, ns, max_examples=5)


def test_replace_is_idempotent_and_versions_follow_content(store):
    assert store.version("1") == ""
    assert store.replace_annotation("1", "a", [ex("r1", "cat"), ex("r2", "dog", 1)])
    v = store.version("1")
    assert v and not store.replace_annotation("1", "a", [ex("r2", "dog", 1), ex("r1", "cat")])  # same content
    assert store.version("1") == v
    assert store.replace_annotation("1", "a", [ex("r1", "bird")])
    assert store.version("1") != v
    assert [(e.region_id, e.label) for e in store.examples("1")] == [("r1", "bird")]
    np.testing.assert_array_equal(store.examples("1")[0].let, ex("r1", "bird").let)


def test_delete_clear_and_project_isolation(store):
    store.replace_annotation("1", "a", [ex("r1", "cat")])
    store.replace_annotation("1", "b", [ex("r1", "dog")])
    store.replace_annotation("2", "a", [ex("r1", "cow")])
    assert store.annotation_ids("1") == {"a", "b"} and store.count("1") == 2
    assert store.delete_annotation("1", "a") and not store.delete_annotation("1", "a")
    assert [e.label for e in store.examples("1")] == ["dog"]
    assert [e.label for e in store.examples("2")] == ["cow"]
    assert store.clear("1") == 1 and store.count("1") == 0 and store.count("2") == 1


def test_model_key_filter_and_cap(store):
    store.replace_annotation("1", "a", [ex("r1", "cat"), ex("r2", "cat", key="other")])
    assert [e.region_id for e in store.examples("1", "m|64|2|0.1|0.0")] == ["r1"]
    with pytest.raises(ExampleStoreError, match="MASKINV_MAX_EXAMPLES"):
        store.replace_annotation("1", "b", [ex(f"r{i}", "dog", i) for i in range(4)])
    assert store.count("1") == 2  # nothing written by the refused call


def test_sqlite_store_survives_reopening(tmp_path):
    SqliteExampleStore(tmp_path / "ex.sqlite3").replace_annotation("1", "a", [ex("r1", "cat")])
    again = SqliteExampleStore(tmp_path / "ex.sqlite3")
    assert [e.label for e in again.examples("1")] == ["cat"] and again.version("1")


@pytest.mark.redis
def test_redis_example_keys_have_no_ttl(redis_conn, redis_ns):
    s = RedisExampleStore(redis_conn, redis_ns)
    s.replace_annotation("1", "a", [ex("r1", "cat")])
    assert redis_conn.ttl(f"{redis_ns}:examples:1") == -1


def test_an_example_keeps_its_masked_crop_and_the_crop_is_part_of_the_version(store):
    crop = np.arange(8, dtype=np.float32)
    with_crop = Example("r1", "cat", "m|64|2|0.1|0.0", ex("r1", "cat").let, crop)
    store.replace_annotation("1", "a", [ex("r1", "cat")])
    before = store.version("1")
    assert store.replace_annotation("1", "a", [with_crop])  # re-embedded with its crop: a new version
    assert store.version("1") != before
    (got,) = store.examples("1")
    np.testing.assert_array_equal(got.crop, crop)
    np.testing.assert_array_equal(got.let, with_crop.let)


def test_a_store_file_made_before_crops_were_kept_is_read_and_extended(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:  # the layout without the crop column
        db.executescript("""
            CREATE TABLE annotations (project TEXT NOT NULL, annotation_id TEXT NOT NULL, digest TEXT NOT NULL,
                                      n INTEGER NOT NULL, PRIMARY KEY (project, annotation_id));
            CREATE TABLE examples (project TEXT NOT NULL, annotation_id TEXT NOT NULL, region_id TEXT NOT NULL,
                                   label TEXT NOT NULL, model_key TEXT NOT NULL, let BLOB NOT NULL);
        """)
        db.execute("INSERT INTO annotations VALUES ('1', 'a', 'd0', 1)")
        db.execute("INSERT INTO examples VALUES ('1', 'a', 'r1', 'cat', 'm', ?)",
                   (np.ones(8, "<f4").tobytes(),))
    store = SqliteExampleStore(path)
    (old,) = store.examples("1")
    assert old.crop is None and old.let.shape == (8,)
    store.replace_annotation("1", "b", [Example("r2", "dog", "m", np.ones(8, np.float32), np.zeros(8, np.float32))])
    assert [e.crop is None for e in store.examples("1")] == [True, False]
