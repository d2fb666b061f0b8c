"""End-to-end fixtures: a real Label Studio (its own venv, SQLite in a temp dir) and the ML backend.

Session scope: Label Studio starts once (~10 s from a cached migrated database; the first run migrates one,
~1.5 min on 2 cores) and the backend once in embedded mode (the tiny random-init test model); queue-mode tests
get a second backend with ``REDIS_URL`` set and one ``python -m worker`` (the real Redis, a fresh queue name
and key prefix, deleted afterwards). All run as child processes in their own process groups and are stopped at
the end; their logs are attached to the report of any failing e2e test.
"""

from __future__ import annotations

import os
import uuid

import pytest

from backend_support import delete_namespace
from ls_harness import (BACKEND_ENV, BackendServer, HarnessError, LabelStudioClient, LabelStudioServer, WorkerProcess,
                        started)


_servers: list = []


@pytest.fixture(scope="session")
def ls_server(tmp_path_factory):
    """A running Label Studio with one user (``.username`` / ``.password``) on 127.0.0.1."""
    server = LabelStudioServer(tmp_path_factory.mktemp("label-studio"))
    started(server)
    _servers.append(server)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ls_token(ls_server) -> str:
    """The user's personal access token (JWT refresh token), created through the logged-in UI session."""
    return ls_server.personal_access_token()


@pytest.fixture(scope="session")
def ls(ls_server, ls_token) -> LabelStudioClient:
    """Label Studio API client (Bearer access tokens from the personal access token)."""
    return LabelStudioClient(ls_server.url, ls_token)


@pytest.fixture(scope="session")
def ml_backend(ls_server, ls_token, tmp_path_factory):
    """``maskinv-backend`` (embedded, tiny model) pointed at Label Studio with the personal access token."""
    env = dict(BACKEND_ENV, LABEL_STUDIO_URL=ls_server.url, LABEL_STUDIO_API_KEY=ls_token)
    server = BackendServer(tmp_path_factory.mktemp("backend") / "backend.log", env=env)
    started(server)
    _servers.append(server)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ml_backend_queue(ls_server, ls_token, redis_conn, tmp_path_factory):
    """The backend in queue mode (Redis at REDIS_URL / 127.0.0.1:6379) with one worker, tiny model."""
    ns = f"maskinv-e2e-{uuid.uuid4().hex[:10]}"
    redis_url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    env = dict(BACKEND_ENV, LABEL_STUDIO_URL=ls_server.url, LABEL_STUDIO_API_KEY=ls_token, REDIS_URL=redis_url,
               MASKINV_QUEUE=ns, MASKINV_REDIS_PREFIX=ns)
    logs = tmp_path_factory.mktemp("backend-queue")
    worker = WorkerProcess(logs / "worker.log", env=env)
    server = BackendServer(logs / "backend.log", env=env)
    _servers.extend([worker, server])
    try:
        worker.start()
        server.start()  # /health is "ready" once the worker has loaded the model and registered
    except HarnessError as exc:
        server.stop()
        worker.stop()
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()
    worker.stop()
    delete_namespace(redis_conn, ns)


@pytest.fixture(params=["embedded", pytest.param("queue", marks=pytest.mark.redis)])
def backend_mode(request) -> str:
    """Run a test against the embedded backend and against the queue-mode backend."""
    return request.param


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "tests/e2e/" in item.nodeid.replace("\\", "/"):
        for server in _servers:
            proc = getattr(server, "process", None)
            if proc is not None:
                report.sections.append((f"{proc.name} log (tail)", proc.log_tail(60)))
