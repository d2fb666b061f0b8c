"""A Redis outage during a project run (backend.runs.project_run, queue mode): the run's tasks are deferred and retried
with back-off (bounded), not failed, and its status record survives. Against a real redis-server of its own,
stopped and started again (no persistence: everything in it is lost) while the run works."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from backend.runs import project_run
from backend.runs.project_run import ProjectRun, classify
from backend.runs.store import RedisRunStore
from backend.service import PredictError, Service
from backend.settings import Settings
from backend_support import FAST, config, rect
from fake_label_studio import FakeLabelStudio

pytestmark = [pytest.mark.redis, pytest.mark.faults]

VERSION = "maskinversion-outage-v1"


class RedisServer:
    """A redis-server on a free port, without persistence; ``restart(down_s)`` stops it and starts it again."""

    def __init__(self, workdir: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from redis import Redis

        self.proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(self.port),
                                      "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                      "--dir", str(self.workdir)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        probe = Redis(port=self.port, socket_connect_timeout=0.2)
        for _ in range(200):
            try:
                probe.ping()
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart_later(self, down_s: float) -> threading.Thread:
        """Stop now; start again after ``down_s`` seconds (in a thread)."""
        self.stop()
        thread = threading.Thread(target=lambda: (time.sleep(down_s), self.start()), daemon=True)
        thread.start()
        return thread


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def ls_task(tid: int) -> dict[str, Any]:
    ann = {"id": tid, "result": [rect(f"r{tid}")], "updated_at": "2024-01-01T00:00:00Z"}
    return {"id": tid, "project": 1, "data": {"image": f"/data/upload/1/{tid}.png"}, "annotations": [ann],
            "predictions": []}


def labelled(t: dict) -> dict[str, Any]:
    return {"result": [{"id": f"r{t['id']}", "type": "rectanglelabels", "value": {"rectanglelabels": ["car"]}}],
            "score": 0.5, "model_version": VERSION, "maskinv": {"labelled": 1, "errors": []}}


@pytest.mark.parametrize("surface", ["predict_error", "redis_error"])
def test_a_redis_restart_defers_the_runs_tasks_and_its_record_survives(redis_server, monkeypatch, surface):
    """The outage begins while task 3 is labelled: the batch path sees it as the dispatcher surfaces it (a 503
    PredictError, or redis' own ConnectionError), the store's claims and saves fail too; all 8 tasks end written."""
    from redis import Redis
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
    from redis.retry import Retry

    # no retries inside the client: every call during the outage fails (as it does once they are spent)
    conn = Redis(port=redis_server.port, socket_connect_timeout=0.5, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    restarted: list[threading.Thread] = []

    def fake(service, cfg, tasks, context=None, overrides=None, timeout_s=None, project=None):
        (t,) = tasks
        if t["id"] == 3 and not restarted:
            restarted.append(redis_server.restart_later(2.0))
        try:
            conn.ping()  # what enqueueing the job does first
        except RedisError as exc:
            if surface == "redis_error":
                raise
            raise PredictError(503, f"Redis at redis://127.0.0.1:{redis_server.port}/0 is not reachable: {exc}")
        return [labelled(t)]
    monkeypatch.setattr(project_run, "predict_tasks", fake)
    service = Service(Settings.from_env({**FAST, "MASKINV_MODEL_VERSION": VERSION}))
    api = FakeLabelStudio(projects={1: config("rectangle")}, tasks={i: ls_task(i) for i in range(1, 9)})
    store = RedisRunStore(conn, "maskinv-outage")
    run = ProjectRun(service, service.config(config("rectangle")), api, store, model_version=VERSION,
                     kind="retrieve", project="1", workers=2)
    summary = run.run(list(range(1, 9)), total=8)
    assert restarted, "the outage did not happen"
    assert (summary.labelled, summary.failed) == (8, 0), summary.to_dict()
    assert sorted(api.preds) == list(range(1, 9)) and all(v == [VERSION] for v in api.preds.values())
    (record,) = [r for r in store.runs() if r["id"] == run.run_id]  # written again after the restart
    assert record["state"] == "done" and record["done"] == 8 and record["failed"] == 0


def test_an_outage_that_lasts_fails_the_tasks_after_a_bounded_wait(redis_server, monkeypatch):
    from redis import Redis

    monkeypatch.setattr(project_run, "OUTAGE_GIVE_UP_S", 1.0)
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    conn = Redis(port=redis_server.port, socket_connect_timeout=0.3, socket_timeout=0.3, retry=Retry(NoBackoff(), 0))
    monkeypatch.setattr(project_run, "predict_tasks", lambda *a, **k: pytest.fail("labelled during the outage"))
    service = Service(Settings.from_env({**FAST, "MASKINV_MODEL_VERSION": VERSION}))
    api = FakeLabelStudio(projects={1: config("rectangle")}, tasks={i: ls_task(i) for i in range(1, 5)})
    store = RedisRunStore(conn, "maskinv-outage")
    redis_server.stop()
    run = ProjectRun(service, service.config(config("rectangle")), api, store, model_version=VERSION,
                     kind="retrieve", project="1", workers=2)
    summary = run.run(list(range(1, 5)), total=4)
    assert summary.failed == 4 and api.writes == 0
    assert all(k == "queue_unavailable" for _, _, k in summary.failures.values())
    (record,) = store.load_all()  # Redis is down: the record is kept in memory
    assert record.id == run.run_id and record.state == "done" and record.failed == 4
    redis_server.start()
    store.flush()
    assert [r["id"] for r in RedisRunStore(conn, "maskinv-outage").runs()] == [run.run_id]


def test_outage_surfaces_are_classified_as_queue_unavailable():
    class QueueUnavailable(ConnectionError):
        """What the queue dispatcher raises on a Redis outage (a builtin ConnectionError)."""

    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    for exc in (QueueUnavailable("down"), RedisConnectionError("down"), RedisTimeoutError("slow"),
                PredictError(503, "Redis at redis://r:6379/0 is not reachable: refused")):
        assert project_run.queue_outage(exc), exc
    assert not project_run.queue_outage(PredictError(413, "too many regions"))
    assert not project_run.queue_outage(ValueError("x"))
    entry = {"error": "queue down", "maskinv": {"errors": [{"kind": "failed", "code": "queue_unavailable",
                                                             "error": "queue down"}]}}
    assert classify(1, entry).kind == "queue_unavailable"
    redis_msg = {"error": "x", "maskinv": {"errors": [{"kind": "failed", "error": "Redis at redis://r:6379/0 is not "
                                                                                   "reachable: refused (waited 5s)"}]}}
    assert classify(1, redis_msg).kind == "queue_unavailable"
