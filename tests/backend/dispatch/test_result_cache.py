"""backend.dispatch with the result cache: an answer is cached under everything it depends on, the project's
example prototypes included, and the worker's writer and the backend's reader agree on that key."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from backend.dispatch import Dispatcher, LabelRequest, PreparedJob, RunResult
from backend.settings import Settings
from backend_support import png_bytes, settings_for
from worker.protocol import (JOB_META_KEY, InversionParams, MemoryResultCache, encode_vectors, entries_from_result,
                             job_serializer)
from worker.queue_worker import WorkerRegistry
from worker.jobs.store_result import store_job_result

MODEL = {"name": "m", "pretrained": "none", "id": "m/none", "captions": "retrieval"}
LABELS = ["cat", "dog"]


def prototypes(label: str, seed: int, version: str) -> dict[str, Any]:
    """A project's example prototypes (backend.learning.learner's format) favouring ``label``; vectors ``[1, 8]``."""
    rng = np.random.default_rng(seed)
    return {"version": version, "labels": [label], "weights": encode_vectors(rng.normal(size=(1, 8))),
            "bias": [0.0], "means": encode_vectors(rng.normal(size=(1, 8))), "counts": [3]}


def mask() -> np.ndarray:
    """One rectangle on the 80 x 60 test image, bool ``[60, 80]``."""
    m = np.zeros((60, 80), bool)
    m[10:40, 20:60] = True
    return m


def answer(payload: dict[str, Any]) -> dict[str, Any]:
    """What a worker answers: the label the payload's prototypes favour ("text" without any)."""
    label = ((payload.get("prototypes") or {}).get("labels") or ["text"])[0]
    return {"model": MODEL, "image_sha256": payload["image"]["sha256"],
            "regions": [{"id": r["id"], "labels": [{"label": label, "score": 0.9}], "caption": None,
                         "caption_mode": None, "error": None} for r in payload["regions"]]}


class ScriptedDispatcher(Dispatcher):
    """Runs jobs with :func:`answer` and stores them as a worker does (``entries_from_result``)."""

    mode = "scripted"

    def __init__(self, settings: Settings):
        super().__init__(settings, MemoryResultCache(100, 3600))
        self.jobs = 0

    def model_info(self, wait_s: float = 0.0) -> dict[str, Any]:
        return dict(MODEL)

    def _run(self, items: list[PreparedJob], timeout_s: float) -> list[RunResult]:
        out = []
        for p in items:
            self.jobs += 1
            result = answer(p.payload)
            self.cache.put_many(entries_from_result(self.settings.redis_prefix, p.payload, result))
            out.append(RunResult.finished(result, {"status": "finished"}))
        return out


def ask(dispatcher: Dispatcher, examples: dict | None, views: int, timeout_s: float = 5.0) -> tuple[str, dict]:
    """Label the one region; returns (top label or error, diagnostics)."""
    params = InversionParams(views=views if examples else 1)  # as backend.predict.tasks.attach_prototypes does
    (outcome,) = dispatcher.label([LabelRequest(png_bytes(80, 60, 7), [mask()], LABELS, params,
                                                prototypes=examples)], timeout_s)
    region = outcome.regions[0]
    return (region["labels"][0]["label"] if region.get("labels") else f"error: {region.get('error')}"), outcome.info


@pytest.mark.parametrize("views", [1, 2])
def test_projects_with_different_examples_never_share_a_cached_answer(views):
    d = ScriptedDispatcher(Settings.from_env({}))
    a, b = prototypes("cat", 1, "v-a"), prototypes("dog", 2, "v-b")
    assert ask(d, a, views)[0] == "cat" and d.jobs == 1
    assert ask(d, b, views)[0] == "dog" and d.jobs == 2  # project B never gets A's answer
    assert ask(d, None, views)[0] == "text" and d.jobs == 3  # nor does a project without examples
    # each project hits its own cache
    label, info = ask(d, a, views)
    assert (label, d.jobs, info["result_cache"]) == ("cat", 3, {"hits": 1, "misses": 0})
    assert ask(d, b, views)[0] == "dog" and ask(d, None, views)[0] == "text" and d.jobs == 3


def test_examples_with_the_same_version_but_other_content_are_not_shared():
    d = ScriptedDispatcher(Settings.from_env({}))
    assert ask(d, prototypes("cat", 1, "same"), 2)[0] == "cat"
    assert ask(d, prototypes("dog", 2, "same"), 2)[0] == "dog" and d.jobs == 2


@pytest.mark.redis
@pytest.mark.parametrize("views", [1, 2])
def test_queue_mode_worker_callback_and_backend_agree_on_keys(redis_conn, redis_ns, views):
    """The worker's success callback stores what the backend then reads, per project (payloads through RQ's JSON)."""
    from rq.job import Job

    from backend.dispatch import QueueDispatcher

    registry = WorkerRegistry(redis_conn, redis_ns, prefix=redis_ns, heartbeat_s=60)
    registry._entry_json = registry.entry_json(MODEL, 60)
    registry.beat(f"{redis_ns}-listed")  # a listed worker (never takes a job): the backend learns MODEL from it
    d = QueueDispatcher(settings_for(redis_ns))
    a, b = prototypes("cat", 1, "v-a"), prototypes("dog", 2, "v-b")

    def finish(examples: dict | None) -> None:
        """Ask (the job waits: nobody serves the queue), then run the worker's callback on the stored job."""
        label, info = ask(d, examples, views, timeout_s=0.0)
        assert label.startswith("error:") and info["result_cache"]["hits"] == 0
        job = Job.fetch(info["job_id"], connection=redis_conn, serializer=job_serializer())
        rq_job = SimpleNamespace(id=job.id, args=job.args, meta=job.meta)
        store_job_result(rq_job, redis_conn, answer(job.args[0]))

    finish(a)
    finish(b)  # B is not served A's answer: it waits for its own job
    assert ask(d, a, views, 0.0)[0] == "cat" and ask(d, b, views, 0.0)[0] == "dog"
    label, info = ask(d, None, views, 0.0)
    assert label.startswith("error:") and info["result_cache"] == {"hits": 0, "misses": 1}
    assert JOB_META_KEY in Job.fetch(info["job_id"], connection=redis_conn, serializer=job_serializer()).meta
