"""Queue mode, real Redis and a real worker: a job whose worker took it off the queue and died before starting it
(still ``queued``, on no list a worker reads) is re-enqueued after MASKINV_ORPHAN_GRACE, for the request waiting
for it and for a repeated request, instead of waiting for ever."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from rq.utils import now, utcformat

from backend.dispatch import QueueDispatcher
from backend_support import WORKER_START_S, WorkerProcess, client_for, data_uri, png_bytes, settings_for
from worker.queue_worker import WorkerRegistry

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
CONFIG = (ROOT / "label_config" / "rectangle.xml").read_text()
TINY = {"name": "maskinv-test-tiny", "pretrained": "none", "id": "maskinv-test-tiny/random-seed0"}


def body(seed: int) -> dict:
    region = {"id": "r", "from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": 80,
              "original_height": 60, "value": {"x": 10, "y": 10, "width": 40, "height": 50, "rotation": 0,
                                               "rectanglelabels": ["car"]}}
    return {"tasks": [{"id": 1, "data": {"image": data_uri(png_bytes(80, 60, seed))}}], "label_config": CONFIG,
            "params": {"context": {"result": [region]}}}


def take_and_die(conn, ns: str) -> str:
    """What a worker does before it dies: move the waiting job's id off the queue's list (RQ's LMOVE to the
    intermediate list) without starting it. Returns the job id."""
    queue = f"rq:queue:{ns}"
    deadline = time.monotonic() + 60
    while not conn.llen(queue):
        assert time.monotonic() < deadline, "the job was never enqueued"
        time.sleep(0.02)
    job_id = conn.lmove(queue, f"{queue}:intermediate").decode()
    assert conn.hget(f"rq:job:{job_id}", "status") == b"queued"
    return job_id


def test_waiting_request_completes_after_a_live_worker_appears(redis_conn, redis_ns, tmp_path):
    dead = WorkerRegistry(redis_conn, redis_ns, prefix=redis_ns, heartbeat_s=60)
    dead._entry_json = dead.entry_json(TINY, 60)
    dead.beat(f"{redis_ns}-dead")  # the worker that will take the job and die
    client = client_for(redis_ns, MASKINV_ORPHAN_GRACE=1, MASKINV_TIMEOUT=WORKER_START_S + 120)
    answer: dict = {}
    th = threading.Thread(target=lambda: answer.update(resp=client.post("/predict", json=body(801))))
    th.start()
    job_id = take_and_die(redis_conn, redis_ns)
    redis_conn.zrem(dead.workers_key, f"{redis_ns}-dead")
    worker = WorkerProcess(redis_ns, tmp_path)
    try:
        th.join(WORKER_START_S + 150)
        assert not th.is_alive(), worker.tail()
        resp = answer["resp"]
        assert resp.status_code == 200, resp.get_json()
        (job,) = resp.get_json()["results"][0]["maskinv"]["jobs"]
        assert job["job_id"] == job_id and job["worker"] == worker.name and job["requeued"] == 1
        assert not redis_conn.lrange(f"rq:queue:{redis_ns}:intermediate", 0, -1)
    finally:
        worker.stop()


def test_repeated_request_does_not_wait_on_the_dead_job(redis_conn, redis_ns, tmp_path):
    first = client_for(redis_ns).post("/predict", json=body(802))
    assert first.status_code == 503  # no worker yet: the job stays queued
    job_id = take_and_die(redis_conn, redis_ns)
    worker = WorkerProcess(redis_ns, tmp_path)
    try:
        worker.wait_ready(redis_conn)
        again = client_for(redis_ns, MASKINV_ORPHAN_GRACE=1, MASKINV_TIMEOUT=120).post("/predict", json=body(802))
        assert again.status_code == 200, again.get_json()
        (job,) = again.get_json()["results"][0]["maskinv"]["jobs"]
        assert job["job_id"] == job_id and job["worker"] == worker.name and job["status"] == "finished"
    finally:
        worker.stop()


def test_one_backend_requeues_an_orphan_once_and_leaves_other_jobs_alone(redis_conn, redis_ns):
    """No worker process: the sighting marks are set back in time instead of waiting for the grace."""
    d1, d2 = (QueueDispatcher(settings_for(redis_ns, MASKINV_ORPHAN_GRACE=30)) for _ in range(2))
    job = d1.queue.enqueue_call("worker.jobs.regions.label_regions", args=({},), job_id=f"{redis_ns}-job")
    mark = d1.queue.intermediate_queue.get_first_seen_key(job.id)
    assert d1._orphans([job]) == []  # waiting on the queue's list
    take_and_die(redis_conn, redis_ns)
    assert d1._orphans([job]) == [] and redis_conn.exists(mark)  # first sighting: within the grace
    redis_conn.hset(job.key, "enqueued_at", utcformat(now() - timedelta(minutes=2)))  # enqueued 2 minutes ago
    redis_conn.set(mark, time.time() - 60)  # and seen taken a minute ago
    assert [j.id for j in d2._orphans([job])] == [job.id]
    assert [d._requeue(job) for d in (d1, d2)] == [True, False]  # pushed back once, by one backend
    assert redis_conn.lrange(f"rq:queue:{redis_ns}", 0, -1) == [job.id.encode()]
    assert not redis_conn.lrange(f"rq:queue:{redis_ns}:intermediate", 0, -1)
    # a mark left from before the job was enqueued again is not this run's: the grace starts anew
    take_and_die(redis_conn, redis_ns)
    redis_conn.set(mark, time.time() - 3600)
    assert d1._orphans([job]) == [] and float(redis_conn.get(mark)) > time.time() - 60
