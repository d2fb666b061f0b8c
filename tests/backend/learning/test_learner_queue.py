"""Learning in queue mode: webhook events in a Redis list learnt from after the answer, examples in Redis (no TTL),
LETs in Redis (TTL), embed jobs on a real worker."""

from __future__ import annotations

import time

import pytest

from backend_support import WorkerProcess, client_for, config, predict, rect, task

pytestmark = [pytest.mark.redis, pytest.mark.slow]

PROJECT = {"id": 1, "label_config": config("rectangle")}


def event(ann_id: int, regions: list[dict], task_id: int, seed: int) -> dict:
    return {"action": "ANNOTATION_CREATED", "project": PROJECT, "task": task(task_id, seed),
            "annotation": {"id": ann_id, "task": task_id, "result": regions, "was_cancelled": False}}


def test_queue_mode_examples_and_let_cache(redis_conn, redis_ns, tmp_path):
    worker = WorkerProcess(redis_ns, tmp_path)
    try:
        worker.wait_ready(redis_conn)
        client = client_for(redis_ns)
        ans = client.post("/webhook", json=event(11, [rect("a", labels=("car",)), rect("b", x=45, w=30,
                                                                                      labels=("dog",))], 1, 0))
        assert ans.status_code == 200 and ans.get_json()["status"] == "queued", ans.get_json()
        deadline = time.monotonic() + 300  # a safety net against a hang
        while (client.get("/health").get_json().get("webhooks") or {}).get("stored", 0) < 1:
            assert time.monotonic() < deadline, client.get("/health").get_json()
            time.sleep(0.2)
        key = f"{redis_ns}:examples:1"
        assert redis_conn.hlen(key) == 1 and redis_conn.ttl(key) == -1  # never expires
        lets = list(redis_conn.scan_iter(match=f"{redis_ns}:let:*"))
        # examples are embedded from 2 views (MASKINV_EXAMPLE_VIEWS): the image and its mirror, one LET each, and
        # mixed with their masked crop (MASKINV_CROP_WEIGHT), cached beside them
        assert len(lets) == 2 * 3 and all(0 < redis_conn.ttl(k) for k in lets)
        # a second backend process (restart) sees the same examples
        again = client_for(redis_ns).get("/examples?project=1").get_json()
        assert again["labels"] == {"car": 1, "dog": 1}
        # the same region labelled now: its LETs (both views) come from Redis, its scores use the examples
        pred = predict(client, "rectangle", [task(5, seed=0, annotations=[{"id": 9, "result": [rect("a")]}])])
        body = pred.get_json()
        assert pred.status_code == 200, body
        p = body["results"][0]
        assert "-ex" not in p["model_version"] and p["result"][0]["meta"]["examples_state"].startswith("ex")
        assert p["maskinv"]["jobs"][0]["cache"]["let_hits"] == 1
        assert "examples" in p["result"][0]["meta"]
    finally:
        worker.stop()
