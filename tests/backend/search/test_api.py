"""POST /search on the embedded backend (tiny model): annotations go into the index through the webhook, come out
when their annotation or task is deleted, and are found by text, label, example and coverage queries."""

from __future__ import annotations

import numpy as np
import pytest

from backend_support import config, rect, task

from backend.search.records import RegionRecord, SearchFilter

PROJECT = {"id": 1, "label_config": config("rectangle")}


def created(ann_id: int, regions: list[dict], task_id: int, seed: int = 0) -> dict:
    return {"action": "ANNOTATION_CREATED", "project": PROJECT,
            "annotation": {"id": ann_id, "task": task_id, "project": 1, "result": regions, "was_cancelled": False},
            "task": task(task_id, seed)}


@pytest.fixture
def indexed(make_client, tmp_path):
    client = make_client(MASKINV_DATA_DIR=str(tmp_path / "data"), MASKINV_WEBHOOK_QUEUE="0")
    for ann, tid in ((11, 1), (12, 2)):
        resp = client.post("/webhook", json=created(ann, [rect("a", labels=("car",)),
                                                          rect("b", x=50, w=20, labels=("dog",))], tid, seed=tid))
        assert resp.status_code == 200 and resp.get_json()["status"] == "stored", resp.get_json()
    return client


def search(client, **body):
    return client.post("/search", json={"projects": [1], **body})


def test_annotated_regions_are_found_by_text_and_by_label(indexed):
    resp = search(indexed, text="car", k=10)
    assert resp.status_code == 200, resp.get_json()
    doc = resp.get_json()
    assert doc["kind"] == "text" and len(doc["query"]) == 12 and doc["model"].startswith("maskinv-test-tiny")
    hits = doc["hits"]
    assert {(h["task"], h["region"]) for h in hits} == {(1, "a"), (1, "b"), (2, "a"), (2, "b")}
    assert all(h["source"] == "human" and h["annotation"] in ("11", "12") for h in hits)
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)
    assert hits[0]["box"] and len(hits[0]["box"]) == 4
    by_label = search(indexed, label="dog", k=2).get_json()["hits"]
    assert {h["label"] for h in by_label} == {"dog"}  # the label's own examples are nearest its prototype
    only_dogs = search(indexed, text="car", labels=["dog"], k=10).get_json()["hits"]
    assert {h["label"] for h in only_dogs} == {"dog"}


def test_example_query_returns_the_example_first(indexed):
    hits = search(indexed, examples=[{"project": 1, "task": 2, "region": "b", "annotation": "12"}], k=3)
    assert hits.status_code == 200, hits.get_json()
    assert (hits.get_json()["hits"][0]["task"], hits.get_json()["hits"][0]["region"]) == (2, "b")
    missing = search(indexed, examples=[{"project": 1, "task": 9, "region": "zz"}])
    assert missing.status_code == 400 and "not in the index" in missing.get_json()["error"]


def test_deleted_annotations_and_tasks_leave_the_index(indexed):
    gone = indexed.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": PROJECT,
                                          "annotations": [{"id": 11}]})
    assert gone.status_code == 200
    assert {h["task"] for h in search(indexed, text="car", k=10).get_json()["hits"]} == {2}
    tasks = indexed.post("/webhook", json={"action": "TASKS_DELETED", "project": PROJECT, "tasks": [{"id": 2}]})
    assert tasks.status_code == 200 and tasks.get_json()["status"] == "deleted"
    assert search(indexed, text="car", k=10).get_json()["hits"] == []


def test_coverage_ranks_unlabelled_regions_least_like_any_label_first(indexed):
    service = indexed.application.config["MASKINV_SERVICE"]
    model = search(indexed, text="car").get_json()["model"]
    store = service.search_index.store
    _, vecs = store.fetch(store_filter(model), 10)
    near, far = vecs[0], -vecs.mean(axis=0)
    store.upsert([RegionRecord(model=model, project="1", task=5, region="near", source="suggested"),
                  RegionRecord(model=model, project="1", task=6, region="far", source="proposed")],
                 np.stack([near, far]))
    hits = search(indexed, coverage=True, k=2).get_json()["hits"]
    assert [h["region"] for h in hits] == ["far", "near"] and hits[0]["nearest_label"] in ("car", "dog")


def store_filter(model: str) -> SearchFilter:
    return SearchFilter(model=model, projects=("1",))


@pytest.mark.parametrize("body, field", [
    ({"text": "car", "label": "car"}, "exactly one"),
    ({"text": "x" * 201}, "text"),
    ({"text": "car", "k": 501}, "k must be"),
    ({"text": "car", "projects": [str(i) for i in range(21)]}, "projects"),
    ({"examples": [{"task": 1, "region": "a"}] * 51}, "examples"),
    ({"text": "car", "sources": ["robot"]}, "sources"),
    ({"coverage": "yes"}, "coverage"),
])
def test_bad_requests_name_the_field(indexed, body, field):
    resp = indexed.post("/search", json={"projects": [1], **body})
    assert resp.status_code == 400 and field in resp.get_json()["error"], resp.get_json()


def test_search_needs_the_credentials_of_the_other_routes(make_client, tmp_path):
    client = make_client(MASKINV_DATA_DIR=str(tmp_path / "d"), BASIC_AUTH_USER="u", BASIC_AUTH_PASS="p")
    assert client.post("/search", json={"projects": [1], "text": "car"}).status_code == 401
    off = make_client(MASKINV_DATA_DIR=str(tmp_path / "e"), MASKINV_SEARCH_STORE="off")
    resp = off.post("/search", json={"projects": [1], "text": "car"})
    assert resp.status_code == 404 and "MASKINV_SEARCH_STORE" in resp.get_json()["error"]


def test_search_before_the_model_is_known_answers_503(indexed, monkeypatch):
    service = indexed.application.config["MASKINV_SERVICE"]
    monkeypatch.setattr(service.dispatcher, "model_info", lambda wait_s=0.0: None)
    resp = search(indexed, text="car")
    assert resp.status_code == 503 and "not loaded yet" in resp.get_json()["error"]


def test_task_deletion_is_queued_like_annotation_events(make_client, tmp_path):
    client = make_client(MASKINV_DATA_DIR=str(tmp_path / "q"))  # events handled after the answer
    resp = client.post("/webhook", json={"action": "TASKS_DELETED", "project": PROJECT, "tasks": [{"id": 2}]})
    assert resp.status_code == 200 and resp.get_json()["status"] == "queued", resp.get_json()
