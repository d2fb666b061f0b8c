"""Queue mode without Redis: the dispatcher's one distinct error (``QueueUnavailable``, a ConnectionError) and the
per-task code ``queue_unavailable``, which project runs wait out instead of failing their tasks."""

from __future__ import annotations

import numpy as np
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from backend.dispatch import DispatchError, LabelRequest, QueueDispatcher, QueueUnavailable
from backend.labelstudio.label_config import parse_label_config
from backend.predict.tasks import STATUS, predict_tasks
from backend.service import Service
from backend_support import REDIS_URL, config, png_bytes, rect, settings_for, task
from worker.protocol import InversionParams
from worker.queue_worker import WorkerRegistry

pytestmark = pytest.mark.redis

DOWN = "redis://127.0.0.1:1/0"  # nothing listens there


def request() -> LabelRequest:
    m = np.zeros((60, 80), bool)
    m[5:30, 5:40] = True
    return LabelRequest(png_bytes(80, 60, 3), [m], ["car", "tree"], InversionParams())


class LosesRedisWhileWaiting(QueueDispatcher):
    """Enqueues on the real Redis, then every poll fails as if Redis had gone away."""

    def _poll(self, pending: dict, results: dict, t0: float) -> list[int]:
        raise RedisConnectionError("Connection refused (Redis restarting)")


def listed_worker(conn, ns: str) -> None:
    """A worker entry in the registry, so that the backend does not answer 'no worker' at once."""
    registry = WorkerRegistry(conn, ns, prefix=ns, heartbeat_s=60)
    registry._entry_json = registry.entry_json({"name": "m", "pretrained": "none", "id": "m/none"}, 60)
    registry.beat(f"{ns}-listed")


def test_unreachable_redis_raises_queue_unavailable():
    d = QueueDispatcher(settings_for("maskinv-test-down", REDIS_URL=DOWN))
    for call in (lambda: d.label([request()], 1.0), lambda: d.model_info(), lambda: d.run_embed({}, 1.0)):
        with pytest.raises(QueueUnavailable) as info:
            call()
        assert isinstance(info.value, ConnectionError) and isinstance(info.value, DispatchError)
        assert "not reachable" in str(info.value) and "127.0.0.1:1" in str(info.value)


def test_predict_tasks_lets_project_runs_catch_a_connection_error():
    service = Service(settings_for("maskinv-test-down", REDIS_URL=DOWN))
    cfg = parse_label_config(config("rectangle"))
    tasks = [task(1, 3, annotations=[{"id": 1, "result": [rect("r")]}])]
    with pytest.raises(ConnectionError):
        predict_tasks(service, cfg, tasks, timeout_s=1.0)


def test_redis_lost_while_waiting_is_reported_per_region(redis_conn, redis_ns):
    listed_worker(redis_conn, redis_ns)
    d = LosesRedisWhileWaiting(settings_for(redis_ns, REDIS_URL=REDIS_URL))
    (outcome,) = d.label([request()], 0.3)
    assert outcome.kind == "queue_unavailable" and "not reachable" in outcome.error
    assert outcome.regions[0]["error"] == outcome.error
    assert STATUS["queue_unavailable"] == 503


def test_batch_answer_carries_the_queue_unavailable_code(redis_conn, redis_ns):
    listed_worker(redis_conn, redis_ns)
    settings = settings_for(redis_ns, REDIS_URL=REDIS_URL)
    service = Service(settings, dispatcher=LosesRedisWhileWaiting(settings))
    cfg = parse_label_config(config("rectangle"))
    tasks = [task(1, 3, annotations=[{"id": 1, "result": [rect("r")]}])]
    (answer,) = predict_tasks(service, cfg, tasks, timeout_s=0.3)
    assert "result" not in answer and "not reachable" in answer["error"]
    # kind "failed" (retried later by readers that know only kinds) with the distinct code
    assert [(e["kind"], e["code"]) for e in answer["maskinv"]["errors"]] == [("failed", "queue_unavailable")]


def test_interactive_request_losing_redis_while_waiting_is_503(redis_conn, redis_ns):
    from backend.service import PredictError

    listed_worker(redis_conn, redis_ns)
    settings = settings_for(redis_ns, REDIS_URL=REDIS_URL)
    service = Service(settings, dispatcher=LosesRedisWhileWaiting(settings))
    with pytest.raises(PredictError) as info:
        predict_tasks(service, parse_label_config(config("rectangle")), [task(1, 3)],
                      context={"result": [rect("r")]}, timeout_s=0.3)
    assert info.value.status == 503 and "not reachable" in info.value.message


def test_http_answer_stays_503():
    from backend.http.app import create_app

    client = create_app(service=Service(settings_for("maskinv-test-down", REDIS_URL=DOWN))).test_client()
    body = {"tasks": [task(1, 3)], "label_config": config("rectangle"), "params": {"context": {"result": [rect("r")]}}}
    resp = client.post("/predict", json=body)
    assert resp.status_code == 503 and "not reachable" in resp.get_json()["error"]
    batch = client.post("/predict", json={**body, "tasks": [task(1, 3, annotations=[{"id": 1, "result": [rect("r")]}])],
                                          "params": {}})
    assert batch.status_code == 503 and "not reachable" in batch.get_json()["error"]
