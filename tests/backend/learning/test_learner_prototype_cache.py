"""The learner's prototype cache: a cached answer reads no example (Redis: only the version), each cache is
bounded by entries and bytes, and its keys hold everything the answer depends on."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from backend.learning import learner as learning
from backend.learning.examples import Example, RedisExampleStore, SqliteExampleStore
from backend.settings import Settings
from worker.protocol import InversionParams

DIM = 16


def make_learner(store, monkeypatch) -> learning.Learner:
    settings = Settings.from_env({"MASKINV_SIZE": "64", "MASKINV_STEPS": "2"})
    learner = learning.Learner(settings, SimpleNamespace(), SimpleNamespace(), lambda xml: None, lambda: (None, None),
                               lambda: {"id": "m"}, store=store)
    rng = np.random.default_rng(0)

    def text(labels, params, model_id):
        return rng.normal(size=(len(labels), DIM)).astype(np.float32), 10.0
    monkeypatch.setattr(learner, "text_prototypes", text)
    return learner


def fill(store, learner, labels: list[str], n: int = 3) -> None:
    params = learner.example_params(InversionParams(size=64, steps=2))
    key = learning.model_key({"id": "m"}, params)
    rng = np.random.default_rng(1)
    for i in range(n):
        store.replace_annotation("1", f"a{i}", [Example(f"r{j}", lab, key, rng.normal(size=DIM).astype(np.float32))
                                                for j, lab in enumerate(labels)])


@pytest.mark.redis
def test_a_cached_answer_reads_only_the_version(redis_conn, redis_ns, monkeypatch):
    store = RedisExampleStore(redis_conn, redis_ns)
    learner = make_learner(store, monkeypatch)
    fill(store, learner, ["cat", "dog"])
    params = InversionParams(size=64, steps=2)
    first = learner.prototypes("1", ("cat", "dog"), params)
    assert first is not None and first["labels"] == ["cat", "dog"]
    read: list[str] = []
    monkeypatch.setattr(store, "snapshot", lambda *a, **k: read.append("snapshot") or (_ for _ in ()).throw(
        AssertionError("examples read for a cached answer")), raising=False)
    monkeypatch.setattr(store, "examples", lambda *a, **k: read.append("examples") or [])
    real_hgetall = redis_conn.hgetall
    monkeypatch.setattr(redis_conn, "hgetall", lambda key: read.append(key) or real_hgetall(key))
    assert learner.prototypes("1", ("cat", "dog"), params) == first
    assert read == []
    # another template set is another answer (its text prototypes differ): not served from the cache
    other = InversionParams(size=64, steps=2, templates=("a photo of a {}",))
    with pytest.raises(AssertionError, match="examples read"):
        learner.prototypes("1", ("cat", "dog"), other)


def test_caches_are_bounded_by_bytes(tmp_path, monkeypatch):
    store = SqliteExampleStore(tmp_path / "ex.sqlite3")
    learner = make_learner(store, monkeypatch)
    labels = [f"label {i}" for i in range(40)]
    fill(store, learner, labels, n=1)
    monkeypatch.setattr(learning, "CACHE_BYTES", 20_000, raising=False)
    learner = make_learner(store, monkeypatch)
    params = InversionParams(size=64, steps=2)
    for i in range(30):  # 30 label sets of ~5 KB of prototypes each
        assert learner.prototypes("1", tuple(labels[i:i + 10]), params) is not None
    cached = [v for v in _values(learner._protos) if v]
    assert sum(len(json.dumps(v)) for v in cached) <= 20_000 and 0 < len(cached) < 30


def _values(cache) -> list:
    return cache.values()
