"""Jobs enqueued by the previous release (former function and callback names) still run, on the real Redis."""

from __future__ import annotations

import numpy as np
import pytest

from backend_support import png_bytes
from worker.protocol import (FORMER_CALLBACKS, FORMER_FUNCTIONS, JOB_KINDS, JOB_META_KEY, STORE_CALLBACK,
                             InversionParams, LabelRegionsJob, runnable_callback, runnable_function)

pytestmark = [pytest.mark.redis]


def test_former_names_map_to_todays_functions_and_nothing_else_runs():
    assert set(FORMER_FUNCTIONS.values()) <= {k.function for k in JOB_KINDS.values()}
    assert runnable_function("worker.jobs.label_regions") == "worker.jobs.regions.label_regions"
    assert runnable_function("worker.embed_jobs.embed_regions") == "worker.jobs.embed.embed_regions"
    assert runnable_function("worker.jobs.regions.label_regions") == "worker.jobs.regions.label_regions"
    assert runnable_callback("worker.result_cache.store_job_result") == STORE_CALLBACK == FORMER_CALLBACKS[
        "worker.result_cache.store_job_result"]
    for refused in ("os.system", "worker.jobs.os", "worker.embed_jobs.anything", None):
        assert runnable_function(refused) is None
    assert runnable_callback("os.system") is None


def test_a_label_job_enqueued_under_its_former_name_runs_and_caches(redis_conn, redis_ns, tiny_runtime):
    """The previous release enqueued ``worker.jobs.label_regions`` with the ``worker.result_cache.store_job_result``
    callback: a worker of this release runs the job and stores its regions in the result cache."""
    from rq import Callback, Queue, SimpleWorker

    from worker.queue_worker import JOB_SERIALIZER, LabelJob

    mask = np.zeros((60, 80), bool)
    mask[10:40, 20:60] = True
    payload = LabelRegionsJob.build(png_bytes(80, 60, seed=3), [("r1", mask)], ["cat", "dog"],
                                    InversionParams(size=64, steps=2, caption=False)).to_dict()
    queue = Queue(redis_ns, connection=redis_conn, serializer=JOB_SERIALIZER, job_class=LabelJob)
    job = queue.enqueue_call("worker.jobs.label_regions", args=(payload,),
                             on_success=Callback("worker.result_cache.store_job_result"),
                             meta={JOB_META_KEY: {"prefix": redis_ns, "ttl_s": 60}})
    worker = SimpleWorker([queue], connection=redis_conn, serializer=JOB_SERIALIZER, job_class=LabelJob,
                          name=f"{redis_ns}-inproc")
    worker.work(burst=True, with_scheduler=False)
    done = LabelJob.fetch(job.id, connection=redis_conn, serializer=JOB_SERIALIZER)
    assert done.get_status() == "finished", done.latest_result().exc_string
    result = done.return_value()
    assert result["regions"][0]["id"] == "r1" and result["regions"][0]["labels"], result
    assert list(redis_conn.scan_iter(match=f"{redis_ns}:result:*")), "the former callback name stored nothing"
