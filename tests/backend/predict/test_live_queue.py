"""Live indexing in queue mode: the embedding comes back through RQ from a ``python -m worker``, and an answer the
worker's callback cached carries it too (the real Redis, tiny model)."""

from __future__ import annotations

import json
import uuid

import pytest

from backend.search.api import current_model
from backend.search.records import SearchFilter
from backend_support import WorkerProcess, client_for, config, delete_namespace, rect, task

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def worker_ns(redis_conn, tmp_path_factory):
    ns = f"maskinv-test-{uuid.uuid4().hex[:10]}"
    worker = WorkerProcess(ns, tmp_path_factory.mktemp("workers"))
    try:
        worker.wait_ready(redis_conn)
        yield ns
    finally:
        worker.stop()
        delete_namespace(redis_conn, ns)


def test_queue_mode_indexes_suggestions_also_from_the_result_cache(worker_ns, tmp_path):
    client = client_for(worker_ns, MASKINV_DATA_DIR=str(tmp_path / "data"))
    service = client.application.config["MASKINV_SERVICE"]
    body = {"tasks": [task(3, 3)], "label_config": config("rectangle"), "project": "1.1700000000",
            "params": {"context": {"result": [rect("r1")]}}}
    first = client.post("/predict", json=body)
    assert first.status_code == 200, first.get_json()
    assert first.get_json()["results"][0]["maskinv"]["jobs"][0]["result_cache"] == {"hits": 0, "misses": 1}
    body["tasks"] = [task(4, 3)]  # another task, the same image and region: answered from the result cache
    second = client.post("/predict", json=body)
    assert second.get_json()["results"][0]["maskinv"]["jobs"][0] == {"result_cache": {"hits": 1, "misses": 0}}
    assert "embedding" not in json.dumps([first.get_json(), second.get_json()])
    assert service.search_index.flush(60)
    recs, _ = service.search_index.store.fetch(SearchFilter(model=current_model(service, 60), projects=("1",)), 10)
    assert {(r.task, r.region, r.source) for r in recs} == {(3, "r1", "suggested"), (4, "r1", "suggested")}
