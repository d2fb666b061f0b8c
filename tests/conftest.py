"""Shared fixtures. Backend/queue fixtures: a real Redis, unique queue names and key prefixes per test run."""

from __future__ import annotations

import uuid

import pytest

from backend_support import FAST, REDIS_URL, TINY_MODEL_ENV, delete_namespace


@pytest.fixture(scope="session")
def redis_conn():
    """A client of the real Redis (REDIS_URL or 127.0.0.1:6379)."""
    from redis import Redis
    from redis.exceptions import RedisError

    conn = Redis.from_url(REDIS_URL)
    try:
        conn.ping()
    except RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}); scripts/test.sh starts one")
    return conn


@pytest.fixture
def redis_ns(redis_conn):
    """A unique namespace ``maskinv-test-<hex>`` used as queue name and key prefix; its keys are deleted after."""
    ns = f"maskinv-test-{uuid.uuid4().hex[:10]}"
    yield ns
    delete_namespace(redis_conn, ns)


@pytest.fixture(scope="module")
def tiny_runtime():
    """Make worker.jobs.regions build its runtime from the tiny test model (and forget it afterwards)."""
    from worker.jobs import runtime as jobs

    mp = pytest.MonkeyPatch()
    for k, v in TINY_MODEL_ENV.items():
        mp.setenv(k, v)
    mp.setattr(jobs, "_runtime", None)
    yield
    mp.undo()


@pytest.fixture
def make_client(tiny_runtime, tmp_path):
    """``make_client(**env)``: a Flask test client of the backend in embedded mode (FAST settings + ``env``); its
    MASKINV_DATA_DIR (example store) is the test's own unless ``env`` names one, so no test sees another's examples."""
    from backend.http.app import create_app
    from backend.settings import Settings

    def make(**env):
        env.setdefault("MASKINV_DATA_DIR", tmp_path / "maskinv-data")
        settings = Settings.from_env({**FAST, **{k: str(v) for k, v in env.items()}})
        return create_app(settings).test_client()
    return make


@pytest.fixture
def client(make_client):
    return make_client()
