"""backend.dispatch.queue waits on RQ's result stream: a job's result is taken as soon as it is written, and a
label job a (simulated) worker finishes comes back as the protocol's typed result."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from backend.dispatch import LabelRequest, QueueDispatcher
from backend.dispatch.queue import wait_for_result
from backend_support import png_bytes, settings_for
from worker.protocol import InversionParams, JobResult, RegionResult
from worker.queue_worker import WorkerRegistry

pytestmark = pytest.mark.redis

MODEL = {"name": "m", "pretrained": "none", "id": "m/none", "captions": "retrieval"}


def finish_later(job, result: dict, delay_s: float) -> threading.Thread:
    """What a worker does when it finishes ``job``: status ``finished`` and a successful result, after ``delay_s``."""
    from rq.results import Result

    def run() -> None:
        time.sleep(delay_s)
        job.connection.hset(job.key, "status", "finished")
        Result.create(job, Result.Type.SUCCESSFUL, ttl=60, return_value=result)

    th = threading.Thread(target=run)
    th.start()
    return th


def test_wait_returns_when_the_result_arrives_not_at_the_end_of_the_wait(redis_ns):
    d = QueueDispatcher(settings_for(redis_ns))
    job = d.queue.enqueue_call("worker.jobs.regions.label_regions", args=({},), job_id=f"{redis_ns}-wait")
    th = finish_later(job, {"regions": []}, 0.2)
    t0 = time.monotonic()
    wait_for_result(job, 5.0)
    th.join()
    assert time.monotonic() - t0 < 2.5


def test_a_finished_label_job_comes_back_typed(redis_conn, redis_ns):
    registry = WorkerRegistry(redis_conn, redis_ns, prefix=redis_ns, heartbeat_s=60)
    registry._entry_json = registry.entry_json(MODEL, 60)
    registry.beat(f"{redis_ns}-listed")  # a listed worker, so that the backend waits
    d = QueueDispatcher(settings_for(redis_ns))
    mask = np.zeros((60, 80), bool)
    mask[10:40, 20:60] = True
    request = LabelRequest(png_bytes(80, 60, 5), [mask], ["cat"], InversionParams())

    def worker() -> None:
        """Finish the job as soon as it is on the queue."""
        deadline = time.monotonic() + 10
        while not d.queue.get_job_ids() and time.monotonic() < deadline:
            time.sleep(0.02)
        (job,) = d.queue.get_jobs()
        region_id = job.args[0]["regions"][0]["id"]
        region = RegionResult.from_dict({"id": region_id, "labels": [{"label": "cat", "score": 0.9}]})
        finish_later(job, JobResult(regions=(region,), model=MODEL).to_dict(), 0.1).join()

    th = threading.Thread(target=worker)
    th.start()
    (outcome,) = d.label([request], 10.0)
    th.join()
    assert outcome.error is None and outcome.model["id"] == "m/none"
    assert [r.labels[0].label for r in outcome.results] == ["cat"] and outcome.cached == [False]
    assert outcome.regions[0]["labels"] == [{"label": "cat", "score": 0.9}] and outcome.info["status"] == "finished"
