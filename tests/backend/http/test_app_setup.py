"""/setup prepares the project's label prototypes in the background (embedded and queue mode, job prepare_labels)."""

from __future__ import annotations

import pytest
from backend_support import TINY_MODEL_ENV, config, predict, rect, settings_for, task

from worker.protocol import DEFAULT_TEMPLATES, JobResult, PrepareLabelsJob, ProtocolError


def _service(client):
    return client.application.config["MASKINV_SERVICE"]


def _labels(cfg_name: str, client) -> tuple[str, ...]:
    cfg = _service(client).config(config(cfg_name))
    (control,) = cfg.region_controls.values()
    return control.labels


def test_setup_prepares_the_label_prototypes_in_embedded_mode(make_client):
    from worker.jobs import regions as jobs

    client = make_client()
    labels = _labels("rectangle", client)
    rt = jobs.get_runtime()
    rt.scorer.cache.clear()
    resp = client.post("/setup", json={"project": "1", "schema": config("rectangle")})
    assert resp.status_code == 200
    _service(client).dispatcher._pool.submit(lambda: None).result(timeout=120)  # the job thread has run it
    params = _service(client).settings.params
    key = (rt.clip.id, labels, params.templates)
    assert key in rt.scorer.cache
    prepared = predict(client, "rectangle", [task(1)], context={"result": [rect("a")]}).get_json()
    rt.scorer.cache.clear()  # the same prediction computed from scratch: preparing changes no number
    _service(client).dispatcher.cache._data.clear()
    fresh = predict(client, "rectangle", [task(1)], context={"result": [rect("a")]}).get_json()
    def suggestions(answer):  # labels, scores and captions (timings and cache counters differ)
        return [(p["result"], p["score"]) for p in answer["results"]]

    assert "rectanglelabels" in str(suggestions(prepared)) and suggestions(prepared) == suggestions(fresh)


def test_setup_does_not_prepare_when_switched_off(make_client):
    from worker.jobs import regions as jobs

    client = make_client(MASKINV_PREPARE_LABELS="0")
    rt = jobs.get_runtime()
    rt.scorer.cache.clear()
    assert client.post("/setup", json={"project": "1", "schema": config("rectangle")}).status_code == 200
    _service(client).dispatcher._pool.submit(lambda: None).result(timeout=120)
    assert len(rt.scorer.cache) == 0


def test_queue_mode_enqueues_a_prepare_labels_job_that_a_worker_runs(redis_conn, redis_ns, tiny_runtime):
    from rq import Queue, SimpleWorker

    from backend.dispatch import QueueDispatcher
    from worker.jobs import regions as jobs
    from worker.queue_worker import JOB_SERIALIZER, LabelJob

    dispatcher = QueueDispatcher(settings_for(redis_ns), connection=redis_conn)
    dispatcher.prepare_labels([("cat", "dog"), ("cat", "dog"), ()], dispatcher.settings.params)
    dispatcher.prepare_labels([("cat", "dog")], dispatcher.settings.params)  # repeated /setup: nothing added
    assert len(dispatcher.queue) == 1
    (job,) = dispatcher.queue.get_jobs()
    assert job.func_name == "worker.jobs.regions.prepare_labels"
    assert PrepareLabelsJob.from_dict(job.args[0]).label_sets == (("cat", "dog"),)
    assert job.result_ttl == 60  # the product's window: a repeated /setup within a minute of the job's end adds nothing
    # This test reads the record back after the worker; it must not hinge on Redis' wall clock staying within a
    # minute. CI once found the record gone milliseconds after the worker's last write (rq 2.12, the whole suite,
    # not reproduced in full runs here), so the copy under test keeps it for an hour.
    job.result_ttl = 3600
    job.save()
    jobs.get_runtime().scorer.cache.clear()
    worker = SimpleWorker([Queue(redis_ns, connection=redis_conn, serializer=JOB_SERIALIZER, job_class=LabelJob)],
                          connection=redis_conn, serializer=JOB_SERIALIZER, job_class=LabelJob,
                          name=f"{redis_ns}-inproc")
    clock = redis_conn.time()
    worker.work(burst=True, with_scheduler=False)
    ttl_ms = redis_conn.pttl(job.key)
    assert ttl_ms > 0, f"the finished job's record is gone (PTTL {ttl_ms}; Redis clock {clock} -> {redis_conn.time()})"
    done = LabelJob.fetch(job.id, connection=redis_conn, serializer=JOB_SERIALIZER)
    assert done.get_status() == "finished"
    result = JobResult.from_dict(done.return_value())
    assert result.kind == "prepare_labels" and result.error is None and result.regions == ()
    assert result.cache["prompts_encoded"] == 2 * len(DEFAULT_TEMPLATES)
    assert (jobs.get_runtime().clip.id, ("cat", "dog"), dispatcher.settings.params.templates) in \
        jobs.get_runtime().scorer.cache


def test_prepare_labels_job_validation(tiny_runtime):
    from worker.jobs import regions as jobs

    bad = jobs.prepare_labels({"label_sets": [["a", "a"]]})
    assert bad["error"] == "labels must be unique" and bad["kind"] == "prepare_labels"
    for payload, match in [({"label_sets": "cat"}, "label_sets must be a list"),
                           ({"label_sets": [["x"]] * 65}, "at most 64"),
                           ({"label_sets": [[f"l{i}" for i in range(10_001)]]}, "more than 10000 labels"),
                           ({"label_sets": [["x"]], "templates": ["none"]}, "templates"),
                           ({"label_sets": [["x"]], "captions": "yes"}, "captions must be true or false"),
                           ({"label_sets": [["x"]], "v": 99}, "upgrade the worker")]:
        with pytest.raises(ProtocolError, match=match):
            PrepareLabelsJob.from_dict(payload)
    ok = PrepareLabelsJob(label_sets=(("x",),))
    assert PrepareLabelsJob.from_dict(ok.to_dict()) == ok
    assert TINY_MODEL_ENV["MASKINV_MODEL"] == jobs.get_runtime().clip.name
