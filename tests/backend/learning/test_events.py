"""Webhook events are answered at once and handled after the answer (backend.learning.events): a bounded queue in
embedded mode, a Redis list in queue mode that a restarted backend drains; outcome counts in /health."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest

from backend.learning.events import EventsFull, MemoryEvents, RedisEvents
from backend_support import config, rect, task

PROJECT = {"id": 1, "label_config": config("rectangle")}


def created(ann_id: int, labels=("car",)) -> dict:
    return {"action": "ANNOTATION_CREATED", "project": PROJECT, "task": task(1, 0),
            "annotation": {"id": ann_id, "task": 1, "project": 1, "result": [rect("a", labels=labels)],
                           "was_cancelled": False}}


def test_webhook_answers_queued_and_the_examples_follow(make_client, tmp_path):
    c = make_client(MASKINV_DATA_DIR=str(tmp_path / "d"))
    ans = c.post("/webhook", json=created(11))
    assert ans.status_code == 200 and ans.get_json() == {"status": "queued", "action": "ANNOTATION_CREATED",
                                                         "project": "1"}
    service = c.application.config["MASKINV_SERVICE"]
    assert service.events.wait_idle(120)
    assert c.get("/examples?project=1").get_json()["labels"] == {"car": 1}
    counts = c.get("/health").get_json()["webhooks"]
    assert counts["queued"] == 1 and counts["stored"] == 1 and counts["pending"] == 0
    # not a learning event: acknowledged at once, nothing queued; a bad project id is refused at once
    assert c.post("/webhook", json={"action": "TASKS_CREATED", "project": PROJECT}).get_json()["status"] == "ignored"
    bad = c.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": "x"}})
    assert bad.status_code == 400 and "project id" in bad.get_json()["error"]


def test_a_full_queue_refuses_with_503_and_counts_it():
    release = threading.Event()
    seen: list = []

    def slow(event):
        release.wait(30)
        seen.append(event["n"])
        return SimpleNamespace(status="stored")

    events = MemoryEvents(slow, capacity=2)
    events.put({"n": 1})  # taken by the thread at once, or waiting
    events.put({"n": 2})
    refused = 0
    for n in range(3, 6):
        try:
            events.put({"n": n})
        except EventsFull:
            refused += 1
    assert refused >= 2
    release.set()
    assert events.wait_idle(30)
    assert seen[:2] == [1, 2]  # arrival order
    counts = events.counts()
    assert counts["refused"] == refused and counts["stored"] == len(seen) and counts["pending"] == 0


def test_a_failing_event_is_counted_and_the_next_one_still_runs():
    def handle(event):
        if event["n"] == 1:
            raise ValueError("bad event")
        return SimpleNamespace(status="unchanged")

    events = MemoryEvents(handle, capacity=10)
    events.put({"n": 1})
    events.put({"n": 2})
    assert events.wait_idle(30)
    assert events.counts()["failed"] == 1 and events.counts()["unchanged"] == 1


@pytest.mark.redis
def test_queue_mode_loses_no_event_when_a_backend_dies_mid_event(redis_conn, redis_ns):
    done: list = []
    handle = lambda e: done.append(e["n"]) or SimpleNamespace(status="stored")  # noqa: E731
    first = RedisEvents(handle, redis_conn, redis_ns, capacity=10, start=False)
    for n in (1, 2, 3):
        first.put({"n": n})
    # the first backend takes event 1 and dies before finishing it (no heartbeat left)
    raw = redis_conn.blmove(first.events_key, f"{redis_ns}:webhook:taken:{first.consumer}", 1, "RIGHT", "LEFT")
    assert json.loads(raw) == {"n": 1}
    second = RedisEvents(handle, redis_conn, redis_ns, capacity=10, start=False)
    assert second.recover() == 1
    while second.step(wait_s=1):
        pass
    assert done == [1, 2, 3]
    counts = second.counts()
    assert counts["queued"] == 3 and counts["stored"] == 3 and counts["pending"] == 0


@pytest.mark.redis
def test_queue_mode_caps_the_waiting_events(redis_conn, redis_ns):
    events = RedisEvents(lambda e: None, redis_conn, redis_ns, capacity=2, start=False)
    events.put({"n": 1})
    events.put({"n": 2})
    with pytest.raises(EventsFull):
        events.put({"n": 3})
    assert events.counts()["refused"] == 1 and events.counts()["pending"] == 2
