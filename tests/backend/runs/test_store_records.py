"""Run records (backend.runs.store): bounded in number (MASKINV_MAX_RUN_RECORDS, oldest finished dropped first),
finished ones expire (RECORD_TTL_S), in memory and in Redis; what they echo carries no URL query or userinfo."""

from __future__ import annotations

import time

import pytest

from backend.runs import store as runs
from backend.runs.store import MemoryRunStore, RedisRunStore, RunStatus, redact_urls


def store_of(kind: str, request, max_records: int) -> runs.RunStore:
    if kind == "redis":
        return RedisRunStore(request.getfixturevalue("redis_conn"), request.getfixturevalue("redis_ns"),
                             max_records=max_records)
    return MemoryRunStore(max_records=max_records)


def finished(i: int, at: float) -> RunStatus:
    return RunStatus(id=f"run-{i:04d}", kind="retrieve", project="1", model_version="v", state="done",
                     started_at=at, updated_at=at, finished_at=at)


KINDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.mark.parametrize("kind", KINDS)
def test_at_most_max_records_are_kept_oldest_finished_first(kind, request):
    store = store_of(kind, request, max_records=200)
    now = time.time()
    old_running = RunStatus(id="run-running", kind="annotate", project="1", model_version="v",
                            started_at=now - 1000)
    store.beat(old_running.id)
    store.save(old_running)
    for i in range(230):
        store.save(finished(i, now - 900 + i))
    kept = {s.id for s in store.load_all()}
    assert len(kept) == 200
    assert "run-running" in kept  # older than all of them, but still running
    assert "run-0030" not in kept and {f"run-{i:04d}" for i in range(31, 230)} <= kept


@pytest.mark.parametrize("kind", KINDS)
def test_finished_records_expire(kind, request):
    store = store_of(kind, request, max_records=200)
    now = time.time()
    store.save(finished(1, now - runs.RECORD_TTL_S - 60))
    store.save(finished(2, now - 60))
    assert [s.id for s in store.load_all()] == ["run-0002"]
    assert runs.RECORD_TTL_S == 7 * 24 * 3600


@pytest.mark.redis
def test_the_redis_records_expire_as_a_whole_when_nothing_is_saved(redis_conn, redis_ns):
    store = RedisRunStore(redis_conn, redis_ns)
    store.save(finished(1, time.time()))
    assert 0 < redis_conn.ttl(store.runs_key) <= runs.RECORD_TTL_S


def test_the_run_manager_bounds_its_store_by_the_setting():
    from backend.runs import background
    from backend.service import Service
    from backend.settings import Settings
    from backend_support import FAST

    service = Service(Settings.from_env({**FAST, "MASKINV_MAX_RUN_RECORDS": "5"}))
    store = background.runs_for(service).store
    for i in range(8):
        store.save(finished(i, time.time() - 100 + i))
    assert len(store.runs()) == 5


def test_redact_urls_strips_queries_fragments_and_userinfo():
    text = ("cannot fetch https://alice:s3cret@img.test/a/b.png?X-Amz-Signature=abc&token=t#frag (HTTP 403); "
            "also /data/upload/1/x.png?token=zzz and http://h.test/p?q=1, done")
    out = redact_urls(text)
    for secret in ("s3cret", "alice", "Signature", "token", "zzz", "frag", "q=1"):
        assert secret not in out
    assert "https://img.test/a/b.png" in out and "/data/upload/1/x.png" in out and "http://h.test/p," in out


@pytest.mark.parametrize("kind", KINDS)
def test_failure_reasons_and_messages_in_records_carry_no_signed_url(kind, request):
    store = store_of(kind, request, max_records=10)
    st = RunStatus(id="run-x", kind="retrieve", project="1", model_version="v",
                   failures=[{"task": 1, "reason": "cannot fetch https://u:p@s3.test/i.png?X-Amz-Signature=abc",
                              "kind": "image"}],
                   message="not resumed: https://ls.test/api?token=abc")
    store.save(st)
    (shown,) = store.runs()
    assert "Signature" not in str(shown) and "u:p@" not in str(shown) and "token=abc" not in str(shown)
    assert "https://s3.test/i.png" in shown["failures"][0]["reason"]
