"""The worker registry's liveness answers, on the project's real Redis."""

from __future__ import annotations

import time
import uuid

import pytest
from redis import Redis

from worker.queue_worker import WorkerRegistry


@pytest.fixture()
def registry():
    conn = Redis.from_url("redis://127.0.0.1:6379/0")
    prefix = f"maskinv-test-registry-{uuid.uuid4().hex[:8]}"
    reg = WorkerRegistry(conn, "q", prefix=prefix, heartbeat_s=0.2)
    yield reg
    conn.delete(reg.workers_key, reg.models_key)


def test_a_beating_worker_is_alive_and_a_silent_one_is_dead(registry):
    registry.register("w1", {"id": "m"})
    try:
        assert registry.is_alive("w1") and not registry.is_dead("w1")
    finally:
        registry._stop.set()  # stop beating, keep the entry (a killed worker cannot unregister)
        registry._thread.join(2)
    time.sleep(1.0)  # more than 4 periods of 0.2 s
    assert not registry.is_alive("w1") and registry.is_dead("w1")


def test_a_worker_missing_from_the_registry_is_not_called_dead(registry):
    """After a Redis restart the registry is empty until the next beat: a job started in that window is being
    run, so the backend must not fail it as orphaned."""
    assert not registry.is_alive("never-seen") and not registry.is_dead("never-seen")
